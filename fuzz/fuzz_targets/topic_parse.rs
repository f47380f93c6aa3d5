//! `Topics::parse` on arbitrary strings.
//!
//! Input layout: `<root>\n<topic>`; when there is no newline, or the root is
//! not a valid one, the topic is parsed under each of a few fixed roots.
//!
//! Properties:
//! - `Topics::new` and `Topics::parse` never panic;
//! - when a topic parses, `Topics::device(id, kind)` rebuilds it exactly;
//! - for a valid root, the topic built for any valid device id and every kind
//!   parses back to that id and kind, and the `+` filter is well formed.

#![no_main]

use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;
use libfuzzer_sys::fuzz_target;

const FIXED_ROOTS: [&str; 3] = ["drover", "site-a/fleet", "d"];

fn check(topics: &Topics, topic: &str) {
    if let Some((id, kind)) = topics.parse(topic) {
        assert_eq!(topics.device(&id, kind), topic, "parse is not the inverse of device()");
    }
    // Whatever the topic, the last segment may also be tried as a device id.
    if let Some(seg) = topic.rsplit('/').next() {
        if let Ok(id) = DeviceId::new(seg) {
            for kind in TopicKind::ALL {
                let t = topics.device(&id, kind);
                assert_eq!(topics.parse(&t), Some((id.clone(), kind)), "{t}");
                let filter = topics.all_devices(kind);
                assert!(filter.starts_with(topics.root()) && filter.ends_with(kind.as_str()));
                assert_eq!(topics.parse(&filter), None, "a wildcard filter parsed as a topic: {filter}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some((root, topic)) = s.split_once('\n') {
        if let Ok(topics) = Topics::new(root) {
            assert_eq!(topics.root(), root);
            check(&topics, topic);
            return;
        }
    }
    for root in FIXED_ROOTS {
        let topics = Topics::new(root).expect("fixed roots are valid");
        check(&topics, s);
    }
});
