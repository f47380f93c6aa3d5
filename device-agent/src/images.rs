//! The images this agent pulled, and which of them to clean up.
//!
//! Only images the agent pulled itself are ever removed: an image that was
//! on the device before (preloaded, pulled by a person, used by another
//! tool) is not the agent's to delete. The ledger lives in
//! `<state-dir>/images.json`, written by temp file and rename.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "images.json";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode {path}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    pub pulled_at_ms: u64,
    /// When a desired app last referenced it (at least the pull time).
    pub last_used_ms: u64,
    /// Apps whose previous release runs on this image and whose new one is
    /// not running and healthy yet: kept, so a rollback needs no registry.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub held_for: BTreeSet<String>,
}

impl PulledImage {
    pub fn new(at_ms: u64) -> Self {
        PulledImage {
            pulled_at_ms: at_ms,
            last_used_ms: at_ms,
            held_for: BTreeSet::new(),
        }
    }
}

/// Reference → record. `path: None` keeps it in memory only (unit tests).
#[derive(Debug, Default)]
pub struct ImageLedger {
    path: Option<PathBuf>,
    pub images: BTreeMap<String, PulledImage>,
}

#[derive(Serialize, Deserialize)]
struct File {
    images: BTreeMap<String, PulledImage>,
}

impl ImageLedger {
    pub fn in_memory() -> Self {
        ImageLedger::default()
    }

    /// Loads `<state_dir>/images.json`; a missing file is an empty ledger.
    pub fn load(state_dir: &Path) -> Result<Self, LedgerError> {
        let path = state_dir.join(FILE_NAME);
        let images = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<File>(&bytes)
                    .map_err(|source| LedgerError::Decode {
                        path: path.clone(),
                        source,
                    })?
                    .images
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(LedgerError::Read { path, source }),
        };
        Ok(ImageLedger {
            path: Some(path),
            images,
        })
    }

    /// An empty ledger that saves to `<state_dir>/images.json`, for when the
    /// old file could not be read.
    pub fn empty_at(state_dir: &Path) -> Self {
        ImageLedger {
            path: Some(state_dir.join(FILE_NAME)),
            images: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The bytes to save, or `None` for an in-memory ledger.
    pub fn snapshot(&self) -> Option<(PathBuf, Vec<u8>)> {
        let path = self.path.clone()?;
        let bytes = serde_json::to_vec_pretty(&File {
            images: self.images.clone(),
        })
        .unwrap_or_default();
        Some((path, bytes))
    }
}

/// Writes a snapshot by temp file and rename, so a power cut leaves the old
/// or the new ledger. Blocking: run it off the executor.
pub fn write_snapshot(path: &Path, bytes: &[u8]) -> Result<(), LedgerError> {
    // Through the one atomic writer, which leaves no temporary file behind
    // on a full disk.
    crate::store::write_file(path, bytes, None).map_err(|source| LedgerError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Which pulled images to remove now: those no desired app references, no
/// container (of any kind, in any state) uses and no app holds as its
/// previous release's, minus the `keep` most recently used, oldest first,
/// at most `max`.
pub fn select_for_cleanup(
    pulled: &BTreeMap<String, PulledImage>,
    desired: &HashSet<String>,
    in_use: &HashSet<String>,
    keep: usize,
    max: usize,
) -> Vec<String> {
    let mut unused: Vec<(&String, u64)> = pulled
        .iter()
        .filter(|(r, p)| !desired.contains(*r) && !in_use.contains(*r) && p.held_for.is_empty())
        .map(|(r, p)| (r, p.last_used_ms))
        .collect();
    // Most recently used first, ties by name so the choice is stable.
    unused.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut old: Vec<(&String, u64)> = unused.into_iter().skip(keep).collect();
    old.reverse();
    old.into_iter().take(max).map(|(r, _)| r.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pulled(entries: &[(&str, u64)]) -> BTreeMap<String, PulledImage> {
        entries
            .iter()
            .map(|(r, t)| {
                (
                    r.to_string(),
                    PulledImage {
                        last_used_ms: *t,
                        ..PulledImage::new(0)
                    },
                )
            })
            .collect()
    }

    fn set(items: &[&str]) -> HashSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn desired_and_in_use_images_are_never_selected() {
        let p = pulled(&[("a:1", 1), ("b:1", 2), ("c:1", 3), ("d:1", 4)]);
        let got = select_for_cleanup(&p, &set(&["a:1"]), &set(&["c:1"]), 0, 10);
        assert_eq!(got, vec!["b:1", "d:1"]);
    }

    #[test]
    fn an_image_held_for_a_rollback_is_never_selected() {
        let mut p = pulled(&[("v1:1", 1), ("other:1", 2)]);
        if let Some(v1) = p.get_mut("v1:1") {
            v1.held_for.insert("web".into());
        }
        let none = HashSet::new();
        assert_eq!(select_for_cleanup(&p, &none, &none, 0, 10), vec!["other:1"]);
    }

    #[test]
    fn images_not_pulled_by_the_agent_are_never_selected() {
        let p = pulled(&[("mine:1", 1)]);
        let got = select_for_cleanup(&p, &HashSet::new(), &HashSet::new(), 0, 10);
        assert_eq!(got, vec!["mine:1"], "only ledger entries are candidates");
    }

    #[test]
    fn keep_spares_the_most_recently_used_and_max_bounds_a_pass() {
        let p = pulled(&[
            ("old:1", 10),
            ("mid:1", 20),
            ("new:1", 30),
            ("newest:1", 40),
        ]);
        let none = HashSet::new();
        assert_eq!(
            select_for_cleanup(&p, &none, &none, 1, 10),
            vec!["old:1", "mid:1", "new:1"]
        );
        assert_eq!(select_for_cleanup(&p, &none, &none, 2, 1), vec!["old:1"]);
        assert_eq!(
            select_for_cleanup(&p, &none, &none, 10, 10),
            Vec::<String>::new()
        );
        assert_eq!(
            select_for_cleanup(&p, &none, &none, 0, 0),
            Vec::<String>::new()
        );
    }

    #[test]
    fn ledger_round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut l = ImageLedger::load(dir.path()).expect("empty");
        assert!(l.images.is_empty());
        l.images.insert(
            "x:1".into(),
            PulledImage {
                last_used_ms: 6,
                held_for: BTreeSet::from(["web".to_string()]),
                ..PulledImage::new(5)
            },
        );
        let (path, bytes) = l.snapshot().expect("has a path");
        write_snapshot(&path, &bytes).expect("writes");
        let back = ImageLedger::load(dir.path()).expect("loads");
        assert_eq!(back.images, l.images);
        let files: Vec<_> = std::fs::read_dir(dir.path()).expect("lists").collect();
        assert_eq!(files.len(), 1, "no temporary file is left behind");
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(
            ImageLedger::load(dir.path()),
            Err(LedgerError::Decode { .. })
        ));
    }
}
