//! Every payload decoder on arbitrary bytes.
//!
//! Properties, per payload type `T`:
//! - `decode::<T>` never panics, whatever the bytes;
//! - a `Malformed` error names `T`'s own topic kind;
//! - whatever decodes re-encodes, and decoding the re-encoding gives an
//!   equal value (values containing NaN are compared by their encoding,
//!   since NaN != NaN) and the same bytes again.

#![no_main]

use std::fmt::Debug;

use drover_shared::codec::{decode, encode, DecodeError, Message, MAX_PAYLOAD_BYTES};
use drover_shared::payload::*;
use libfuzzer_sys::fuzz_target;

fn check<T: Message + PartialEq + Debug>(data: &[u8]) {
    match decode::<T>(data) {
        Ok(v) => {
            let bytes = encode(&v);
            let again = match decode::<T>(&bytes) {
                Ok(again) => again,
                Err(e) => panic!("{}: re-encoding of {v:?} does not decode: {e}", T::KIND),
            };
            // NaN-free values must compare equal; every value must re-encode
            // to the same bytes (a fixed point after one round).
            #[allow(clippy::eq_op)]
            if v == v {
                assert_eq!(again, v, "{}: round trip changed the value", T::KIND);
            }
            assert_eq!(encode(&again), bytes, "{}: re-encoding is not stable", T::KIND);
        }
        Err(DecodeError::Malformed { kind, .. }) => assert_eq!(kind, T::KIND, "error names the wrong kind"),
        Err(DecodeError::TooLarge { size, .. }) => assert!(size > MAX_PAYLOAD_BYTES),
        Err(DecodeError::UnsupportedVersion { got, supported }) => assert_ne!(got, supported),
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Hello>(data);
    check::<Status>(data);
    check::<Heartbeat>(data);
    check::<StateReport>(data);
    check::<Telemetry>(data);
    check::<LogBatch>(data);
    check::<Desired>(data);
    check::<Command>(data);
    check::<Ack>(data);
    check::<DeviceEvent>(data);
});
