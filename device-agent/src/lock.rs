//! One agent per state directory.
//!
//! Two agents on one state directory share a device id and credential, so
//! they take over each other's MQTT session again and again, and both
//! write the same desired-state files. An exclusive `flock` on the
//! directory itself, held for the agent's lifetime, refuses the second one
//! before it connects anywhere. The directory is locked rather than a file
//! in it so that a read-only state directory (which the agent must survive)
//! can still be locked. The kernel drops the lock when the process dies,
//! however it dies, so there is no stale lock to clean up.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use tracing::debug;

/// Where the holder writes its process id, for the refusal message only.
const PID_FILE: &str = "agent.pid";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("state directory {path} is in use by another drover-agent{holder}; two agents on one state directory would fight over the device's MQTT session (give each agent its own --state-dir)")]
    Held { path: PathBuf, holder: String },
    #[error("cannot lock state directory {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct StateDirLock {
    _dir: File,
}

/// Takes the exclusive lock on `dir` without waiting.
pub fn acquire(dir: &Path) -> Result<StateDirLock, LockError> {
    let lock_err = |source: std::io::Error| LockError::Lock {
        path: dir.to_path_buf(),
        source,
    };
    let file = File::open(dir).map_err(lock_err)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let holder = std::fs::read_to_string(dir.join(PID_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or_else(String::new, |pid| format!(" (pid {pid})"));
            return Err(LockError::Held {
                path: dir.to_path_buf(),
                holder,
            });
        }
        Err(e) => return Err(lock_err(e.into())),
    }
    // Best effort: only the message of a refused second agent uses it, and
    // a read-only state directory must not stop the agent.
    if let Err(e) = crate::store::write_file(
        &dir.join(PID_FILE),
        std::process::id().to_string().as_bytes(),
        None,
    ) {
        debug!(error = %e, "cannot record the agent's pid in the state directory");
    }
    Ok(StateDirLock { _dir: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = acquire(dir.path()).expect("first lock");
        let err = acquire(dir.path()).expect_err("second lock refused");
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{err:?}");
        assert!(
            text.contains("in use by another drover-agent")
                && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        acquire(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn a_missing_directory_is_a_lock_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = acquire(&dir.path().join("nope")).expect_err("no directory");
        assert!(matches!(err, LockError::Lock { .. }), "{err:?}");
    }
}
