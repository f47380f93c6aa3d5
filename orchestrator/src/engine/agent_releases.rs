//! Agent releases: uploaded agent binaries, stored as files
//! (`<data-dir>/agent-binaries/<digest>`, written to a temporary file and
//! renamed) with a record each in redb (table `agent_releases`), and the
//! task that serves them to devices in chunks over MQTT ([`BlobServer`]).
//! The command path uploads, lists and deletes them (`engine::commands`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use drover_shared::topic::TopicKind;
use drover_shared::update::{is_digest, validate_version, BlobChunk, FetchRequest};
use drover_shared::{encode, DeviceId};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tracing::{debug, info, warn};

use super::{CommandError, Outbox};
use crate::core::agent_releases::{chunk, elf_arch, MAX_BINARY_BYTES};
use crate::core::records::AgentReleaseRecord;
use crate::metrics::Metrics;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoreError, Write};

/// Fetches waiting for a reader; more are dropped (the device asks again).
const FETCH_QUEUE: usize = 64;
/// Chunks read from disk at once, for all devices together.
const FETCHES_IN_FLIGHT: usize = 8;

pub struct AgentReleases {
    dir: PathBuf,
    writer: StoreWriter,
    records: RwLock<BTreeMap<String, AgentReleaseRecord>>,
    /// Serialises uploads and deletions so files, table and memory agree.
    changing: Mutex<()>,
}

impl AgentReleases {
    /// Reads the records; the directory is made on the first upload.
    pub fn load(
        store: &Store,
        writer: StoreWriter,
        data_dir: &Path,
    ) -> Result<AgentReleases, StoreError> {
        let records = store
            .agent_releases()?
            .into_iter()
            .map(|r| (r.digest.clone(), r))
            .collect();
        Ok(AgentReleases {
            dir: data_dir.join("agent-binaries"),
            writer,
            records: RwLock::new(records),
            changing: Mutex::new(()),
        })
    }

    /// Every release, oldest first.
    pub fn list(&self) -> Vec<AgentReleaseRecord> {
        let mut all: Vec<_> = self
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| (a.release, &a.arch).cmp(&(b.release, &b.arch)));
        all
    }

    pub fn get(&self, digest: &str) -> Option<AgentReleaseRecord> {
        self.records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    /// The binaries uploaded as `version`, one per architecture.
    pub fn version(&self, version: &str) -> Vec<AgentReleaseRecord> {
        self.list()
            .into_iter()
            .filter(|r| r.version == version)
            .collect()
    }

    /// Where a release's file is. Only for a digest that passed
    /// [`is_digest`] (64 hex digits: no `/`, no `..`).
    fn path(&self, digest: &str) -> PathBuf {
        debug_assert!(is_digest(digest));
        self.dir.join(digest)
    }

    /// Checks and stores an uploaded binary: a Linux ELF executable for an
    /// architecture the agent is built for, under a valid version, not a
    /// second binary of that version for the same architecture. Stored
    /// (file, then record) before it counts.
    pub async fn upload(
        &self,
        version: String,
        binary: Bytes,
        by: String,
    ) -> Result<AgentReleaseRecord, CommandError> {
        validate_version(&version).map_err(|m| CommandError::invalid("version", m))?;
        if binary.is_empty() {
            return Err(CommandError::invalid("body", "the body is empty"));
        }
        if binary.len() > MAX_BINARY_BYTES {
            return Err(CommandError::invalid(
                "body",
                format!("the binary is larger than {MAX_BINARY_BYTES} bytes"),
            ));
        }
        let arch = elf_arch(&binary).map_err(|e| CommandError::invalid("body", e.0))?;
        let hashed = binary.clone();
        let digest = tokio::task::spawn_blocking(move || {
            drover_shared::update::hex(&Sha256::digest(&hashed))
        })
        .await
        .map_err(|e| CommandError::Internal(e.to_string()))?;
        let _g = self.changing.lock().await;
        let release = {
            let map = self.records.read().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = map.get(&digest) {
                return Err(CommandError::Conflict {
                    field: Some("body".into()),
                    message: format!(
                        "this binary is already uploaded, as version {} ({})",
                        r.version, r.arch
                    ),
                });
            }
            if let Some(r) = map
                .values()
                .find(|r| r.version == version && r.arch == arch)
            {
                return Err(CommandError::Conflict {
                    field: Some("version".into()),
                    message: format!(
                        "version {version} already has an {arch} binary ({}); delete it first or upload under another version",
                        r.digest
                    ),
                });
            }
            map.values()
                .find(|r| r.version == version)
                .map(|r| r.release)
                .unwrap_or_else(|| map.values().map(|r| r.release).max().unwrap_or(0) + 1)
        };
        let (dir, path) = (self.dir.clone(), self.path(&digest));
        tokio::task::spawn_blocking(move || write_file(&dir, &path, &binary))
            .await
            .map_err(|e| CommandError::Internal(e.to_string()))?
            .map_err(|e| {
                warn!(error = %e, "could not store an agent binary");
                CommandError::Internal(format!("the binary could not be stored: {e}"))
            })?;
        let record = AgentReleaseRecord {
            version,
            release,
            arch: arch.to_string(),
            digest: digest.clone(),
            size: binary_len(&self.path(&digest))?,
            uploaded_by: by,
            created_ms: crate::clock::now_ms(),
        };
        if let Err(e) = self
            .writer
            .persist(vec![Write::AgentRelease(record.clone())])
            .await
        {
            let _ = std::fs::remove_file(self.path(&digest));
            return Err(stored(&e));
        }
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, record.clone());
        info!(version = %record.version, arch = %record.arch, digest = %record.digest, size = record.size, "agent release uploaded");
        Ok(record)
    }

    /// Deletes a release's record and file. `in_use` names what still
    /// refers to it (devices told to run it, rollouts), asked under the
    /// lock that uploads and deletions take.
    pub async fn delete(&self, digest: &str, in_use: &[String]) -> Result<(), CommandError> {
        if !is_digest(digest) {
            return Err(CommandError::invalid(
                "digest",
                "a digest is 64 lowercase hex digits (SHA-256)",
            ));
        }
        let _g = self.changing.lock().await;
        if self.get(digest).is_none() {
            return Err(CommandError::not_found(
                "digest",
                format!("no agent release has digest {digest}"),
            ));
        }
        if !in_use.is_empty() {
            return Err(CommandError::Conflict {
                field: Some("digest".into()),
                message: format!("agent release {digest} is in use by {}", in_use.join(", ")),
            });
        }
        self.writer
            .persist(vec![Write::DeleteAgentRelease(digest.to_string())])
            .await
            .map_err(|e| stored(&e))?;
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        if let Err(e) = std::fs::remove_file(self.path(digest)) {
            warn!(%digest, error = %e, "agent binary file not removed");
        }
        Ok(())
    }

    /// The answer to one fetch: the chunk, or why not.
    async fn answer(&self, req: FetchRequest) -> BlobChunk {
        let mut out = BlobChunk {
            // Echoed so the device can match it; a non-digest is cut short.
            digest: req.digest.chars().take(64).collect(),
            offset: req.offset,
            total: 0,
            data: Vec::new(),
            error: None,
        };
        if !is_digest(&req.digest) {
            out.error = Some("digest: not a SHA-256 digest (64 lowercase hex digits)".into());
            return out;
        }
        let Some(rec) = self.get(&req.digest) else {
            out.error = Some(format!(
                "digest: no agent release has digest {}",
                req.digest
            ));
            return out;
        };
        out.total = rec.size;
        let range = match chunk(rec.size, req.offset, req.len) {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        };
        match read_range(&self.path(&rec.digest), range).await {
            Ok(data) => out.data = data,
            Err(e) => {
                warn!(digest = %rec.digest, error = %e, "agent binary not readable");
                out.error = Some("the orchestrator could not read the binary".into());
            }
        }
        out
    }
}

fn stored(e: &StoreError) -> CommandError {
    tracing::error!(error = %e, "store failure");
    CommandError::Internal("the change could not be stored; nothing was changed".into())
}

fn binary_len(path: &Path) -> Result<u64, CommandError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| CommandError::Internal(format!("the stored binary is not readable: {e}")))
}

/// Writes `bytes` to `path` through a temporary file in the same
/// directory and a rename, so a reader never sees half a binary.
fn write_file(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".upload-{}", uuid::Uuid::new_v4()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn read_range(path: &Path, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(std::io::SeekFrom::Start(range.start)).await?;
    let mut data = vec![0; usize::try_from(range.end - range.start).unwrap_or(0)];
    f.read_exact(&mut data).await?;
    Ok(data)
}

/// Serves fetches off the engine: the engine hands each one over without
/// waiting ([`BlobServer::offer`]); at most [`FETCHES_IN_FLIGHT`] chunks
/// are read at once, [`FETCH_QUEUE`] wait, and the rest are dropped.
#[derive(Clone)]
pub struct BlobServer {
    tx: mpsc::Sender<(DeviceId, FetchRequest)>,
    metrics: Arc<Metrics>,
}

impl BlobServer {
    /// Starts the task; it ends when every `BlobServer` is dropped.
    pub fn spawn(
        releases: Arc<AgentReleases>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
    ) -> BlobServer {
        let (tx, mut rx) = mpsc::channel::<(DeviceId, FetchRequest)>(FETCH_QUEUE);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(FETCHES_IN_FLIGHT));
            while let Some((device, req)) = rx.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (releases, outbox) = (releases.clone(), outbox.clone());
                tokio::spawn(async move {
                    let answer = releases.answer(req).await;
                    if let Some(e) = &answer.error {
                        debug!(%device, error = %e, "fetch refused");
                    }
                    outbox.publish(&device, TopicKind::Blob, encode(&answer));
                    drop(permit);
                });
            }
        });
        BlobServer { tx, metrics }
    }

    /// Hands a fetch to the task; dropped (and counted) when it is busy.
    pub fn offer(&self, device: DeviceId, req: FetchRequest) {
        if self.tx.try_send((device, req)).is_err() {
            self.metrics.mqtt_rejected.inc();
            debug!("fetch dropped: the blob server is busy");
        }
    }
}
