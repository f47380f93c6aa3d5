//! The orchestrator's durable state in one redb file.
//!
//! Values are JSON so a person can inspect a copy of the file with any redb
//! tool. redb is synchronous and allows one writer at a time: callers run
//! these methods on the blocking pool (see `service`), never on the executor.

pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::records::{
    ApiTokenRecord, AppRecord, AuditRecord, AutomationRecord, CredentialRecord, DesiredRecord,
    DeviceRecord, EnrollTokenRecord, OperationRecord,
};
use crate::core::records::{RegistryRecord, RolloutRecord, SessionRecord};

/// Devices by id.
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// App specs by name.
const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
/// Each device's desired state with its generation, by device id.
const DESIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("desired");
/// Every command issued, with its outcome, by operation id.
const OPERATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
/// Device broker credentials (password digests), by device id.
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// Enrollment tokens (secret digests), by token id.
const ENROLL_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("enroll_tokens");
/// Automation broker identities, by name.
const AUTOMATION: TableDefinition<&str, &[u8]> = TableDefinition::new("automation");
/// REST API tokens (secret digests), by token id.
const API_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");
/// The audit log, by sequence number.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Private registry credentials by registry host. The only table with
/// passwords; nothing derived from it is stored elsewhere.
const REGISTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("registries");
/// Rollouts by id: the running ones and the last finished ones
/// (`core::rollout`), each with what it needs to end (`RolloutRecord`).
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// Edge jobs by id (`core::jobs::Job`): the running ones and the last
/// finished ones.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Console sign-ins by id (secret digests only).
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// Rule definitions by name (`contract::Rule`).
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");
/// Agent binaries by digest (`AgentReleaseRecord`); the files are beside
/// the database, in `agent-binaries/`.
const AGENT_RELEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_releases");
/// Rule firings by sequence number, the newest `rules::FIRINGS_KEPT`.
const RULE_FIRINGS: TableDefinition<u64, &[u8]> = TableDefinition::new("rule_firings");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("database error: {0}")]
    Db(String),
    #[error("corrupt record in table {table} under key {key:?}: {source}")]
    Corrupt {
        table: &'static str,
        key: String,
        source: serde_json::Error,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub use crate::core::records::Write;

/// How long after its last failed write the store still reports itself
/// unhealthy.
pub const HEALTH_MEMORY: std::time::Duration = std::time::Duration::from_secs(10);

/// The redb file. Cloned handles share one open database, which
/// [`Store::reopen`] replaces after an I/O error (redb refuses every
/// operation after one until the file is opened again).
#[derive(Clone)]
pub struct Store {
    path: Arc<PathBuf>,
    db: Arc<RwLock<Option<Arc<Database>>>>,
    /// The last failed write: when, and why.
    trouble: Arc<RwLock<Option<(std::time::Instant, String)>>>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Records are plain structs of strings, numbers and maps with string
    // keys; serialising them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Self::open_db(path)?;
        Ok(Store {
            path: Arc::new(path.to_path_buf()),
            db: Arc::new(RwLock::new(Some(Arc::new(db)))),
            trouble: Arc::new(RwLock::new(None)),
        })
    }

    fn open_db(path: &Path) -> Result<Database, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // Create every table up front so reads never see a missing table.
        let tx = db.begin_write()?;
        for t in [
            DEVICES,
            APPS,
            DESIRED,
            OPERATIONS,
            CREDENTIALS,
            ENROLL_TOKENS,
            AUTOMATION,
            API_TOKENS,
            REGISTRIES,
            ROLLOUTS,
            JOBS,
            SESSIONS,
            RULES,
            AGENT_RELEASES,
        ] {
            tx.open_table(t)?;
        }
        tx.open_table(AUDIT)?;
        tx.open_table(RULE_FIRINGS)?;
        tx.commit()?;
        Ok(db)
    }

    /// The open database, for one operation.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Db("the database is being reopened".into()))
    }

    /// Closes and opens the database file again, as redb asks after an I/O
    /// error (a full disk). Waits for operations in flight on the old
    /// handle to end first: redb allows one open handle per file.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if std::time::Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(still) => {
                        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(still);
                        return Err(StoreError::Db(
                            "the database is still in use; cannot reopen it".into(),
                        ));
                    }
                }
            }
        }
        let opened = Self::open_db(&self.path);
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        match opened {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `Err` with the reason while writes fail, and for
    /// [`HEALTH_MEMORY`] after the last failure: on a nearly full disk
    /// small writes may commit while larger ones fail, and health must not
    /// flicker to "ok" in between (for `/healthz`).
    pub fn health(&self) -> Result<(), String> {
        match &*self.trouble.read().unwrap_or_else(|e| e.into_inner()) {
            Some((at, e)) if at.elapsed() < HEALTH_MEMORY => {
                Err(format!("{e} ({} s ago)", at.elapsed().as_secs()))
            }
            _ => Ok(()),
        }
    }

    /// The writer reports a failed write.
    pub(crate) fn write_failed(&self, why: String) {
        *self.trouble.write().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), why));
    }

    /// Whether a write transaction commits now (a probe after a failure).
    pub fn probe(&self) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write()?;
        tx.commit()?;
        Ok(())
    }

    /// Applies writes in one transaction: all or nothing.
    pub fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write()?;
        {
            for w in writes {
                match w {
                    Write::Device(d) => {
                        tx.open_table(DEVICES)?
                            .insert(d.id.as_str(), encode(d).as_slice())?;
                    }
                    Write::App(a) => {
                        tx.open_table(APPS)?
                            .insert(a.spec.name.as_str(), encode(a).as_slice())?;
                    }
                    Write::DeleteApp(name) => {
                        tx.open_table(APPS)?.remove(name.as_str())?;
                    }
                    Write::Desired(d) => {
                        tx.open_table(DESIRED)?
                            .insert(d.device.as_str(), encode(d).as_slice())?;
                    }
                    Write::Operation(o) => {
                        tx.open_table(OPERATIONS)?
                            .insert(o.id.as_str(), encode(o).as_slice())?;
                    }
                    Write::Credential(c) => {
                        tx.open_table(CREDENTIALS)?
                            .insert(c.device.as_str(), encode(c).as_slice())?;
                    }
                    Write::EnrollToken(t) => {
                        tx.open_table(ENROLL_TOKENS)?
                            .insert(t.id.as_str(), encode(t).as_slice())?;
                    }
                    Write::DeleteEnrollToken(id) => {
                        tx.open_table(ENROLL_TOKENS)?.remove(id.as_str())?;
                    }
                    Write::Automation(a) => {
                        tx.open_table(AUTOMATION)?
                            .insert(a.name.as_str(), encode(a).as_slice())?;
                    }
                    Write::DeleteAutomation(name) => {
                        tx.open_table(AUTOMATION)?.remove(name.as_str())?;
                    }
                    Write::ApiToken(t) => {
                        tx.open_table(API_TOKENS)?
                            .insert(t.id.as_str(), encode(t).as_slice())?;
                    }
                    Write::DeleteApiToken(id) => {
                        tx.open_table(API_TOKENS)?.remove(id.as_str())?;
                    }
                    Write::Audit { record, prune_to } => {
                        let mut t = tx.open_table(AUDIT)?;
                        t.insert(record.seq, encode(record).as_slice())?;
                        if let Some(upto) = prune_to {
                            t.retain_in::<u64, _>(..=*upto, |_, _| false)?;
                        }
                    }
                    Write::Registry(r) => {
                        tx.open_table(REGISTRIES)?
                            .insert(r.credential.host.as_str(), encode(r).as_slice())?;
                    }
                    Write::DeleteRegistry(host) => {
                        tx.open_table(REGISTRIES)?.remove(host.as_str())?;
                    }
                    Write::Rollout(r) => {
                        tx.open_table(ROLLOUTS)?
                            .insert(r.rollout.id(), encode(r).as_slice())?;
                    }
                    Write::DeleteRollout(id) => {
                        tx.open_table(ROLLOUTS)?.remove(id.as_str())?;
                    }
                    Write::Job(j) => {
                        tx.open_table(JOBS)?.insert(j.id(), encode(j).as_slice())?;
                    }
                    Write::DeleteJob(id) => {
                        tx.open_table(JOBS)?.remove(id.as_str())?;
                    }
                    Write::Session(r) => {
                        tx.open_table(SESSIONS)?
                            .insert(r.id.as_str(), encode(r).as_slice())?;
                    }
                    Write::DeleteSession(id) => {
                        tx.open_table(SESSIONS)?.remove(id.as_str())?;
                    }
                    Write::Rule(r) => {
                        tx.open_table(RULES)?
                            .insert(r.name.as_str(), encode(r).as_slice())?;
                    }
                    Write::DeleteRule(name) => {
                        tx.open_table(RULES)?.remove(name.as_str())?;
                    }
                    Write::AgentRelease(r) => {
                        tx.open_table(AGENT_RELEASES)?
                            .insert(r.digest.as_str(), encode(r).as_slice())?;
                    }
                    Write::DeleteAgentRelease(digest) => {
                        tx.open_table(AGENT_RELEASES)?.remove(digest.as_str())?;
                    }
                    Write::RuleFiring { firing, prune_to } => {
                        let mut t = tx.open_table(RULE_FIRINGS)?;
                        t.insert(firing.seq, encode(firing).as_slice())?;
                        if let Some(upto) = prune_to {
                            t.retain_in::<u64, _>(..=*upto, |_, _| false)?;
                        }
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load_all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        name: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let table = tx.open_table(def)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let rec = serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                table: name,
                key: k.value().to_string(),
                source,
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// One operation by id, straight from the file.
    pub fn operation(&self, id: &str) -> Result<Option<OperationRecord>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let table = tx.open_table(OPERATIONS)?;
        let Some(v) = table.get(id)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                table: "operations",
                key: id.to_string(),
                source,
            })
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.load_all(DEVICES, "devices")
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.load_all(APPS, "apps")
    }

    pub fn desired(&self) -> Result<Vec<DesiredRecord>, StoreError> {
        self.load_all(DESIRED, "desired")
    }

    pub fn operations(&self) -> Result<Vec<OperationRecord>, StoreError> {
        self.load_all(OPERATIONS, "operations")
    }

    pub fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.load_all(CREDENTIALS, "credentials")
    }

    pub fn enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>, StoreError> {
        self.load_all(ENROLL_TOKENS, "enroll_tokens")
    }

    pub fn automation(&self) -> Result<Vec<AutomationRecord>, StoreError> {
        self.load_all(AUTOMATION, "automation")
    }

    pub fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.load_all(API_TOKENS, "api_tokens")
    }

    /// The newest audit records first, at most `limit`, that `keep` accepts.
    pub fn audit(
        &self,
        limit: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.newest_first(AUDIT, "audit", limit, keep)
    }

    /// The newest records of a table keyed by sequence number first, at
    /// most `limit`, that `keep` accepts (the audit log, rule firings).
    fn newest_first<T: DeserializeOwned>(
        &self,
        def: TableDefinition<u64, &[u8]>,
        name: &'static str,
        limit: usize,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let table = tx.open_table(def)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev() {
            let (k, v) = row?;
            let rec: T =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                    table: name,
                    key: k.value().to_string(),
                    source,
                })?;
            if keep(&rec) {
                out.push(rec);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The highest audit sequence number written so far (0 when empty).
    pub fn last_audit_seq(&self) -> Result<u64, StoreError> {
        let tx = self.db()?.begin_read()?;
        let table = tx.open_table(AUDIT)?;
        let last = table.last()?.map_or(0, |(k, _)| k.value());
        Ok(last)
    }

    pub fn registries(&self) -> Result<Vec<RegistryRecord>, StoreError> {
        self.load_all(REGISTRIES, "registries")
    }

    pub fn rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.load_all(ROLLOUTS, "rollouts")
    }

    pub fn jobs(&self) -> Result<Vec<crate::core::jobs::Job>, StoreError> {
        self.load_all(JOBS, "jobs")
    }

    pub fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.load_all(SESSIONS, "sessions")
    }

    pub fn agent_releases(
        &self,
    ) -> Result<Vec<crate::core::records::AgentReleaseRecord>, StoreError> {
        self.load_all(AGENT_RELEASES, "agent_releases")
    }

    pub fn rules(&self) -> Result<Vec<crate::contract::Rule>, StoreError> {
        self.load_all(RULES, "rules")
    }

    /// The newest rule firings first, at most `limit`, that `keep` accepts.
    pub fn rule_firings(
        &self,
        limit: usize,
        keep: impl Fn(&crate::contract::RuleFiring) -> bool,
    ) -> Result<Vec<crate::contract::RuleFiring>, StoreError> {
        self.newest_first(RULE_FIRINGS, "rule_firings", limit, keep)
    }

    /// The highest rule firing sequence number so far (0 when empty).
    pub fn last_firing_seq(&self) -> Result<u64, StoreError> {
        let tx = self.db()?.begin_read()?;
        let table = tx.open_table(RULE_FIRINGS)?;
        let last = table.last()?.map_or(0, |(k, _)| k.value());
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::*;
    use drover_shared::model::*;
    use drover_shared::{DeviceId, Name};

    #[test]
    fn writes_survive_reopen_and_are_atomic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.redb");
        let spec: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "web", "containers": [{"name": "main", "image": "busybox:1"}]
        }))
        .expect("spec");
        let dev = DeviceId::new("pi").expect("id");
        {
            let s = Store::open(&path).expect("open");
            s.write(&[
                Write::App(AppRecord {
                    spec: spec.clone(),
                    created_at_ms: 1,
                    updated_at_ms: 1,
                    releases: Vec::new(),
                    assignment: None,
                }),
                Write::Desired(DesiredRecord {
                    device: dev.clone(),
                    state: DesiredState {
                        generation: 3,
                        apps: vec![DesiredApp {
                            spec: spec.clone(),
                            run: RunState::Running,
                            started_at: 3,
                            release: 0,
                            restarted_at: 0,
                        }],
                        agent: None,
                    },
                    placement: Default::default(),
                }),
            ])
            .expect("write");
            s.write(&[Write::DeleteApp("nope".into())])
                .expect("deleting a missing key is fine");
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(
            s.apps().expect("apps")[0].spec.name,
            Name::new("web").expect("n")
        );
        let d = s.desired().expect("desired");
        assert_eq!((d[0].device.clone(), d[0].state.generation), (dev, 3));
    }

    #[test]
    fn registry_credentials_are_stored_and_deleted() {
        use crate::core::records::RegistryRecord;
        use drover_shared::payload::RegistryCredential;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.redb");
        let rec = |host: &str| RegistryRecord {
            credential: RegistryCredential {
                host: host.into(),
                username: "robot".into(),
                password: "pw".into(),
            },
            updated_at_ms: 1,
        };
        {
            let s = Store::open(&path).expect("open");
            s.write(&[
                Write::Registry(rec("a.example:5000")),
                Write::Registry(rec("b.example")),
            ])
            .expect("write");
            s.write(&[Write::DeleteRegistry("a.example:5000".into())])
                .expect("delete");
        }
        let s = Store::open(&path).expect("reopen");
        let all = s.registries().expect("registries");
        assert_eq!(all.len(), 1);
        assert_eq!(
            (
                all[0].credential.host.as_str(),
                all[0].credential.password.as_str()
            ),
            ("b.example", "pw")
        );
    }
}
