//! Self-update: the agent replaces its own binary when its desired state
//! names another one (`DesiredState.agent`), and goes back to the previous
//! binary when the new one does not come online.
//!
//! Files under `<state-dir>/agent/`:
//!
//! - `bin/<digest>`: downloaded binaries, checked (size, SHA-256, runs
//!   `--version`), mode 0755. `<digest>.part` while downloading.
//! - `current`: the digest of the binary to run instead of the packaged
//!   one (written by rename). The launcher ([`launch`], first thing in
//!   `main`) executes it. The package's postinst removes it, so a package
//!   upgrade wins over an older self-update.
//! - `pending.json`: an update not yet confirmed (from, to, attempts,
//!   deadline). The new binary confirms it once connected with its hello
//!   sent; the launcher counts starts and rolls back at the third, and the
//!   running binary rolls back at the deadline.
//! - `failed.json`: the digest that failed and why; not tried again until
//!   the desired digest changes.
//!
//! The binary comes over MQTT: `fetch` requests of one chunk each, `blob`
//! answers (see `drover_shared::update`). The process is replaced with
//! `exec` (same process id, same arguments), so systemd and whoever
//! started the agent keep their handle.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_shared::update::{
    is_digest, AgentTarget, AgentUpdatePhase, AgentUpdateStatus, BlobChunk, FetchRequest,
    MAX_CHUNK_BYTES,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::mqtt::Publisher;

/// Set in the environment of a binary this agent executes: the launcher
/// then runs it as it is instead of looking at `current`.
pub const LAUNCHED_ENV: &str = "DROVER_AGENT_LAUNCHED";
/// The packaged binary's path, handed to the binaries it launches so they
/// can go back to it.
pub const PACKAGED_ENV: &str = "DROVER_AGENT_PACKAGED";
/// `pending.json`'s `from`/`to` for the packaged binary.
pub const PACKAGE: &str = "package";
/// The start at which an unconfirmed update is given up.
pub const MAX_ATTEMPTS: u32 = 3;
/// How long a new binary may take to answer `--version`.
const VERSION_CHECK: Duration = Duration::from_secs(10);
/// How long a chunk may take to arrive before it is asked for again.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// Times one chunk is asked for before the download fails.
const CHUNK_TRIES: u32 = 5;

/// How this process runs, for self-update; `None` in `AgentConfig` for an
/// agent that cannot replace itself (the one inside `drover serve`).
#[derive(Debug, Clone)]
pub struct SelfUpdate {
    /// The running binary.
    pub exe: PathBuf,
    /// The packaged binary (where the launcher started from).
    pub packaged: PathBuf,
    /// SHA-256 of the running binary.
    pub digest: String,
    /// The arguments it was started with (without the program name).
    pub args: Vec<OsString>,
    /// An update not confirmed within this is rolled back.
    pub confirm: Duration,
}

impl SelfUpdate {
    /// This process, from `std::env`.
    pub fn of_this_process(confirm: Duration) -> std::io::Result<SelfUpdate> {
        let exe = std::env::current_exe()?;
        let packaged = std::env::var_os(PACKAGED_ENV)
            .filter(|_| std::env::var_os(LAUNCHED_ENV).is_some())
            .map_or_else(|| exe.clone(), PathBuf::from);
        let digest = file_digest(&exe)?;
        Ok(SelfUpdate {
            exe,
            packaged,
            digest,
            args: std::env::args_os().skip(1).collect(),
            confirm,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The digest going back to (or [`PACKAGE`]).
    pub from: String,
    /// The digest being started (or [`PACKAGE`]).
    pub to: String,
    pub attempts: u32,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub digest: String,
    pub reason: String,
}

/// The files under `<state-dir>/agent/`.
#[derive(Debug, Clone)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(state_dir: &Path) -> Files {
        Files {
            dir: state_dir.join("agent"),
        }
    }

    pub fn bin(&self, digest: &str) -> PathBuf {
        self.dir.join("bin").join(digest)
    }

    fn part(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.part"))
    }

    /// The digest `current` names, if it names a valid one.
    pub fn current(&self) -> Option<String> {
        let s = std::fs::read_to_string(self.dir.join("current")).ok()?;
        let s = s.trim();
        is_digest(s).then(|| s.to_string())
    }

    pub fn set_current(&self, digest: Option<&str>) -> std::io::Result<()> {
        match digest {
            Some(d) => write_atomic(&self.dir, "current", d.as_bytes()),
            None => match std::fs::remove_file(self.dir.join("current")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    pub fn pending(&self) -> Option<Pending> {
        read_json(&self.dir.join("pending.json"))
    }

    pub fn set_pending(&self, p: Option<&Pending>) -> std::io::Result<()> {
        set_json(&self.dir, "pending.json", p)
    }

    pub fn failed(&self) -> Option<Failed> {
        read_json(&self.dir.join("failed.json"))
    }

    pub fn set_failed(&self, f: Option<&Failed>) -> std::io::Result<()> {
        set_json(&self.dir, "failed.json", f)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn set_json<T: Serialize>(dir: &Path, name: &str, v: Option<&T>) -> std::io::Result<()> {
    match v {
        Some(v) => write_atomic(dir, name, &serde_json::to_vec(v).unwrap_or_default()),
        None => match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Through the agent's one atomic writer (`store::write_file`: synced,
/// renamed, no temporary file left behind on a full disk).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::store::write_file(&dir.join(name), bytes, None)
}

/// SHA-256 of a file, lowercase hex.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(drover_shared::update::hex(&h.finalize()))
}

// ----- pure decisions ---------------------------------------------------------

/// What the launcher does at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Run as this binary.
    Stay,
    /// Execute `bin/<digest>` (counting the start in `pending.json`).
    Exec(String),
    /// The update in `pending.json` failed to come up: go back.
    Rollback { reason: String },
}

/// The launcher's decision, from `current`, `pending.json` and whether
/// `bin/<current>` exists. Runs only in the packaged binary (not one
/// launched by an agent).
pub fn launch(
    current: Option<&str>,
    own_digest: &str,
    exists: bool,
    pending: Option<&Pending>,
    now_ms: u64,
) -> Launch {
    let Some(cur) = current else {
        return Launch::Stay;
    };
    if cur == own_digest || !exists {
        return Launch::Stay;
    }
    if let Some(p) = pending.filter(|p| p.to == cur) {
        if p.attempts + 1 >= MAX_ATTEMPTS {
            return Launch::Rollback {
                reason: format!(
                    "the new agent binary was started {} times without coming online",
                    p.attempts + 1
                ),
            };
        }
        if now_ms > p.deadline_ms {
            return Launch::Rollback {
                reason: "the new agent binary did not come online before its deadline".into(),
            };
        }
    }
    Launch::Exec(cur.to_string())
}

/// What a desired agent target asks of this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// Download, check and start this binary.
    Update(AgentTarget),
    /// Go back to the packaged binary.
    BackToPackage,
}

/// `own`: the running binary's digest; `self_updated`: it is not the
/// packaged binary; `failed`: the digest given up on.
pub fn plan(
    target: Option<&AgentTarget>,
    own: &str,
    self_updated: bool,
    failed: Option<&str>,
) -> Plan {
    match target {
        None if self_updated && failed != Some(PACKAGE) => Plan::BackToPackage,
        None => Plan::Nothing,
        Some(t) if t.digest == own || failed == Some(t.digest.as_str()) => Plan::Nothing,
        Some(t) if !is_digest(&t.digest) => Plan::Nothing,
        Some(t) => Plan::Update(t.clone()),
    }
}

/// The next chunk to ask for, or `None` when all `size` bytes are in.
pub fn next_fetch(digest: &str, have: u64, size: u64) -> Option<FetchRequest> {
    (have < size).then(|| FetchRequest {
        digest: digest.to_string(),
        offset: have,
        len: (size - have).min(MAX_CHUNK_BYTES),
    })
}

// ----- launcher ---------------------------------------------------------------

/// First thing in `main`, before the state directory is locked: runs the
/// binary `current` names instead of this one, or rolls back an update
/// that keeps failing to come up. Returns when this binary is the one to
/// run (an `exec` that fails is logged and this binary runs).
pub fn launch_at_start(state_dir: &Path) {
    if std::env::var_os(LAUNCHED_ENV).is_some() {
        return;
    }
    let files = Files::new(state_dir);
    let Some(cur) = files.current() else {
        return;
    };
    let Ok(me) = SelfUpdate::of_this_process(Duration::ZERO) else {
        return;
    };
    let pending = files.pending();
    match launch(
        Some(&cur),
        &me.digest,
        files.bin(&cur).exists(),
        pending.as_ref(),
        crate::now_ms(),
    ) {
        Launch::Stay => {}
        Launch::Exec(digest) => {
            if let Some(mut p) = pending.filter(|p| p.to == digest) {
                p.attempts += 1;
                let _ = files.set_pending(Some(&p));
            }
            let err = exec(&files.bin(&digest), &me);
            eprintln!("drover-agent: cannot run {digest}: {err}; running the packaged binary");
        }
        Launch::Rollback { reason } => {
            eprintln!("drover-agent: {reason}; going back to the previous binary");
            if let Some(p) = pending {
                if let Some(err) = roll_back(&files, &p, &reason, &me) {
                    eprintln!("drover-agent: cannot run the previous binary: {err}");
                }
            }
        }
    }
}

/// Replaces this process with `path`, same arguments. Returns only on
/// failure.
fn exec(path: &Path, me: &SelfUpdate) -> std::io::Error {
    std::process::Command::new(path)
        .args(&me.args)
        .env(LAUNCHED_ENV, "1")
        .env(PACKAGED_ENV, &me.packaged)
        .exec()
}

/// Puts `current` back to `p.from`, records `p.to` as failed and runs the
/// previous binary. Returns only on failure.
fn roll_back(files: &Files, p: &Pending, reason: &str, me: &SelfUpdate) -> Option<std::io::Error> {
    let from = (p.from != PACKAGE && files.bin(&p.from).exists()).then_some(p.from.as_str());
    let results = [
        files.set_current(from),
        files.set_failed(Some(&Failed {
            digest: p.to.clone(),
            reason: reason.to_string(),
        })),
        files.set_pending(None),
    ];
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        warn!(error = %e, "rolling back: a file in the state directory could not be written");
    }
    let path = from.map_or_else(|| me.packaged.clone(), |d| files.bin(d));
    Some(exec(&path, me))
}

// ----- the updater task -------------------------------------------------------

/// What the updater tells the agent core.
#[derive(Debug)]
pub enum UpdateEvent {
    /// Progress or failure, for the state report (`None`: nothing to say).
    Status(Option<AgentUpdateStatus>),
    /// The update is confirmed: an `agent_updated` event with this detail.
    Confirmed(String),
    /// Report `restarting`, say goodbye, and [`Exec::run`] this.
    Restart(Exec),
}

/// A binary to replace this process with, once the core has said goodbye.
#[derive(Debug)]
pub struct Exec {
    path: PathBuf,
    me: SelfUpdate,
    pub digest: String,
}

impl Exec {
    /// Replaces the process. Returns only on failure.
    pub fn run(self) -> std::io::Error {
        exec(&self.path, &self.me)
    }
}

/// What the core hands the updater.
#[derive(Debug)]
pub enum UpdateInput {
    /// Connected, with hello sent.
    Online,
    Blob(BlobChunk),
}

/// Follows the desired agent target; downloads, checks and hands over a
/// new binary; confirms an update once online; rolls back one that is not
/// confirmed in time.
pub async fn run(
    me: SelfUpdate,
    state_dir: PathBuf,
    mut target: watch::Receiver<Option<AgentTarget>>,
    mut input: mpsc::Receiver<UpdateInput>,
    publisher: Publisher,
    events: mpsc::Sender<UpdateEvent>,
) {
    let files = Files::new(&state_dir);
    let self_updated = me.exe.starts_with(files.dir.join("bin"));
    // An update that names this binary waits for confirmation.
    let mut pending = files
        .pending()
        .filter(|p| p.to == me.digest || (p.to == PACKAGE && !self_updated));
    if pending.is_none() && files.pending().is_some() {
        // It names a binary that is not running: that one did not come up.
        if let Some(p) = files.pending() {
            let reason = "the new agent binary did not start".to_string();
            let _ = files.set_failed(Some(&Failed {
                digest: p.to,
                reason,
            }));
            let _ = files.set_pending(None);
        }
    }
    let mut failed = files.failed();
    if let Some(f) = &failed {
        let _ = events
            .send(UpdateEvent::Status(Some(AgentUpdateStatus {
                digest: f.digest.clone(),
                phase: AgentUpdatePhase::Failed,
                error: Some(f.reason.clone()),
            })))
            .await;
    }
    loop {
        let deadline = pending.as_ref().map(|p| p.deadline_ms);
        let wait = async {
            match deadline {
                Some(d) => {
                    tokio::time::sleep(Duration::from_millis(d.saturating_sub(crate::now_ms())))
                        .await
                }
                None => std::future::pending().await,
            }
        };
        let want = target.borrow_and_update().clone();
        // The failure stands only while the same digest is asked for.
        if let Some(f) = &failed {
            let still = match &want {
                Some(t) => t.digest == f.digest,
                None => f.digest == PACKAGE,
            };
            if !still && pending.is_none() {
                let _ = files.set_failed(None);
                failed = None;
                let _ = events.send(UpdateEvent::Status(None)).await;
            }
        }
        if pending.is_none() {
            match plan(
                want.as_ref(),
                &me.digest,
                self_updated,
                failed.as_ref().map(|f| f.digest.as_str()),
            ) {
                Plan::Nothing => {}
                Plan::BackToPackage => {
                    info!("desired state names no agent binary; going back to the packaged one");
                    let p = Pending {
                        from: me.digest.clone(),
                        to: PACKAGE.into(),
                        attempts: 0,
                        deadline_ms: crate::now_ms() + me.confirm.as_millis() as u64,
                    };
                    if let Err(e) = files
                        .set_pending(Some(&p))
                        .and_then(|()| files.set_current(None))
                    {
                        warn!(error = %e, "cannot switch back to the packaged binary");
                    } else {
                        let _ = events
                            .send(UpdateEvent::Restart(Exec {
                                path: me.packaged.clone(),
                                me: me.clone(),
                                digest: PACKAGE.into(),
                            }))
                            .await;
                        return;
                    }
                }
                Plan::Update(t) => {
                    match update(&t, &me, &files, &publisher, &mut input, &events, &target).await {
                        Ok(Some(exec)) => {
                            let _ = events.send(UpdateEvent::Restart(exec)).await;
                            return;
                        }
                        Ok(None) => continue,
                        Err(reason) => {
                            warn!(digest = %t.digest, %reason, "agent update failed");
                            let f = Failed {
                                digest: t.digest.clone(),
                                reason: reason.clone(),
                            };
                            let _ = files.set_failed(Some(&f));
                            failed = Some(f);
                            let _ = events
                                .send(UpdateEvent::Status(Some(AgentUpdateStatus {
                                    digest: t.digest,
                                    phase: AgentUpdatePhase::Failed,
                                    error: Some(reason),
                                })))
                                .await;
                        }
                    }
                }
            }
        }
        tokio::select! {
            changed = target.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            msg = input.recv() => match msg {
                None => return,
                Some(UpdateInput::Online) => {
                    if let Some(p) = pending.take() {
                        if let Err(e) = files.set_pending(None) {
                            warn!(error = %e, "cannot record the update as confirmed");
                        }
                        let detail = format!(
                            "running agent binary {} (was {}), confirmed",
                            p.to, p.from
                        );
                        info!(%detail, "agent update confirmed");
                        let _ = events.send(UpdateEvent::Confirmed(detail)).await;
                    }
                }
                Some(UpdateInput::Blob(_)) => {}
            },
            () = wait => {
                if let Some(p) = pending.take() {
                    let reason = "the new agent binary did not come online before its deadline".to_string();
                    warn!(%reason, "rolling back");
                    let files = files.clone();
                    let me = me.clone();
                    let from = (p.from != PACKAGE && files.bin(&p.from).exists()).then(|| p.from.clone());
                    let _ = files.set_current(from.as_deref());
                    let _ = files.set_failed(Some(&Failed { digest: p.to.clone(), reason }));
                    let _ = files.set_pending(None);
                    let path = from.as_deref().map_or_else(|| me.packaged.clone(), |d| files.bin(d));
                    let _ = events
                        .send(UpdateEvent::Restart(Exec { path, me, digest: p.from }))
                        .await;
                    return;
                }
            }
        }
    }
}

async fn status(events: &mpsc::Sender<UpdateEvent>, digest: &str, phase: AgentUpdatePhase) {
    let _ = events
        .send(UpdateEvent::Status(Some(AgentUpdateStatus {
            digest: digest.to_string(),
            phase,
            error: None,
        })))
        .await;
}

/// Downloads, checks and prepares one binary. `Ok(None)`: the target
/// changed meanwhile; `Err`: why it failed.
async fn update(
    t: &AgentTarget,
    me: &SelfUpdate,
    files: &Files,
    publisher: &Publisher,
    input: &mut mpsc::Receiver<UpdateInput>,
    events: &mpsc::Sender<UpdateEvent>,
    target: &watch::Receiver<Option<AgentTarget>>,
) -> Result<Option<Exec>, String> {
    let bin = files.bin(&t.digest);
    if !bin.exists() {
        info!(version = %t.version, digest = %t.digest, size = t.size, "downloading agent binary");
        status(events, &t.digest, AgentUpdatePhase::Downloading).await;
        let done = download(t, files, publisher, input, target).await?;
        if !done {
            return Ok(None);
        }
    }
    status(events, &t.digest, AgentUpdatePhase::Verifying).await;
    check_runs(&bin).await?;
    let from = if me.exe.starts_with(files.dir.join("bin")) {
        me.digest.clone()
    } else {
        PACKAGE.to_string()
    };
    let p = Pending {
        from,
        to: t.digest.clone(),
        attempts: 0,
        deadline_ms: crate::now_ms() + me.confirm.as_millis() as u64,
    };
    files
        .set_pending(Some(&p))
        .and_then(|()| files.set_current(Some(&t.digest)))
        .map_err(|e| format!("cannot record the update in the state directory: {e}"))?;
    info!(version = %t.version, digest = %t.digest, "starting the new agent binary");
    Ok(Some(Exec {
        path: bin,
        me: me.clone(),
        digest: t.digest.clone(),
    }))
}

/// Fetches the chunks one by one into `<digest>.part`, hashing as it
/// writes; checks size and digest; installs it as `bin/<digest>` (0755).
/// `Ok(false)`: the desired target changed meanwhile.
async fn download(
    t: &AgentTarget,
    files: &Files,
    publisher: &Publisher,
    input: &mut mpsc::Receiver<UpdateInput>,
    target: &watch::Receiver<Option<AgentTarget>>,
) -> Result<bool, String> {
    let part = files.part(&t.digest);
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    std::fs::create_dir_all(files.dir.join("bin"))
        .map_err(|e| io("cannot create the binary directory", e))?;
    let mut out = std::fs::File::create(&part).map_err(|e| io("cannot write the download", e))?;
    let mut hash = Sha256::new();
    let mut have = 0u64;
    while let Some(req) = next_fetch(&t.digest, have, t.size) {
        if target.borrow().as_ref().map(|x| &x.digest) != Some(&t.digest) {
            let _ = std::fs::remove_file(&part);
            return Ok(false);
        }
        let mut tries = 0;
        let chunk = loop {
            tries += 1;
            if tries > CHUNK_TRIES {
                let _ = std::fs::remove_file(&part);
                return Err(format!(
                    "no answer for the chunk at offset {have} after {CHUNK_TRIES} tries"
                ));
            }
            // Tries count only while connected: an agent started without
            // its broker waits instead of giving up on the update.
            while !publisher.is_online() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if let Err(e) = publisher.send(&req) {
                warn!(error = %e, "fetch not queued");
            }
            let deadline = tokio::time::Instant::now() + CHUNK_TIMEOUT;
            let got = loop {
                match tokio::time::timeout_at(deadline, input.recv()).await {
                    Err(_) => break None,
                    Ok(None) => return Ok(false),
                    Ok(Some(UpdateInput::Blob(c))) if c.digest == t.digest && c.offset == have => {
                        break Some(c)
                    }
                    Ok(Some(_)) => {}
                }
            };
            if let Some(c) = got {
                break c;
            }
        };
        if let Some(e) = chunk.error {
            let _ = std::fs::remove_file(&part);
            return Err(format!("the orchestrator refused the download: {e}"));
        }
        if chunk.data.is_empty() || chunk.total != t.size || have + chunk.data.len() as u64 > t.size
        {
            let _ = std::fs::remove_file(&part);
            return Err(format!(
                "the orchestrator sent a chunk that does not fit a binary of {} bytes",
                t.size
            ));
        }
        out.write_all(&chunk.data)
            .map_err(|e| io("cannot write the download", e))?;
        hash.update(&chunk.data);
        have += chunk.data.len() as u64;
    }
    out.sync_all()
        .map_err(|e| io("cannot write the download", e))?;
    drop(out);
    let got = drover_shared::update::hex(&hash.finalize());
    if got != t.digest {
        let _ = std::fs::remove_file(&part);
        return Err(format!(
            "the download's SHA-256 is {got}, not the expected {}",
            t.digest
        ));
    }
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))
        .and_then(|()| std::fs::rename(&part, files.bin(&t.digest)))
        .map_err(|e| io("cannot install the download", e))?;
    Ok(true)
}

/// Runs the binary once with `--version`: it must exit 0 within 10 s.
/// Catches a binary for another architecture ("exec format error") or one
/// that does not start at all before anything is swapped.
async fn check_runs(bin: &Path) -> Result<(), String> {
    let child = tokio::process::Command::new(bin)
        .arg("--version")
        .env(LAUNCHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("the new agent binary does not start: {e}"))?;
    match tokio::time::timeout(VERSION_CHECK, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "the new agent binary did not answer --version within {} s",
            VERSION_CHECK.as_secs()
        )),
        Ok(Err(e)) => Err(format!("the new agent binary does not start: {e}")),
        Ok(Ok(out)) if !out.status.success() => Err(format!(
            "the new agent binary's --version check failed ({})",
            out.status
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn pending(to: &str, attempts: u32, deadline_ms: u64) -> Pending {
        Pending {
            from: PACKAGE.into(),
            to: to.into(),
            attempts,
            deadline_ms,
        }
    }

    #[test]
    fn the_launcher_runs_current_until_it_keeps_failing() {
        let (me, new) = (d('a'), d('b'));
        assert_eq!(launch(None, &me, true, None, 0), Launch::Stay);
        assert_eq!(launch(Some(&me), &me, true, None, 0), Launch::Stay);
        assert_eq!(
            launch(Some(&new), &me, false, None, 0),
            Launch::Stay,
            "missing file"
        );
        assert_eq!(
            launch(Some(&new), &me, true, None, 0),
            Launch::Exec(new.clone())
        );
        let p = pending(&new, 1, 100);
        assert_eq!(
            launch(Some(&new), &me, true, Some(&p), 50),
            Launch::Exec(new.clone())
        );
        assert!(matches!(
            launch(Some(&new), &me, true, Some(&pending(&new, 2, 100)), 50),
            Launch::Rollback { .. }
        ));
        assert!(matches!(
            launch(Some(&new), &me, true, Some(&p), 101),
            Launch::Rollback { .. }
        ));
        // A pending update of another binary does not count these starts.
        let other = pending(&d('c'), 5, 0);
        assert_eq!(
            launch(Some(&new), &me, true, Some(&other), 50),
            Launch::Exec(new)
        );
    }

    #[test]
    fn what_a_desired_target_asks_for() {
        let (me, new) = (d('a'), d('b'));
        let t = AgentTarget {
            version: "2".into(),
            digest: new.clone(),
            size: 10,
        };
        assert_eq!(plan(None, &me, false, None), Plan::Nothing);
        assert_eq!(plan(None, &me, true, None), Plan::BackToPackage);
        assert_eq!(plan(None, &me, true, Some(PACKAGE)), Plan::Nothing);
        assert_eq!(plan(Some(&t), &me, false, None), Plan::Update(t.clone()));
        assert_eq!(
            plan(Some(&t), &me, false, Some(&new)),
            Plan::Nothing,
            "failed before"
        );
        assert_eq!(
            plan(Some(&t), &new, true, None),
            Plan::Nothing,
            "already there"
        );
        let bad = AgentTarget {
            digest: "../../bin/sh".into(),
            ..t
        };
        assert_eq!(plan(Some(&bad), &me, false, None), Plan::Nothing);
    }

    #[test]
    fn fetches_walk_the_binary_in_chunks() {
        let size = MAX_CHUNK_BYTES * 2 + 5;
        let mut have = 0;
        let mut asked = Vec::new();
        while let Some(f) = next_fetch("x", have, size) {
            asked.push((f.offset, f.len));
            have += f.len;
        }
        assert_eq!(
            asked,
            vec![
                (0, MAX_CHUNK_BYTES),
                (MAX_CHUNK_BYTES, MAX_CHUNK_BYTES),
                (MAX_CHUNK_BYTES * 2, 5)
            ]
        );
        assert_eq!(next_fetch("x", 0, 0), None);
    }

    #[test]
    fn files_are_written_whole_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Files::new(dir.path());
        assert_eq!(f.current(), None);
        f.set_current(Some(&d('a'))).expect("current");
        assert_eq!(f.current(), Some(d('a')));
        f.set_current(None).expect("remove");
        f.set_current(None).expect("remove twice");
        assert_eq!(f.current(), None);
        let p = pending(&d('b'), 1, 7);
        f.set_pending(Some(&p)).expect("pending");
        assert_eq!(f.pending(), Some(p));
        std::fs::write(dir.path().join("agent/current"), "../../etc/passwd").expect("write");
        assert_eq!(f.current(), None, "never a path from a file's text");
    }
}
