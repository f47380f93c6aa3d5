//! Agent self-update: what the desired state asks for ([`AgentTarget`]),
//! how a device downloads a binary over MQTT ([`FetchRequest`] on its
//! `fetch` topic, [`BlobChunk`] on its `blob` topic), and how it reports
//! progress ([`AgentUpdateStatus`] in its state report).
//!
//! The binary travels in chunks the device asks for one by one, so the
//! agent talks to the orchestrator only through broker topics, whatever the
//! broker and its TLS; each chunk fits one message.

use serde::{Deserialize, Serialize};

use crate::codec::MAX_PAYLOAD_BYTES;

/// The largest chunk the orchestrator sends (and a device may ask for):
/// with its envelope it stays well inside [`MAX_PAYLOAD_BYTES`].
pub const MAX_CHUNK_BYTES: u64 = 192 * 1024;

const _: () = assert!(MAX_CHUNK_BYTES as usize + 4096 < MAX_PAYLOAD_BYTES);

/// The longest agent version string an orchestrator stores.
pub const MAX_VERSION_LEN: usize = 64;

/// Whether `s` is a SHA-256 digest as Drover writes it: 64 lowercase hex
/// digits (no `sha256:` prefix). Paths and topics are built from digests
/// only after this check.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lowercase hex of a byte string (a digest).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// An agent version as uploaded: 1 to 64 characters of `[A-Za-z0-9._+-]`.
pub fn validate_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_VERSION_LEN {
        return Err(format!(
            "the version must be 1 to {MAX_VERSION_LEN} characters, got {}",
            v.len()
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
    {
        return Err(format!(
            "the version may hold letters, digits, '.', '_', '+' and '-'; {c:?} is not allowed"
        ));
    }
    Ok(())
}

/// `DesiredState.agent`: the agent binary the device should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentTarget {
    /// The version it was uploaded as (for people and logs).
    pub version: String,
    /// SHA-256 of the binary, lowercase hex.
    pub digest: String,
    pub size: u64,
}

/// `fetch`: device → orchestrator, one chunk of a binary, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub digest: String,
    pub offset: u64,
    /// At most [`MAX_CHUNK_BYTES`]; more is answered with that many.
    pub len: u64,
}

/// `blob`: orchestrator → device, never retained: the answer to one
/// [`FetchRequest`], a chunk or why not (`error`, with `data` empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunk {
    /// The digest asked for (cut to 64 characters when it was not one).
    pub digest: String,
    pub offset: u64,
    /// The whole binary's size.
    #[serde(default)]
    pub total: u64,
    #[serde(default, with = "bytes")]
    pub data: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an agent update is doing, in the state report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AgentUpdatePhase {
    Downloading,
    Verifying,
    Restarting,
    /// Given up on this digest (download, check, start or confirmation
    /// failed); not tried again until the desired digest changes.
    Failed,
}

/// `ObservedState.agent_update`: progress or failure of the update to
/// `digest`. Absent when the agent runs what it is asked to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentUpdateStatus {
    pub digest: String,
    pub phase: AgentUpdatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A byte string as CBOR bytes (major type 2), not an array of numbers,
/// which would cost up to twice the size. Hand-written: two functions, no
/// crate for them.
mod bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_versions() {
        let d = hex(&[0xab; 32]);
        assert!(is_digest(&d));
        for bad in [
            "",
            "AB",
            &d.to_uppercase(),
            &format!("{d}0"),
            "../../etc/passwd",
        ] {
            assert!(!is_digest(bad), "{bad}");
        }
        assert!(validate_version("1.2.3-rc.1+git").is_ok());
        for bad in ["", "a b", "../x", &"x".repeat(65)] {
            assert!(validate_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_chunk_fits_one_message() {
        let c = BlobChunk {
            digest: hex(&[1; 32]),
            offset: u64::MAX,
            total: u64::MAX,
            data: vec![0xff; MAX_CHUNK_BYTES as usize],
            error: None,
        };
        let bytes = crate::encode(&c);
        assert!(bytes.len() < MAX_PAYLOAD_BYTES, "{}", bytes.len());
        // Bytes, not an array of numbers.
        assert!(bytes.len() < MAX_CHUNK_BYTES as usize + 200);
        let back: BlobChunk = crate::decode(&bytes).expect("round trip");
        assert_eq!(back, c);
    }
}
