//! App specs as the REST API receives them, and image references.
//!
//! The bytes are parsed as a JSON `AppSpec` the way the orchestrator's
//! `api::parse_body` does it (serde_path_to_error over serde_json; that
//! function is private, so its error mapping is mirrored below), then
//! validated as `create_app` does. Properties:
//! - parsing, error mapping and `validate()` never panic;
//! - after a successful validation every image parses with `ImageRef::parse`
//!   and is already in normal form (the agent parses it again before pulling);
//! - validation is idempotent;
//! - the validated spec round-trips through JSON (REST) and CBOR (inside
//!   `desired`/`cmd` payloads), and its fingerprints survive the trip.
//!
//! The same bytes, as a string, also go to `ImageRef::parse`: never panics,
//! and what parses re-parses from its `Display` form to the same value.

#![no_main]

use drover_shared::codec::{decode, encode};
use drover_shared::model::{AppSpec, DesiredApp, DesiredState, ImageRef, RunState};
use drover_shared::payload::Desired;
use libfuzzer_sys::fuzz_target;

/// Mirror of `drover::api::parse_body` (orchestrator/src/api.rs), minus the
/// HTTP status: `Err((field, message))`.
fn parse_body(body: &[u8]) -> Result<AppSpec, (String, String)> {
    if body.is_empty() {
        return Err((String::new(), "request body is empty; expected a JSON object".into()));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|p| msg.split_once(p).and_then(|(_, rest)| rest.split_once('`')).map(|(f, _)| f.to_string()));
        let field = match (path.as_str(), named) {
            (".", Some(f)) => f,
            (p, Some(f)) if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
            (p, Some(f)) => format!("{p}.{f}"),
            (".", None) => String::new(),
            (p, None) => p.to_string(),
        };
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("request body is not valid JSON: {msg}")
        } else if field.is_empty() {
            format!("invalid request body: {msg}")
        } else {
            format!("invalid field `{field}`: {msg}")
        };
        (field, message)
    })
}

fn check_spec(data: &[u8]) {
    let Ok(mut spec) = parse_body(data) else { return };
    for c in &spec.containers {
        let _ = c.fingerprint();
    }
    if spec.validate().is_err() {
        return;
    }
    for c in &spec.containers {
        let r = match ImageRef::parse(&c.image) {
            Ok(r) => r,
            Err(e) => panic!("validated image {:?} does not parse: {e}", c.image),
        };
        assert_eq!(r.to_string(), c.image, "validated image is not in normal form");
        assert!(!r.pull_tag().is_empty());
    }
    let mut again = spec.clone();
    assert_eq!(again.validate(), Ok(()), "validation is not idempotent");
    assert_eq!(again, spec, "second validation changed the spec");

    // JSON, as the REST API returns and accepts it.
    let json = serde_json::to_vec(&spec).expect("a spec serialises to JSON");
    let back = match parse_body(&json) {
        Ok(back) => back,
        Err(e) => panic!("validated spec does not re-parse from its JSON {}: {e:?}", String::from_utf8_lossy(&json)),
    };
    assert_eq!(back, spec, "JSON round trip changed the spec");

    // CBOR, bare and inside a desired-state payload.
    let mut cbor = Vec::new();
    ciborium::into_writer(&spec, &mut cbor).expect("a spec serialises to CBOR");
    let back: AppSpec = match ciborium::from_reader(cbor.as_slice()) {
        Ok(back) => back,
        Err(e) => panic!("validated spec does not decode from its CBOR: {e}"),
    };
    assert_eq!(back, spec, "CBOR round trip changed the spec");
    for (a, b) in back.containers.iter().zip(&spec.containers) {
        assert_eq!(a.fingerprint(), b.fingerprint(), "fingerprint changed in the round trip");
    }
    let desired = Desired { state: DesiredState { generation: 1, apps: vec![DesiredApp { spec, run: RunState::Running, started_at: 1 }] } };
    match decode::<Desired>(&encode(&desired)) {
        Ok(back) => assert_eq!(back, desired, "desired payload round trip changed the spec"),
        Err(e) => panic!("desired payload with a validated spec does not decode: {e}"),
    }
}

fn check_image(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = ImageRef::parse(s) {
        assert!(!r.repository.is_empty());
        let shown = r.to_string();
        match ImageRef::parse(&shown) {
            Ok(again) => assert_eq!(again, r, "{s:?} -> {shown:?} re-parses differently"),
            Err(e) => panic!("{s:?} parses, but its normal form {shown:?} does not: {e}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_spec(data);
    check_image(data);
});
