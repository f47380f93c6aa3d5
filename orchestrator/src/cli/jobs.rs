//! `drover jobs`: run a container to completion on the devices a selector
//! matches, list, show (per device: state, exit code, output tail) and
//! cancel. `run --wait` follows the job on `GET /api/v1/changes?job=ID`
//! and exits 0 only when every device succeeded.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::follow::Followed;
use super::{table, Client, Output};
use crate::contract::{Job, JobDeviceState, JobPhase};

/// How long a stream may stay open when `--wait` has no limit.
const NO_LIMIT: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// Jobs, newest first (the default).
    List,
    /// Run a container to completion on every device a selector matches:
    /// `drover jobs run --selector env=lab --image busybox -- echo hi`.
    Run(Box<RunArgs>),
    /// One job: per device its state, exit code and output tail.
    Show { id: String },
    /// Stop a job: devices not yet sent it never get it, running ones kill
    /// and remove its container.
    Cancel { id: String },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Which devices, e.g. `env=lab`; empty: every device.
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    /// The image to run.
    #[arg(long)]
    pub image: String,
    /// An environment variable, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// How long a device may run it before it is killed: `90`, `90s`,
    /// `5m`, `2h`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: u64,
    /// At most this many devices at once (default: all).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Follow it until every device is done; exit 0 only if every device
    /// succeeded.
    #[arg(long)]
    pub wait: bool,
    /// The command and its arguments, after `--` (default: the image's).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Seconds from `90`, `90s`, `5m` or `2h`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 5m or 2h"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?} is not a duration like 90s, 5m or 2h")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

impl Followed for Job {
    const KIND: &'static str = "job";
    const COLLECTION: &'static str = "jobs";
    const SHOW: &'static str = "jobs";
    fn id(&self) -> &str {
        &self.id
    }
    fn updated_at_ms(&self) -> u64 {
        self.updated_at_ms
    }
    fn state(&self) -> &'static str {
        phase_str(self.phase)
    }
    fn is_final(&self) -> bool {
        // Cancelled is final for the job, but devices may still answer.
        self.phase.is_final() && self.counts.dispatched == 0 && self.counts.running == 0
    }
}

fn phase_str(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Running => "running",
        JobPhase::Succeeded => "succeeded",
        JobPhase::Failed => "failed",
        JobPhase::Cancelled => "cancelled",
    }
}

fn state_str(s: JobDeviceState) -> &'static str {
    match s {
        JobDeviceState::Pending => "pending",
        JobDeviceState::Dispatched => "dispatched",
        JobDeviceState::Running => "running",
        JobDeviceState::Succeeded => "succeeded",
        JobDeviceState::Failed => "failed",
        JobDeviceState::TimedOut => "timed_out",
        JobDeviceState::Cancelled => "cancelled",
        JobDeviceState::Expired => "expired",
    }
}

fn counts_text(j: &Job) -> String {
    let c = &j.counts;
    format!(
        "{}/{} succeeded, {} failed, {} timed out, {} running, {} pending",
        c.succeeded,
        c.total,
        c.failed,
        c.timed_out,
        c.running + c.dispatched,
        c.pending
    )
}

fn jobs_table(jobs: Vec<Job>) -> String {
    table(
        &["ID", "PHASE", "IMAGE", "SELECTOR", "DEVICES", "BY"],
        jobs.iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    phase_str(j.phase).to_string(),
                    j.image.clone(),
                    j.selector.clone(),
                    counts_text(j),
                    j.created_by.clone(),
                ]
            })
            .collect(),
    )
}

fn job_detail(j: &Job) -> String {
    let mut out = format!(
        "job {}: {} ({})\nimage {} command {:?} timeout {}s concurrency {}\n",
        j.id,
        phase_str(j.phase),
        counts_text(j),
        j.image,
        j.command,
        j.timeout_secs,
        j.concurrency
    );
    for d in &j.devices {
        let exit = d.exit_code.map_or("-".to_string(), |c| c.to_string());
        out.push_str(&format!(
            "\n== {} {} exit {}{}\n",
            d.device,
            state_str(d.state),
            exit,
            if d.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", d.error)
            }
        ));
        if !d.output_tail.is_empty() {
            out.push_str(&d.output_tail);
            if !d.output_tail.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

impl Client {
    pub async fn jobs(&self, cmd: JobsCmd) -> Result<()> {
        match cmd {
            JobsCmd::List => {
                let v = self.get("/api/v1/jobs").await?;
                self.print(&v, jobs_table)
            }
            JobsCmd::Show { id } => {
                let v = self.get(&format!("/api/v1/jobs/{id}")).await?;
                self.print(&v, |j: Job| job_detail(&j))
            }
            JobsCmd::Cancel { id } => {
                let v = self
                    .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
                    .await
                    .with_context(|| format!("cannot cancel job {id}"))?;
                self.print(&v, |j: Job| job_detail(&j))
            }
            JobsCmd::Run(a) => self.run_job(*a).await,
        }
    }

    async fn run_job(&self, a: RunArgs) -> Result<()> {
        let mut env = serde_json::Map::new();
        for e in &a.env {
            let (k, v) = e
                .split_once('=')
                .ok_or_else(|| anyhow!("--env {e:?}: expected KEY=VALUE"))?;
            env.insert(k.to_string(), json!(v));
        }
        let mut body = json!({
            "selector": a.selector,
            "image": a.image,
            "command": a.command,
            "env": env,
            "timeout_secs": a.timeout,
        });
        if let Some(c) = a.concurrency {
            body["concurrency"] = json!(c);
        }
        let v = self.post("/api/v1/jobs", &body).await?;
        let mut job: Job = serde_json::from_value(v)?;
        if !a.wait {
            match self.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&job)?),
                Output::Table => println!("job {} created: {}", job.id, counts_text(&job)),
            }
            return Ok(());
        }
        let table_out = self.output == Output::Table;
        let mut shown = String::new();
        self.follow_changes(&mut job, NO_LIMIT, |j: &Job| {
            let line = format!("job {}: {} ({})", j.id, phase_str(j.phase), counts_text(j));
            if table_out && line != shown {
                eprintln!("{line}");
                shown = line;
            }
        })
        .await?;
        let v = self.get(&format!("/api/v1/jobs/{}", job.id)).await?;
        let job: Job = serde_json::from_value(v.clone())?;
        self.print(&v, |j: Job| job_detail(&j))?;
        if job.phase != JobPhase::Succeeded {
            bail!(
                "job {} {}: {}",
                job.id,
                phase_str(job.phase),
                counts_text(&job)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
    }
}
