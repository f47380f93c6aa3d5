//! Decisions around image pulls: which errors may pass (retry with backoff)
//! and which are definitive (fail the generation), and whether there is
//! disk space to pull at all. Pure functions; the reconciler does the I/O.

use std::path::{Path, PathBuf};

use drover_shared::model::ImageRef;
use drover_shared::payload::RegistryCredential;

use crate::runtime::RuntimeError;

/// Whether retrying a failed pull can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullErrorClass {
    /// Registry unreachable, timeouts, 5xx, rate limits, a full disk: retry.
    Transient,
    /// Unknown manifest or repository, no access, a malformed reference:
    /// retrying gives the same answer, so the generation fails.
    Definitive,
}

/// Text that means the registry wants credentials it did not get, or did
/// not accept the ones it got. Checked before anything else: credentials can
/// arrive (or be corrected) at any time on the `secrets` topic, so these
/// pulls are retried, and a new set of credentials retries them at once.
const UNAUTHORIZED_TEXT: &[&str] = &[
    "unauthorized",
    "authentication required",
    "no basic auth credentials",
];

/// Text that means the registry answered and said no. Checked first: the
/// daemon wraps some of these in a 500.
const DEFINITIVE_TEXT: &[&str] = &[
    "manifest unknown",
    "not found",
    "denied",
    "invalid reference format",
    "repository name must",
    "name unknown",
    "does not exist",
];

/// Text that means the registry could not be reached or was overloaded,
/// or the device had no room. Used when there is no HTTP status (an error
/// inside the pull's progress stream).
const TRANSIENT_TEXT: &[&str] = &[
    "connection refused",
    "connection reset",
    "timeout",
    "timed out",
    "no route to host",
    "network is unreachable",
    "no such host",
    "temporary failure in name resolution",
    "tls handshake",
    "unexpected eof",
    "broken pipe",
    "service unavailable",
    "bad gateway",
    "internal server error",
    "too many requests",
    "toomanyrequests",
    "unexpected http status: 5",
    "no space left on device",
    "not enough free disk",
];

/// Classifies a pull error by the daemon's HTTP status where there is one,
/// and by its text otherwise. Unknown errors without a status are
/// definitive, which keeps a bad spec from retrying forever.
pub fn classify(status: Option<u16>, message: &str) -> PullErrorClass {
    if is_unauthorized(status, message) {
        return PullErrorClass::Transient;
    }
    let text = message.to_lowercase();
    if DEFINITIVE_TEXT.iter().any(|t| text.contains(t)) {
        return PullErrorClass::Definitive;
    }
    match status {
        Some(400 | 403 | 404) => return PullErrorClass::Definitive,
        Some(408 | 429) => return PullErrorClass::Transient,
        Some(s) if s >= 500 => return PullErrorClass::Transient,
        _ => {}
    }
    if TRANSIENT_TEXT.iter().any(|t| text.contains(t)) {
        PullErrorClass::Transient
    } else {
        PullErrorClass::Definitive
    }
}

/// Whether a pull failed because the registry wants (other) credentials.
pub fn is_unauthorized(status: Option<u16>, message: &str) -> bool {
    let text = message.to_lowercase();
    status == Some(401) || UNAUTHORIZED_TEXT.iter().any(|t| text.contains(t))
}

/// Rewrites an authentication failure so that it says `unauthorized`, which
/// registry it was and whether the device had credentials for it (Docker's
/// own text varies: "no basic auth credentials", "authentication
/// required"). Never includes the password. Other errors pass unchanged.
pub fn explain_unauthorized(
    e: RuntimeError,
    image: &ImageRef,
    auth: Option<&RegistryCredential>,
) -> RuntimeError {
    let RuntimeError::Pull { status, message } = e else {
        return e;
    };
    if !is_unauthorized(status, &message) {
        return RuntimeError::Pull { status, message };
    }
    let host = image.registry_host();
    let message = match auth {
        None => format!(
            "unauthorized: registry {host} requires credentials and this device has none for it ({message})"
        ),
        Some(c) => format!(
            "unauthorized: registry {host} refused the credentials of user {} ({message})",
            c.username
        ),
    };
    RuntimeError::Pull { status, message }
}

/// The mount point that holds `path`: the longest mount point that is a
/// path prefix of it (component-wise, so `/var/lib` does not hold
/// `/var/library`). Returns its index in `mounts`.
pub fn containing_mount(path: &Path, mounts: &[PathBuf]) -> Option<usize> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(m))
        .max_by_key(|(_, m)| m.components().count())
        .map(|(i, _)| i)
}

const MIB: u64 = 1024 * 1024;

/// `None` when there is room to pull; else the error text the app shows.
pub fn disk_shortfall(
    image: &str,
    root: &Path,
    free_bytes: u64,
    min_free_bytes: u64,
) -> Option<String> {
    (free_bytes < min_free_bytes).then(|| {
        format!(
            "not enough free disk for pulling {image}: {} MiB free on {}, {} MiB required",
            free_bytes / MIB,
            root.display(),
            min_free_bytes.div_ceil(MIB)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use PullErrorClass::{Definitive, Transient};

    #[test]
    fn registry_refusals_are_definitive() {
        for (status, text) in [
            (Some(404), "manifest for 127.0.0.1:5000/drover/busybox:nope not found: manifest unknown: manifest unknown"),
            (Some(500), "manifest for x:1 not found: manifest unknown"),
            (Some(404), "pull access denied for x, repository does not exist or may require 'docker login'"),
            (Some(400), "invalid reference format"),
            (None, "invalid reference format: repository name must be lowercase"),
            (None, "some error nobody has seen before"),
        ] {
            assert_eq!(classify(status, text), Definitive, "{status:?} {text}");
        }
    }

    #[test]
    fn errors_that_may_pass_are_transient() {
        for (status, text) in [
            (Some(500), r#"Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused"#),
            (Some(500), "received unexpected HTTP status: 503 Service Unavailable"),
            (Some(502), "anything"),
            (Some(429), "toomanyrequests: slow down"),
            (None, "net/http: TLS handshake timeout"),
            (None, "read tcp 10.0.0.2:4000->10.0.0.1:5000: read: connection reset by peer"),
            (None, "failed to register layer: write /var/lib/docker/x: no space left on device"),
            (None, "not enough free disk for pulling x:1: 120 MiB free on /var/lib/docker, 256 MiB required"),
            (None, "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"),
        ] {
            assert_eq!(classify(status, text), Transient, "{status:?} {text}");
        }
    }

    #[test]
    fn authentication_failures_are_retried_until_credentials_arrive() {
        for (status, text) in [
            (Some(401), "something"),
            (None, "unauthorized: authentication required"),
            (
                Some(500),
                r#"Head "http://127.0.0.1:5001/v2/drover/busybox/manifests/2": no basic auth credentials"#,
            ),
        ] {
            assert!(is_unauthorized(status, text), "{status:?} {text}");
            assert_eq!(classify(status, text), Transient, "{status:?} {text}");
        }
        assert!(!is_unauthorized(Some(404), "manifest unknown"));
    }

    #[test]
    fn unauthorized_errors_say_so_without_the_password() {
        let image = ImageRef::parse("127.0.0.1:5001/drover/busybox:2").expect("valid");
        let e = || {
            RuntimeError::Pull {
            status: Some(500),
            message: "Head \"http://127.0.0.1:5001/v2/drover/busybox/manifests/2\": no basic auth credentials".into(),
        }
        };
        let none = explain_unauthorized(e(), &image, None).to_string();
        assert!(
            none.starts_with("unauthorized: registry 127.0.0.1:5001 requires credentials"),
            "{none}"
        );
        let cred = RegistryCredential {
            host: "127.0.0.1:5001".into(),
            username: "robot".into(),
            password: "s3cr3t-pw".into(),
        };
        let wrong = explain_unauthorized(e(), &image, Some(&cred)).to_string();
        assert!(
            wrong.contains("unauthorized") && wrong.contains("robot"),
            "{wrong}"
        );
        assert!(!wrong.contains("s3cr3t"), "{wrong}");
        let other = RuntimeError::Pull {
            status: Some(404),
            message: "manifest unknown".into(),
        };
        assert_eq!(
            explain_unauthorized(other, &image, None).to_string(),
            "manifest unknown"
        );
    }

    #[test]
    fn the_longest_mount_prefix_wins() {
        let mounts: Vec<PathBuf> = ["/", "/var", "/var/lib/docker", "/var/library"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let m = |p: &str| {
            containing_mount(Path::new(p), &mounts)
                .map(|i| mounts[i].to_str().unwrap_or_default().to_string())
        };
        assert_eq!(m("/var/lib/docker").as_deref(), Some("/var/lib/docker"));
        assert_eq!(
            m("/var/lib/docker/overlay2").as_deref(),
            Some("/var/lib/docker")
        );
        assert_eq!(m("/var/lib").as_deref(), Some("/var"));
        assert_eq!(m("/home").as_deref(), Some("/"));
        assert_eq!(
            containing_mount(Path::new("/x"), &[PathBuf::from("/y")]),
            None
        );
    }

    #[test]
    fn shortfall_names_image_space_and_minimum() {
        let root = Path::new("/var/lib/docker");
        assert_eq!(disk_shortfall("x:1", root, 300 * MIB, 256 * MIB), None);
        assert_eq!(
            disk_shortfall("127.0.0.1:5000/x:1", root, 120 * MIB + 5, 256 * MIB).as_deref(),
            Some("not enough free disk for pulling 127.0.0.1:5000/x:1: 120 MiB free on /var/lib/docker, 256 MiB required")
        );
    }
}
