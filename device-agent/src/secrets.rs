//! Registry credentials from the orchestrator's `secrets` topic: the latest
//! set in memory, and on disk in `<state-dir>/secrets.cbor` (mode 0600,
//! written by rename) so that after a reboot without network the agent can
//! still pull from a private registry.
//!
//! Passwords never reach a log: [`Secrets`] and [`RegistryCredential`]
//! print `<redacted>` for them, and only hosts are logged here.

use std::path::{Path, PathBuf};

use bollard::auth::DockerCredentials;
use drover_shared::model::ImageRef;
use drover_shared::payload::{RegistryCredential, Secrets};

const FILE_NAME: &str = "secrets.cbor";
/// Owner read/write only.
const FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode {path}")]
    Decode {
        path: PathBuf,
        source: drover_shared::DecodeError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct SecretsStore {
    path: PathBuf,
}

impl SecretsStore {
    pub fn new(state_dir: &Path) -> Self {
        SecretsStore {
            path: state_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored set; an empty one when nothing was ever stored.
    pub fn load(&self) -> Result<Secrets, SecretsError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Secrets::default()),
            Err(source) => {
                return Err(SecretsError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        drover_shared::decode(&bytes).map_err(|source| SecretsError::Decode {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes a temporary file created with mode 0600 and renames it over
    /// the old one: a power cut leaves the old set or the new one, and at
    /// no moment can another user read either.
    pub fn save(&self, secrets: &Secrets) -> Result<(), SecretsError> {
        let bytes = drover_shared::encode(secrets);
        crate::store::write_file(&self.path, &bytes, Some(FILE_MODE)).map_err(|source| {
            SecretsError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// Whether an incoming set replaces the one held: only a newer or equally
/// new one does, so a late redelivery of an old set changes nothing.
pub fn replaces(held: &Secrets, incoming: &Secrets) -> bool {
    incoming.issued_at_ms >= held.issued_at_ms && incoming != held
}

/// The credentials for the registry an image is pulled from, if any.
pub fn credentials_for<'a>(
    secrets: &'a Secrets,
    image: &ImageRef,
) -> Option<&'a RegistryCredential> {
    secrets.for_host(&image.registry_host())
}

/// bollard's form of one registry's credentials.
pub fn docker_credentials(c: &RegistryCredential) -> DockerCredentials {
    DockerCredentials {
        username: Some(c.username.clone()),
        password: Some(c.password.clone()),
        serveraddress: Some(c.host.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn set(at: u64, host: &str, password: &str) -> Secrets {
        Secrets {
            issued_at_ms: at,
            registries: vec![RegistryCredential {
                host: host.into(),
                username: "robot".into(),
                password: password.into(),
            }],
        }
    }

    #[test]
    fn nothing_stored_is_an_empty_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            SecretsStore::new(dir.path()).load().expect("loads"),
            Secrets::default()
        );
    }

    #[test]
    fn saved_secrets_load_back_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SecretsStore::new(dir.path());
        // A stale temporary file readable by everyone must not pass its
        // permissions on.
        let tmp = dir.path().join("secrets.cbor.tmp");
        std::fs::write(&tmp, b"old").expect("write");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        store.save(&set(1, "127.0.0.1:5001", "pw")).expect("saves");
        store
            .save(&set(2, "127.0.0.1:5001", "pw2"))
            .expect("saves again");
        assert_eq!(
            store.load().expect("loads"),
            set(2, "127.0.0.1:5001", "pw2")
        );
        let mode = std::fs::metadata(store.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["secrets.cbor"], "no temporary file left behind");
    }

    #[test]
    fn a_corrupt_file_is_a_decode_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SecretsStore::new(dir.path());
        std::fs::write(store.path(), b"garbage").expect("write");
        assert!(matches!(store.load(), Err(SecretsError::Decode { .. })));
    }

    #[test]
    fn only_newer_different_sets_replace_the_held_one() {
        let held = set(5, "a:1", "pw");
        assert!(replaces(&held, &set(6, "a:1", "new")));
        assert!(replaces(
            &held,
            &Secrets {
                issued_at_ms: 6,
                registries: vec![]
            }
        ));
        assert!(!replaces(&held, &set(4, "a:1", "old")), "older");
        assert!(!replaces(&held, &held.clone()), "the same");
    }

    #[test]
    fn pulls_get_the_credentials_of_their_own_registry_only() {
        let s = set(1, "127.0.0.1:5001", "pw");
        let img = |r: &str| ImageRef::parse(r).expect("valid");
        let c = credentials_for(&s, &img("127.0.0.1:5001/drover/busybox:2")).expect("match");
        let d = docker_credentials(c);
        assert_eq!(
            (
                d.username.as_deref(),
                d.password.as_deref(),
                d.serveraddress.as_deref()
            ),
            (Some("robot"), Some("pw"), Some("127.0.0.1:5001"))
        );
        assert!(credentials_for(&s, &img("127.0.0.1:5000/drover/busybox:2")).is_none());
        assert!(credentials_for(&s, &img("busybox:1")).is_none());
    }
}
