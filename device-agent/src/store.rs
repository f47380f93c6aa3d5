//! The adopted desired state on local disk, so that after a reboot without
//! network the agent brings the apps back on its own (agent autonomy).
//!
//! The file holds a `Desired` payload in the wire encoding: one codec, and a
//! version check for free when an older agent finds a newer file.

use std::path::{Path, PathBuf};

use drover_shared::model::DesiredState;
use drover_shared::payload::Desired;

const FILE_NAME: &str = "desired.cbor";
/// The generation the agent last fully applied, beside the desired state:
/// after a restart only an applied generation's containers count as
/// settled, so a deploy cut short is finished, not reported as drift.
const APPLIED_FILE: &str = "applied-generation";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
pub struct DesiredStore {
    path: PathBuf,
}

impl DesiredStore {
    pub fn new(state_dir: &Path) -> Self {
        DesiredStore {
            path: state_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)` when nothing was ever stored.
    pub fn load(&self) -> Result<Option<DesiredState>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let desired: Desired =
            drover_shared::decode(&bytes).map_err(|source| StoreError::Decode {
                path: self.path.clone(),
                source,
            })?;
        Ok(Some(desired.state))
    }

    /// Writes a temporary file and renames it over the old one, so a power
    /// cut leaves either the old or the new state, never half of one.
    pub fn save(&self, state: &DesiredState) -> Result<(), StoreError> {
        let bytes = drover_shared::encode(&Desired {
            state: state.clone(),
        });
        write_atomically(&self.path, &bytes)
    }

    fn applied_path(&self) -> PathBuf {
        self.path.with_file_name(APPLIED_FILE)
    }

    /// The generation last applied; `None` when never recorded or unreadable
    /// (then nothing counts as settled, which only costs an extra pass).
    pub fn load_applied(&self) -> Option<u64> {
        std::fs::read_to_string(self.applied_path())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the directory takes a write (and leaves nothing behind).
    pub fn probe(&self) -> Result<(), StoreError> {
        let probe = self.path.with_file_name(".write-probe");
        write_atomically(&probe, b"ok")?;
        std::fs::remove_file(&probe).map_err(|source| StoreError::Write {
            path: probe,
            source,
        })
    }

    pub fn save_applied(&self, generation: u64) -> Result<(), StoreError> {
        write_atomically(&self.applied_path(), generation.to_string().as_bytes())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_file(path, bytes, None).map_err(|source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` through a synced temporary file and a rename,
/// so a crash leaves the old file or the new one, never half of one. With
/// `mode` the file is created with exactly those permissions (0600 for
/// secrets) and never exists with wider ones.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover from a crash may have other permissions; a mode only
    // applies to a file that is created.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if let Some(mode) = mode {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp)?;
    let written = (|| {
        #[cfg(unix)]
        if let Some(mode) = mode {
            // The process umask may have narrowed it; never widened.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // A full disk fails the write after the create: never leave the
        // (empty or partial) temporary file behind.
        drop(f);
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::model::{AppSpec, ContainerSpec, DesiredApp, RunState};
    use drover_shared::Name;

    fn state(generation: u64) -> DesiredState {
        let name = |s: &str| Name::new(s).expect("valid name");
        DesiredState {
            generation,
            apps: vec![DesiredApp {
                spec: AppSpec {
                    name: name("web"),
                    containers: vec![ContainerSpec {
                        name: name("main"),
                        image: "localtest/busybox:1".into(),
                        command: None,
                        env: Default::default(),
                        ports: vec![],
                        volumes: vec![],
                        restart: Default::default(),
                        memory_mb: Some(32),
                        cpus: None,
                        privileged: false,
                        network_mode: Default::default(),
                        cap_add: vec![],
                        devices: vec![],
                        host_mounts: vec![],
                        healthcheck: None,
                        depends_on: vec![],
                    }],
                    labels: Default::default(),
                },
                run: RunState::Running,
                started_at: 1,
                release: 0,
                restarted_at: 0,
            }],
            agent: None,
        }
    }

    #[test]
    fn nothing_stored_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(DesiredStore::new(dir.path()).load().expect("loads"), None);
    }

    #[test]
    fn saved_state_loads_back_and_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DesiredStore::new(dir.path());
        store.save(&state(3)).expect("saves");
        assert_eq!(store.load().expect("loads"), Some(state(3)));
        store.save(&state(4)).expect("saves again");
        assert_eq!(store.load().expect("loads"), Some(state(4)));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("lists").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn the_applied_generation_is_kept_beside_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DesiredStore::new(dir.path());
        assert_eq!(store.load_applied(), None);
        store.save_applied(7).expect("saves");
        assert_eq!(store.load_applied(), Some(7));
        std::fs::write(dir.path().join(APPLIED_FILE), b"junk").expect("write");
        assert_eq!(
            store.load_applied(),
            None,
            "unreadable means nothing settled"
        );
    }

    #[test]
    fn a_corrupt_file_is_a_decode_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DesiredStore::new(dir.path());
        std::fs::write(store.path(), b"garbage").expect("write");
        assert!(matches!(store.load(), Err(StoreError::Decode { .. })));
    }

    #[test]
    fn a_write_that_fails_after_the_temporary_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DesiredStore::new(dir.path());
        // A directory where the file should go: the temporary file is
        // created and written, the rename onto it fails.
        std::fs::create_dir(store.path()).expect("mkdir");
        std::fs::write(store.path().join("keep"), b"x").expect("write");
        let err = store.save(&state(1)).expect_err("rename fails");
        assert!(matches!(err, StoreError::Write { .. }), "{err:?}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("lists")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![FILE_NAME.to_string()], "no temporary file left");
    }

    #[test]
    fn an_unwritable_location_is_a_write_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DesiredStore::new(&dir.path().join("missing-subdir"));
        assert!(matches!(
            store.save(&state(1)),
            Err(StoreError::Write { .. })
        ));
    }
}
