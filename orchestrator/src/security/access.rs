//! REST API tokens, and the audit log.
//!
//! A token stands for an [`Actor`] with a role (viewer, operator, admin);
//! which role a command needs is the command's own property
//! (`core::command::CommandKind::required_role`). Only token digests are
//! stored.
//!
//! The audit log (redb, newest [`AUDIT_KEEP`] kept) holds every command
//! that ran or failed and every refused request: who, what, when, outcome.
//! `engine::commands` writes it for commands; the HTTP adapter for requests
//! refused before they became one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use drover_shared::Name;
use tracing::{info, warn};

use crate::clock::now_ms;
use crate::contract::{AuditOutcome, Role};
use crate::core::command::{Actor, CommandKind, ANONYMOUS_ACTOR, INVALID_TOKEN_ACTOR};
use crate::core::records::{ApiTokenRecord, AuditRecord, SessionRecord};
use crate::security::secret;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoreError, Write};

/// Prefix of API tokens: `at.<id>.<secret>`.
pub const API_TOKEN_PREFIX: &str = "at";
/// Prefix of console session cookies: `ds.<id>.<secret>`.
pub const SESSION_PREFIX: &str = "ds";
/// How long a console sign-in lasts.
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// Sign-ins kept at most; the oldest goes first.
pub const SESSIONS_KEPT: usize = 10_000;
/// Audit records kept; older ones are dropped as new ones arrive.
pub const AUDIT_KEEP: u64 = 100_000;
/// The file `serve` writes the first admin token to, in its data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Invalid(String),
    /// Token names are the audit log's "who": each names one token.
    #[error("an API token named {0} already exists; the audit log tells tokens apart by name")]
    NameTaken(String),
    #[error(
        "{0:?} is what the audit log calls requests without a valid token; choose another name"
    )]
    NameReserved(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
}

pub struct Access {
    store: Store,
    writer: StoreWriter,
    tokens: RwLock<HashMap<String, ApiTokenRecord>>,
    sessions: RwLock<HashMap<String, SessionRecord>>,
    changes: tokio::sync::Mutex<()>,
    /// Held while an audit record takes its sequence number and is queued,
    /// so records are stored in sequence order; not while it is stored.
    audit_lock: tokio::sync::Mutex<()>,
    audit_seq: AtomicU64,
}

impl Access {
    pub fn load(store: Store, writer: StoreWriter) -> Result<Access, StoreError> {
        let tokens = store
            .api_tokens()?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        let seq = store.last_audit_seq()?;
        let now = now_ms();
        // Expired sign-ins are dropped from memory here and from the file
        // with the next sign-in or sign-out.
        let sessions = store
            .sessions()?
            .into_iter()
            .filter(|s| s.expires_at_ms > now)
            .map(|s| (s.id.clone(), s))
            .collect();
        Ok(Access {
            store,
            writer,
            tokens: RwLock::new(tokens),
            sessions: RwLock::new(sessions),
            changes: tokio::sync::Mutex::new(()),
            audit_lock: tokio::sync::Mutex::new(()),
            audit_seq: AtomicU64::new(seq),
        })
    }

    async fn persist(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.writer.persist(writes).await
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, ApiTokenRecord>> {
        self.tokens.read().unwrap_or_else(|e| e.into_inner())
    }

    /// On a store with no admin token, creates one and writes it to
    /// `<data_dir>/admin.token` (mode 0600). Returns the file's path when
    /// it did. The token never goes to the log.
    pub async fn bootstrap_admin(&self, data_dir: &Path) -> Result<Option<PathBuf>, AccessError> {
        if self.read().values().any(|t| t.role == Role::Admin) {
            return Ok(None);
        }
        let name = Name::new("admin").map_err(|e| AccessError::Invalid(e.to_string()))?;
        let (_, token) = self.create_token("bootstrap", name, Role::Admin).await?;
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        write_private(&path, format!("{token}\n").as_bytes()).map_err(|source| {
            AccessError::TokenFile {
                path: path.display().to_string(),
                source,
            }
        })?;
        info!(path = %path.display(), "created the first admin API token");
        Ok(Some(path))
    }

    /// A new token; the returned string is its only copy.
    pub async fn create_token(
        &self,
        created_by: &str,
        name: Name,
        role: Role,
    ) -> Result<(ApiTokenRecord, String), AccessError> {
        if [ANONYMOUS_ACTOR, INVALID_TOKEN_ACTOR].contains(&name.as_str()) {
            return Err(AccessError::NameReserved(name.as_str().to_string()));
        }
        let _g = self.changes.lock().await;
        if self.read().values().any(|t| t.name == name) {
            return Err(AccessError::NameTaken(name.as_str().to_string()));
        }
        let id = secret::short_id();
        let s = secret::generate();
        let rec = ApiTokenRecord {
            id: id.clone(),
            name,
            role,
            secret_digest: secret::digest(&s),
            created_at_ms: now_ms(),
            created_by: created_by.to_string(),
        };
        self.persist(vec![Write::ApiToken(rec.clone())]).await?;
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), rec.clone());
        Ok((rec, secret::join_token(API_TOKEN_PREFIX, &id, &s)))
    }

    pub fn tokens(&self) -> Vec<ApiTokenRecord> {
        let mut v: Vec<_> = self.read().values().cloned().collect();
        v.sort_by_key(|t| t.created_at_ms);
        v
    }

    /// Revokes a token. The last admin token cannot be revoked, so the
    /// API can never lock everyone out.
    pub async fn delete_token(&self, id: &str) -> Result<bool, AccessError> {
        let _g = self.changes.lock().await;
        let Some(rec) = self.read().get(id).cloned() else {
            return Ok(false);
        };
        if rec.role == Role::Admin
            && self
                .read()
                .values()
                .filter(|t| t.role == Role::Admin)
                .count()
                == 1
        {
            return Err(AccessError::Invalid(
                "this is the last admin token; create another admin token first".into(),
            ));
        }
        self.persist(vec![Write::DeleteApiToken(id.to_string())])
            .await?;
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(true)
    }

    /// Signs in with an API token: a new session, its cookie value (the
    /// only copy of its secret) and the actor it stands for. `None` for a
    /// token that is not valid.
    pub async fn create_session(
        &self,
        token: &str,
    ) -> Result<Option<(SessionRecord, String, Actor)>, AccessError> {
        let Some(actor) = self.authenticate(token) else {
            return Ok(None);
        };
        let Some((token_id, _)) = secret::split_token(token, API_TOKEN_PREFIX) else {
            return Ok(None);
        };
        let now = now_ms();
        let id = secret::short_id();
        let s = secret::generate();
        let rec = SessionRecord {
            id: id.clone(),
            secret_digest: secret::digest(&s),
            token_id: token_id.to_string(),
            csrf: secret::generate(),
            created_at_ms: now,
            expires_at_ms: now + SESSION_TTL_MS,
        };
        let _g = self.changes.lock().await;
        // Expired ones go, and the oldest beyond the bound.
        let mut drop: Vec<String> = {
            let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            let mut live: Vec<(&u64, &String)> = sessions
                .values()
                .filter(|s| s.expires_at_ms > now)
                .map(|s| (&s.created_at_ms, &s.id))
                .collect();
            live.sort();
            let excess = (live.len() + 1).saturating_sub(SESSIONS_KEPT);
            let mut d: Vec<String> = live
                .iter()
                .take(excess)
                .map(|(_, id)| (*id).clone())
                .collect();
            d.extend(
                sessions
                    .values()
                    .filter(|s| s.expires_at_ms <= now)
                    .map(|s| s.id.clone()),
            );
            d
        };
        drop.sort();
        drop.dedup();
        let mut writes: Vec<Write> = drop.iter().cloned().map(Write::DeleteSession).collect();
        writes.push(Write::Session(rec.clone()));
        self.persist(writes).await?;
        let mut sessions = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        for d in &drop {
            sessions.remove(d);
        }
        sessions.insert(id.clone(), rec.clone());
        Ok(Some((
            rec,
            secret::join_token(SESSION_PREFIX, &id, &s),
            actor,
        )))
    }

    /// The actor a session cookie stands for and the session (for its CSRF
    /// value), while it is unexpired and its API token still exists.
    pub fn session(&self, cookie: &str) -> Option<(Actor, SessionRecord)> {
        let (id, s) = secret::split_token(cookie, SESSION_PREFIX)?;
        let rec = self
            .sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()?;
        if !secret::verify(s, &rec.secret_digest) || rec.expires_at_ms <= now_ms() {
            return None;
        }
        let tokens = self.read();
        let t = tokens.get(&rec.token_id)?;
        Some((
            Actor::ApiToken {
                name: t.name.as_str().to_string(),
                role: t.role,
            },
            rec,
        ))
    }

    /// Whether `presented` is the session's CSRF value, in constant time.
    pub fn csrf_matches(&self, session: &SessionRecord, presented: &str) -> bool {
        secret::verify(presented, &secret::digest(&session.csrf))
    }

    /// Signs out.
    pub async fn delete_session(&self, id: &str) -> Result<(), AccessError> {
        let _g = self.changes.lock().await;
        self.persist(vec![Write::DeleteSession(id.to_string())])
            .await?;
        self.sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// The actor a bearer token stands for, if it is a valid token.
    pub fn authenticate(&self, token: &str) -> Option<Actor> {
        let (id, s) = secret::split_token(token, API_TOKEN_PREFIX)?;
        let tokens = self.read();
        let rec = tokens.get(id)?;
        secret::verify(s, &rec.secret_digest).then(|| Actor::ApiToken {
            name: rec.name.as_str().to_string(),
            role: rec.role,
        })
    }

    /// Appends to the audit log. A failure to store is logged and counted
    /// by the store writer's caller; the request itself has already run.
    pub async fn audit(
        &self,
        actor: &Actor,
        action: String,
        command: Option<CommandKind>,
        outcome: AuditOutcome,
        status: Option<u16>,
        detail: String,
    ) {
        // The sequence number is taken and the record queued under the
        // lock (the writer commits in queue order); the wait for the fsync
        // is outside it, so concurrent requests share one commit. A record
        // that fails to store leaves a gap in the sequence, never a reuse.
        let stored = {
            let _g = self.audit_lock.lock().await;
            let seq = self.audit_seq.fetch_add(1, Ordering::Relaxed) + 1;
            let record = AuditRecord {
                seq,
                at_ms: now_ms(),
                actor: actor.name(),
                role: actor
                    .role()
                    .filter(|_| matches!(actor, Actor::ApiToken { .. } | Actor::Automation { .. })),
                action,
                command: command.map(|c| c.name().to_string()),
                outcome,
                status,
                detail,
            };
            let prune_to = seq.checked_sub(AUDIT_KEEP).filter(|p| *p > 0);
            self.writer
                .submit(vec![Write::Audit { record, prune_to }])
                .await
        };
        if let Err(e) = stored.await {
            // The writer keeps it and commits it once the store works again
            // (`store::writer`, AUDIT_RETRY).
            warn!(error = %e, "audit record not stored yet; kept until the store can be written");
        }
    }

    /// Newest first.
    pub async fn audit_log(
        &self,
        limit: usize,
        actor: Option<String>,
        outcome: Option<AuditOutcome>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store.audit(limit, |r| {
                actor.as_deref().is_none_or(|a| r.actor == a)
                    && outcome.is_none_or(|o| r.outcome == o)
            })
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Db(format!("store task failed: {e}"))))
    }
}

/// Creates `dir` (and missing parents) readable by its owner only. The data
/// directory holds the redb file, with registry passwords in clear, and
/// the admin token: the process's umask would usually leave them readable
/// by every local user. An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Writes a file only its owner can read, replacing any previous one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(store: &Store) -> StoreWriter {
        StoreWriter::spawn(store.clone(), std::sync::Arc::default())
    }

    #[tokio::test]
    async fn tokens_authenticate_by_role_and_the_last_admin_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("d.redb")).expect("store");
        let access = Access::load(store.clone(), writer(&store)).expect("load");
        let path = access
            .bootstrap_admin(dir.path())
            .await
            .expect("bootstrap")
            .expect("created");
        let admin = std::fs::read_to_string(&path).expect("token file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let c = access
            .authenticate(admin.trim())
            .expect("admin authenticates");
        assert_eq!(c.role(), Some(Role::Admin));
        assert!(access
            .bootstrap_admin(dir.path())
            .await
            .expect("again")
            .is_none());
        let (rec, viewer) = access
            .create_token("admin", Name::new("v").expect("n"), Role::Viewer)
            .await
            .expect("viewer");
        assert_eq!(
            access.authenticate(&viewer).and_then(|c| c.role()),
            Some(Role::Viewer)
        );
        assert!(access
            .authenticate(&viewer.replace("at.", "at.x"))
            .is_none());
        assert!(access.authenticate("").is_none());
        for (taken, err) in [("v", "already exists"), ("anonymous", "audit log calls")] {
            let e = access
                .create_token("admin", Name::new(taken).expect("n"), Role::Admin)
                .await
                .expect_err("name refused");
            assert!(e.to_string().contains(err), "{e}");
        }
        assert!(access.delete_token(&rec.id).await.expect("deleted"));
        assert!(access.authenticate(&viewer).is_none());
        let admin_id = access.tokens()[0].id.clone();
        assert!(
            access.delete_token(&admin_id).await.is_err(),
            "last admin stays"
        );
        // The token digests survive a restart; the tokens themselves are
        // nowhere in the store.
        drop(access);
        let access = Access::load(store.clone(), writer(&store)).expect("reload");
        assert!(access.authenticate(admin.trim()).is_some());
    }

    #[cfg(unix)]
    #[test]
    fn a_new_data_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("a/b");
        create_private_dir(&data).expect("created");
        let mode = std::fs::metadata(&data).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "data dir mode {mode:o}");
        create_private_dir(&data).expect("an existing one is fine");
    }

    #[tokio::test]
    async fn audit_log_is_newest_first_and_filterable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("d.redb")).expect("store");
        let access = Access::load(store.clone(), writer(&store)).expect("load");
        access
            .audit(
                &Actor::ApiToken {
                    name: "a".into(),
                    role: Role::Admin,
                },
                "POST /x".into(),
                Some(CommandKind::CreateApp),
                AuditOutcome::Ok,
                Some(200),
                String::new(),
            )
            .await;
        access
            .audit(
                &Actor::Unauthenticated {
                    presented_token: false,
                },
                "POST /y".into(),
                None,
                AuditOutcome::Denied,
                Some(401),
                String::new(),
            )
            .await;
        let all = access.audit_log(10, None, None).await.expect("log");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].action, "POST /y");
        assert_eq!(all[1].command.as_deref(), Some("app.create"));
        assert!(all[0].seq > all[1].seq);
        let denied = access
            .audit_log(10, None, Some(AuditOutcome::Denied))
            .await
            .expect("log");
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].actor, "anonymous");
    }
}
