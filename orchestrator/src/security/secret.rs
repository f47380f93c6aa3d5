//! Random secrets and their stored form.
//!
//! Every secret Drover issues (device passwords, enrollment and API
//! tokens) is 32 random bytes from the thread-local CSPRNG, hex-encoded.
//! Only its SHA-256 is stored: the secrets are high-entropy, so a fast hash
//! suffices (no password-stretching needed), and a stolen database does not
//! let anyone connect. Comparisons are constant-time.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new secret: 64 hex characters, 256 bits.
pub fn generate() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

/// A new short, non-secret identifier: 12 hex characters.
pub fn short_id() -> String {
    let mut b = [0u8; 6];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

/// The stored form of a secret.
pub fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` is the one whose digest is `stored`, in constant time.
pub fn verify(secret: &str, stored: &str) -> bool {
    digest(secret).as_bytes().ct_eq(stored.as_bytes()).into()
}

/// Tokens are `<prefix>.<id>.<secret>`: the id finds the record, the secret
/// proves possession. Returns `(id, secret)` when the shape is right.
pub fn split_token<'a>(token: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = token.strip_prefix(prefix)?.strip_prefix('.')?;
    let (id, secret) = rest.split_once('.')?;
    if id.is_empty() || secret.is_empty() {
        return None;
    }
    Some((id, secret))
}

pub fn join_token(prefix: &str, id: &str, secret: &str) -> String {
    format!("{prefix}.{id}.{secret}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_verify_only_themselves() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let stored = digest(&a);
        assert!(verify(&a, &stored));
        assert!(!verify(&b, &stored));
        assert!(!verify("", &stored));
    }

    #[test]
    fn tokens_split_into_id_and_secret() {
        let t = join_token("et", "abc", "s3cret");
        assert_eq!(split_token(&t, "et"), Some(("abc", "s3cret")));
        assert_eq!(split_token(&t, "at"), None);
        assert_eq!(split_token("et.abc", "et"), None);
        assert_eq!(split_token("et..x", "et"), None);
        assert_eq!(split_token("etx.a.b", "et"), None);
    }
}
