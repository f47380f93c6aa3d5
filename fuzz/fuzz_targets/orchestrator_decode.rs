//! The orchestrator's device-message decoder,
//! `drover::mqtt::decode_device_message`, over every topic kind.
//!
//! Properties: never panics; topics the orchestrator publishes itself (cmd,
//! desired) are always `Ok(None)`; device topics either decode to a message
//! or fail with an error that names the topic kind.

#![no_main]

use drover::mqtt::decode_device_message;
use drover_shared::codec::DecodeError;
use drover_shared::topic::TopicKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in TopicKind::ALL {
        match decode_device_message(kind, data) {
            Ok(None) => assert!(
                TopicKind::TO_DEVICE.contains(&kind)
                    || matches!(kind, TopicKind::Enroll | TopicKind::Fetch),
                "{kind} ignored"
            ),
            Ok(Some(_)) => assert!(TopicKind::FROM_DEVICE.contains(&kind), "{kind} decoded"),
            Err(DecodeError::Malformed { kind: k, .. }) => assert_eq!(k, kind),
            Err(_) => {}
        }
    }
});
