//! `drover rollouts`: create, list, show and steer rollouts, and follow one
//! to its end (`--wait`, like `kubectl rollout status`): a progress bar on
//! a terminal, one line per phase or batch otherwise, and an exit status
//! that says whether it succeeded.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::cli::{ago, table, Client, Output};
use crate::contract::{
    BatchSize, CreateRollout, OnFailure, Rollout, RolloutAction, RolloutCounts, RolloutDevice,
    RolloutDeviceState, RolloutPhase,
};

/// The stream's request limit when `--timeout` is 0: a year, in effect
/// none (a rollout may wait for an approval for days).
const NO_LIMIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Cells of the progress bar.
const BAR_WIDTH: usize = 20;

#[derive(Debug, Subcommand)]
pub enum RolloutsCmd {
    /// Rollouts, newest first (the default).
    List {
        /// Only this app's.
        #[arg(long)]
        app: Option<String>,
    },
    /// Move an app's devices that match a selector to a release, batch by
    /// batch, each batch health-gated.
    Create(Box<CreateArgs>),
    /// One rollout: phase, reason, per-batch counts; --devices lists its
    /// devices.
    Show(ShowArgs),
    /// Start no more devices until resumed (devices updating go on).
    Pause(ActionArgs),
    /// Go on after a pause; after a pause for failures, accepts the current
    /// batch's failures.
    Resume(ActionArgs),
    /// Start the next batch of a rollout waiting for approval.
    Approve(ActionArgs),
    /// Stop here; devices keep the release they run.
    Abort(ActionArgs),
    /// Put every device the rollout touched back on the release it ran
    /// before.
    Rollback(ActionArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnFailureArg {
    /// Put every device touched back on its previous release.
    Rollback,
    /// Stop starting devices until an operator resumes or rolls back.
    Pause,
    /// Go on; the rollout ends failed if a device failed.
    Continue,
}

impl From<OnFailureArg> for OnFailure {
    fn from(a: OnFailureArg) -> Self {
        match a {
            OnFailureArg::Rollback => OnFailure::Rollback,
            OnFailureArg::Pause => OnFailure::Pause,
            OnFailureArg::Continue => OnFailure::Continue,
        }
    }
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Follow the rollout until it ends; exit 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds (0: never).
    #[arg(long, default_value_t = 0, requires = "wait")]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The app (or, instead, --agent-version).
    #[arg(required_unless_present = "agent_version")]
    pub app: Option<String>,
    /// Roll this agent version (`drover agent-releases`) out instead of
    /// an app.
    #[arg(long, conflicts_with_all = ["app", "release"])]
    pub agent_version: Option<String>,
    /// The release to roll out (default: the latest).
    #[arg(long)]
    pub release: Option<u64>,
    /// Which devices, e.g. `env=prod,region in (eu,us)`; empty: every
    /// device.
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    /// Batch sizes in order, device counts or percentages, e.g. `1,50%`:
    /// one device, then half, then the rest. Default: one batch.
    #[arg(long)]
    pub batches: Option<String>,
    /// At most this many devices (N) or this share (P%) updating at once.
    #[arg(long)]
    pub max_unavailable: Option<String>,
    /// Percent of a batch's devices that must end updated (default 100).
    #[arg(long, value_parser = parse_percent)]
    pub threshold: Option<u8>,
    /// What to do when a batch cannot reach the threshold (default
    /// rollback).
    #[arg(long, value_enum)]
    pub on_failure: Option<OnFailureArg>,
    /// Seconds a device may take to run the release and be ready (default
    /// 600).
    #[arg(long)]
    pub device_timeout: Option<u64>,
    /// Seconds a device must stay ready to count as updated (default 0).
    #[arg(long)]
    pub min_ready: Option<u64>,
    /// Wait for `drover rollouts approve` between batches.
    #[arg(long)]
    pub approval: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: String,
    /// Also list its devices.
    #[arg(long)]
    pub devices: bool,
    /// Only devices in this state (implies --devices).
    #[arg(long, value_parser = parse_device_state)]
    pub state: Option<RolloutDeviceState>,
    /// Only devices of this batch, counted from 1 (implies --devices).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: Option<u64>,
    /// At most this many devices.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Skip this many devices.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct ActionArgs {
    pub id: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// One batch size: `3` is a device count, `50%` a percentage, by the
/// rules of the API's `BatchSize`.
pub fn parse_batch(item: &str) -> Result<BatchSize, String> {
    let item = item.trim();
    if item.ends_with('%') {
        return item.parse();
    }
    match item.parse::<u32>() {
        Ok(0) => Err("a device count must be at least 1, got 0".into()),
        Ok(n) => Ok(BatchSize::Count(n)),
        Err(_) => Err(format!(
            "a batch size is a device count (3) or a percentage (\"50%\"), got {item:?}"
        )),
    }
}

/// `--batches 1,10%,50%`: every item parsed, the first bad one named.
pub fn parse_batches(list: &str) -> Result<Vec<BatchSize>> {
    if list.trim().is_empty() {
        bail!("--batches is empty: give sizes such as 1,50% (leave it out for one batch)");
    }
    list.split(',')
        .enumerate()
        .map(|(i, item)| {
            parse_batch(item)
                .map_err(|e| anyhow!("--batches {list:?}: item {} ({:?}): {e}", i + 1, item))
        })
        .collect()
}

fn parse_percent(v: &str) -> Result<u8, String> {
    let num = v.trim().strip_suffix('%').unwrap_or(v.trim());
    match num.parse::<u8>() {
        Ok(p @ 0..=100) => Ok(p),
        _ => Err(format!("a percentage 0 to 100, got {v:?}")),
    }
}

fn parse_device_state(v: &str) -> Result<RolloutDeviceState, String> {
    serde_json::from_value(Value::String(v.to_string())).map_err(|_| {
        format!(
            "{v:?} is not one of pending, updating, ready, updated, failed, rolling_back, rolled_back, skipped"
        )
    })
}

/// The body of `POST /api/v1/rollouts`: what is not given keeps the API's
/// default (the body is read from the app's name alone first, so those
/// defaults live in one place).
pub fn create_body(a: &CreateArgs) -> Result<CreateRollout> {
    let mut body: CreateRollout = match (&a.app, &a.agent_version) {
        (Some(app), _) => {
            drover_shared::Name::new(app).map_err(|e| anyhow!("app name {app:?}: {e}"))?;
            serde_json::from_value(json!({ "app": app }))
        }
        (None, Some(v)) => serde_json::from_value(json!({ "agent_version": v })),
        (None, None) => return Err(anyhow!("name an app or --agent-version")),
    }
    .context("the rollout's defaults")?;
    body.selector = a.selector.clone();
    body.release = a.release.unwrap_or(0);
    if let Some(b) = &a.batches {
        body.batches = parse_batches(b)?;
    }
    if let Some(m) = &a.max_unavailable {
        body.max_unavailable =
            Some(parse_batch(m).map_err(|e| anyhow!("--max-unavailable {m:?}: {e}"))?);
    }
    if let Some(t) = a.threshold {
        body.success_threshold_percent = t;
    }
    if let Some(f) = a.on_failure {
        body.on_failure = f.into();
    }
    if let Some(t) = a.device_timeout {
        body.device_timeout_secs = t;
    }
    if let Some(m) = a.min_ready {
        body.min_ready_secs = m;
    }
    body.approval = a.approval;
    Ok(body)
}

pub(crate) fn phase_str(p: RolloutPhase) -> &'static str {
    match p {
        RolloutPhase::Running => "running",
        RolloutPhase::WaitingApproval => "waiting_approval",
        RolloutPhase::Paused => "paused",
        RolloutPhase::RollingBack => "rolling_back",
        RolloutPhase::Succeeded => "succeeded",
        RolloutPhase::Failed => "failed",
        RolloutPhase::RolledBack => "rolled_back",
        RolloutPhase::Aborted => "aborted",
        RolloutPhase::Superseded => "superseded",
    }
}

fn device_state_str(s: RolloutDeviceState) -> &'static str {
    match s {
        RolloutDeviceState::Pending => "pending",
        RolloutDeviceState::Updating => "updating",
        RolloutDeviceState::Ready => "ready",
        RolloutDeviceState::Updated => "updated",
        RolloutDeviceState::Failed => "failed",
        RolloutDeviceState::RollingBack => "rolling_back",
        RolloutDeviceState::RolledBack => "rolled_back",
        RolloutDeviceState::Skipped => "skipped",
    }
}

fn on_failure_str(f: OnFailure) -> &'static str {
    match f {
        OnFailure::Rollback => "rollback",
        OnFailure::Pause => "pause",
        OnFailure::Continue => "continue",
    }
}

/// `3->4`; `none->4` when the devices did not have the app.
fn releases(r: &Rollout) -> String {
    if r.from_release == 0 {
        format!("none->{}", r.to_release)
    } else {
        format!("{}->{}", r.from_release, r.to_release)
    }
}

/// `2/3`: the batch running (or next), counted from 1, of all.
fn batch_of(r: &Rollout) -> String {
    if r.batches.is_empty() {
        return "0/0".into();
    }
    format!(
        "{}/{}",
        (r.current_batch + 1).min(r.batches.len()),
        r.batches.len()
    )
}

/// Devices that count: skipped ones (deleted, or left the selector) do not.
fn eligible(c: &RolloutCounts) -> usize {
    c.total.saturating_sub(c.skipped)
}

/// `9/20 45%`
fn progress(r: &Rollout) -> String {
    format!(
        "{}/{} {}%",
        r.counts.updated,
        eligible(&r.counts),
        r.percent
    )
}

/// Whether `--wait` ends well: `Ok` only for `succeeded`; otherwise the
/// phase and the reason, for standard error and a non-zero exit.
pub fn outcome(r: &Rollout) -> Result<()> {
    if r.phase == RolloutPhase::Succeeded {
        return Ok(());
    }
    let reason = r
        .reason
        .as_deref()
        .map(|w| format!(": {w}"))
        .unwrap_or_default();
    bail!("rollout {} ended {}{reason}", r.id, phase_str(r.phase))
}

pub fn rollouts_table(rs: Vec<Rollout>) -> String {
    let rows = rs
        .into_iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.app.to_string(),
                releases(&r),
                phase_str(r.phase).to_string(),
                batch_of(&r),
                progress(&r),
                r.counts.failed.to_string(),
                r.author.clone(),
                ago(r.created_at_ms),
            ]
        })
        .collect();
    table(
        &[
            "ID", "APP", "RELEASE", "PHASE", "BATCH", "PROGRESS", "FAILED", "AUTHOR", "AGE",
        ],
        rows,
    )
}

pub fn rollout_detail(r: &Rollout) -> String {
    let mut out = format!(
        "rollout:     {}\napp:         {} release {}\nselector:    {}\n",
        r.id,
        r.app,
        releases(r),
        if r.selector.is_empty() {
            "(every device)"
        } else {
            &r.selector
        }
    );
    out += &format!(
        "phase:       {} (batch {})\n",
        phase_str(r.phase),
        batch_of(r)
    );
    out += &format!(
        "progress:    {} updated ({}%), {} failed",
        format_args!("{}/{}", r.counts.updated, eligible(&r.counts)),
        r.percent,
        r.counts.failed
    );
    if r.counts.skipped > 0 {
        out += &format!(", {} skipped", r.counts.skipped);
    }
    out += "\n";
    out += &format!(
        "on failure:  {}{}\n",
        on_failure_str(r.on_failure),
        if r.approval {
            "; approval between batches"
        } else {
            ""
        }
    );
    out += &format!(
        "author:      {}, created {}",
        r.author,
        ago(r.created_at_ms)
    );
    if let Some(f) = r.finished_at_ms {
        out += &format!(", ended {}", ago(f));
    }
    out += "\n";
    if let Some(w) = &r.reason {
        out += &format!("reason:      {w}\n");
    }
    let rows = r
        .batches
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mark = if i == r.current_batch && !r.phase.is_final() {
                "*"
            } else {
                ""
            };
            vec![
                format!("{}{mark}", i + 1),
                c.total.to_string(),
                c.pending.to_string(),
                c.updating.to_string(),
                c.updated.to_string(),
                c.failed.to_string(),
                c.skipped.to_string(),
                c.rolling_back.to_string(),
                c.rolled_back.to_string(),
            ]
        })
        .collect();
    out += "\n";
    out += &table(
        &[
            "BATCH",
            "DEVICES",
            "PENDING",
            "UPDATING",
            "UPDATED",
            "FAILED",
            "SKIPPED",
            "ROLLING BACK",
            "ROLLED BACK",
        ],
        rows,
    );
    out
}

pub fn devices_table(ds: Vec<RolloutDevice>) -> String {
    let rows = ds
        .into_iter()
        .map(|d| {
            vec![
                d.device.to_string(),
                (d.batch + 1).to_string(),
                device_state_str(d.state).to_string(),
                d.reason.unwrap_or_default(),
            ]
        })
        .collect();
    table(&["DEVICE", "BATCH", "STATE", "REASON"], rows)
}

/// `[#########...........] 45%  batch 2/3  updated 9/20  failed 0  running`
pub fn bar_line(r: &Rollout) -> String {
    let pct = usize::from(r.percent.min(100));
    let filled = pct * BAR_WIDTH / 100;
    let mut line = format!(
        "[{}{}] {:>3}%  batch {}  updated {}/{}  failed {}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        pct,
        batch_of(r),
        r.counts.updated,
        eligible(&r.counts),
        r.counts.failed
    );
    if r.counts.skipped > 0 {
        line += &format!("  skipped {}", r.counts.skipped);
    }
    let back = r.counts.rolling_back + r.counts.rolled_back;
    if back > 0 {
        line += &format!("  rolled back {}/{back}", r.counts.rolled_back);
    }
    line += "  ";
    line += phase_str(r.phase);
    line
}

/// What an operator should know when a rollout enters a phase in which it
/// waits for someone, or turns back; said once per phase change.
pub fn phase_note(r: &Rollout) -> Option<String> {
    let why = r.reason.as_deref();
    match r.phase {
        RolloutPhase::WaitingApproval => Some(format!(
            "waiting for approval to start batch {}: drover rollouts approve {}",
            batch_of(r),
            r.id
        )),
        // The server's reasons name the phase ("...: paused", "paused by
        // an operator"), so they are said as they are.
        RolloutPhase::Paused => Some(format!(
            "{}; go on with: drover rollouts resume {} (or rollback, abort)",
            why.unwrap_or("paused"),
            r.id
        )),
        RolloutPhase::RollingBack => Some(why.unwrap_or("rolling back").to_string()),
        _ => None,
    }
}

/// What `--wait` writes to standard error as the rollout moves. On a
/// terminal one line redrawn in place (notes printed above it); otherwise
/// one line per change of phase or batch, so a log stays short.
#[derive(Debug)]
pub struct Watch {
    tty: bool,
    last: Option<(RolloutPhase, usize)>,
    /// The bar as last drawn; empty when no bar line is open.
    drawn: String,
}

impl Watch {
    pub fn new(tty: bool) -> Watch {
        Watch {
            tty,
            last: None,
            drawn: String::new(),
        }
    }

    /// The text to write for the rollout as it is now (maybe nothing).
    pub fn update(&mut self, r: &Rollout) -> String {
        let now = (r.phase, r.current_batch);
        let phase_changed = self.last.map(|(p, _)| p) != Some(r.phase);
        let moved = self.last != Some(now);
        self.last = Some(now);
        let note = if phase_changed { phase_note(r) } else { None };
        let line = bar_line(r);
        let mut out = String::new();
        if self.tty {
            if let Some(n) = note {
                if !self.drawn.is_empty() {
                    out += "\r\x1b[K";
                }
                out += &n;
                out += "\n";
                self.drawn.clear();
            }
            if line != self.drawn {
                out += "\r";
                out += &line;
                out += "\x1b[K";
                self.drawn = line;
            }
        } else if moved {
            out += &line;
            out += "\n";
            if let Some(n) = note {
                out += &n;
                out += "\n";
            }
        }
        out
    }

    /// Ends the bar's line, so what follows starts on a line of its own.
    pub fn finish(&mut self) -> String {
        if self.tty && !self.drawn.is_empty() {
            self.drawn.clear();
            return "\n".into();
        }
        String::new()
    }
}

impl Client {
    pub async fn rollouts(&self, cmd: RolloutsCmd) -> Result<()> {
        match cmd {
            RolloutsCmd::List { app } => {
                let mut req = self.http.get(format!("{}/api/v1/rollouts", self.base));
                if let Some(a) = &app {
                    req = req.query(&[("app", a)]);
                }
                let v = self.send(req).await?;
                self.print(&v, rollouts_table)
            }
            RolloutsCmd::Create(a) => {
                let body = create_body(&a)?;
                let v = self
                    .post("/api/v1/rollouts", &serde_json::to_value(&body)?)
                    .await?;
                self.settle(v, &a.wait).await
            }
            RolloutsCmd::Show(s) => self.show_rollout(s).await,
            RolloutsCmd::Pause(a) => self.rollout_action(RolloutAction::Pause, a).await,
            RolloutsCmd::Resume(a) => self.rollout_action(RolloutAction::Resume, a).await,
            RolloutsCmd::Approve(a) => self.rollout_action(RolloutAction::Approve, a).await,
            RolloutsCmd::Abort(a) => self.rollout_action(RolloutAction::Abort, a).await,
            RolloutsCmd::Rollback(a) => self.rollout_action(RolloutAction::Rollback, a).await,
        }
    }

    async fn rollout_action(&self, action: RolloutAction, a: ActionArgs) -> Result<()> {
        let req = self.http.post(format!(
            "{}/api/v1/rollouts/{}/{}",
            self.base,
            a.id,
            action.as_str()
        ));
        let v = self
            .send(req)
            .await
            .with_context(|| format!("cannot {} rollout {}", action.as_str(), a.id))?;
        self.settle(v, &a.wait).await
    }

    async fn show_rollout(&self, s: ShowArgs) -> Result<()> {
        let v = self.get(&format!("/api/v1/rollouts/{}", s.id)).await?;
        let mut r: Rollout = serde_json::from_value(v.clone())?;
        let waited = s.wait.wait;
        if waited {
            r = self.wait_rollout(r, &s.wait).await?;
        }
        let list = s.devices || s.state.is_some() || s.batch.is_some();
        let devices = if list {
            let mut q: Vec<(&str, String)> = vec![
                ("limit", s.limit.to_string()),
                ("offset", s.offset.to_string()),
            ];
            if let Some(st) = s.state {
                q.push(("state", device_state_str(st).to_string()));
            }
            if let Some(b) = s.batch {
                // The API counts batches from 0, as `current_batch` does.
                q.push(("batch", (b - 1).to_string()));
            }
            let req = self
                .http
                .get(format!("{}/api/v1/rollouts/{}/devices", self.base, s.id))
                .query(&q);
            Some(self.send(req).await?)
        } else {
            None
        };
        match self.output {
            Output::Json => {
                let shown = if waited { serde_json::to_value(&r)? } else { v };
                let out = match devices {
                    Some(d) => json!({ "rollout": shown, "devices": d }),
                    None => shown,
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            Output::Table => {
                print!("{}", rollout_detail(&r));
                if let Some(d) = devices {
                    let ds: Vec<RolloutDevice> = serde_json::from_value(d)?;
                    let n = ds.len();
                    print!("\n{}", devices_table(ds));
                    if n == s.limit {
                        println!(
                            "(the first {n} from {}; --offset {} for more)",
                            s.offset,
                            s.offset + n
                        );
                    }
                }
            }
        }
        if waited {
            outcome(&r)?;
        }
        Ok(())
    }

    /// Prints the rollout a command answered with; with `--wait`, follows
    /// it to its end first, and fails unless it succeeded.
    async fn settle(&self, v: Value, wait: &WaitArgs) -> Result<()> {
        let mut r: Rollout = serde_json::from_value(v)?;
        if wait.wait {
            r = self.wait_rollout(r, wait).await?;
        }
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
            Output::Table => print!("{}", rollout_detail(&r)),
        }
        if wait.wait {
            outcome(&r)?;
        }
        Ok(())
    }

    /// Follows the rollout on the change stream until its phase is final
    /// (or `--timeout` passes), drawing its progress on standard error in
    /// table output.
    async fn wait_rollout(&self, r: Rollout, wait: &WaitArgs) -> Result<Rollout> {
        let mut last = r;
        let id = last.id.clone();
        let table = self.output == Output::Table;
        let mut watch = Watch::new(std::io::stderr().is_terminal());
        let show = |r: &Rollout| {
            if table {
                let text = watch.update(r);
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(text.as_bytes());
                let _ = err.flush();
            }
        };
        let followed = if wait.timeout == 0 {
            self.follow_changes(&mut last, NO_LIMIT, show).await
        } else {
            let limit = Duration::from_secs(wait.timeout);
            match tokio::time::timeout(
                limit,
                self.follow_changes(&mut last, limit + Duration::from_secs(5), show),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(anyhow!(
                    "rollout {id} still {} after {}s",
                    phase_str(last.phase),
                    wait.timeout
                )),
            }
        };
        eprint!("{}", watch.finish());
        followed.map(|()| last)
    }
}

#[cfg(test)]
mod tests;
