//! Decisions around image pulls: which errors may pass (retry with backoff)
//! and which are definitive (fail the generation), and whether there is
//! disk space to pull at all. Pure functions; the reconciler does the I/O.

use std::path::{Path, PathBuf};

/// Whether retrying a failed pull can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullErrorClass {
    /// Registry unreachable, timeouts, 5xx, rate limits, a full disk: retry.
    Transient,
    /// Unknown manifest or repository, no access, a malformed reference:
    /// retrying gives the same answer, so the generation fails.
    Definitive,
}

/// Text that means the registry answered and said no. Checked first: the
/// daemon wraps some of these in a 500.
const DEFINITIVE_TEXT: &[&str] = &[
    "manifest unknown",
    "not found",
    "unauthorized",
    "authentication required",
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
    let text = message.to_lowercase();
    if DEFINITIVE_TEXT.iter().any(|t| text.contains(t)) {
        return PullErrorClass::Definitive;
    }
    match status {
        Some(400 | 401 | 403 | 404) => return PullErrorClass::Definitive,
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
            (Some(401), "something"),
            (Some(400), "invalid reference format"),
            (None, "unauthorized: authentication required"),
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
