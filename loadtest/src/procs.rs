//! Processes under test (the orchestrator, Mosquitto, the real agent) and
//! what /proc says about them: resident memory and CPU time. Also the
//! open-file limit, which caps connections for every process involved.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Resource, Rlimit, Signal};
use tokio::process::{Child, Command};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read /proc/{pid}/{file}: {source}")]
    Read {
        pid: u32,
        file: &'static str,
        source: std::io::Error,
    },
    #[error("unexpected format of /proc/{pid}/{file}")]
    Format { pid: u32, file: &'static str },
    #[error("cannot raise the open-file limit: {0}")]
    Rlimit(std::io::Error),
}

/// One reading of a process's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Resident set size (VmRSS).
    pub rss_bytes: u64,
    /// Peak resident set size (VmHWM).
    pub peak_rss_bytes: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
}

/// Reads /proc/<pid>/status and /proc/<pid>/stat.
pub fn sample(pid: u32) -> Result<Sample, ProcError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|source| {
        ProcError::Read {
            pid,
            file: "status",
            source,
        }
    })?;
    let kb = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let rss_bytes = kb("VmRSS:").ok_or(ProcError::Format {
        pid,
        file: "status",
    })? * 1024;
    let peak_rss_bytes = kb("VmHWM:").unwrap_or(0) * 1024;
    let threads = kb("Threads:").unwrap_or(0);
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|source| ProcError::Read {
            pid,
            file: "stat",
            source,
        })?;
    let cpu_ticks = parse_stat_cpu(&stat).ok_or(ProcError::Format { pid, file: "stat" })?;
    Ok(Sample {
        rss_bytes,
        peak_rss_bytes,
        cpu_ticks,
        threads,
    })
}

/// utime (field 14) + stime (field 15). The command name (field 2) is in
/// parentheses and may contain spaces, so fields are counted after the
/// last ')'.
pub fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(a: &Sample, b: &Sample, wall: Duration) -> f64 {
    let secs = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / clock_ticks_per_second() as f64;
    if wall.is_zero() {
        0.0
    } else {
        100.0 * secs / wall.as_secs_f64()
    }
}

/// Open file descriptors of a process (counts /proc/<pid>/fd).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(Iterator::count)
}

/// The open-file limit (soft, hard) of this process.
pub fn nofile() -> (Option<u64>, Option<u64>) {
    let l = rustix::process::getrlimit(Resource::Nofile);
    (l.current, l.maximum)
}

/// Raises this process's open-file limit to at least `want` (soft and hard)
/// when allowed (root may raise the hard limit up to fs.nr_open), else the
/// soft limit to the hard one. Children (orchestrator, Mosquitto) inherit it.
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> Result<u64, ProcError> {
    let (soft, hard) = nofile();
    let soft = soft.unwrap_or(u64::MAX);
    let hard = hard.unwrap_or(u64::MAX);
    if soft >= want {
        return Ok(soft);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = want.min(nr_open.max(hard));
    let raised = rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: Some(target.max(hard)),
        },
    );
    match raised {
        Ok(()) => {
            info!(from = soft, to = target, "raised the open-file limit");
            Ok(target)
        }
        Err(e) if hard > soft => {
            warn!(error = %e, want, hard, "cannot raise the hard open-file limit; using the hard limit");
            rustix::process::setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                },
            )
            .map_err(|e| ProcError::Rlimit(e.into()))?;
            Ok(hard)
        }
        // Not allowed to go higher (no CAP_SYS_RESOURCE, e.g. in a
        // container): run at the limit there is; steps beyond it break with
        // "too many open files", which the table records as the limit found.
        Err(e) => {
            warn!(error = %e, want, limit = soft, "cannot raise the open-file limit; running at the current one");
            Ok(soft)
        }
    }
}

/// A child process under test, its output in a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Proc, ProcError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcError::Log {
                path: log.display().to_string(),
                source,
            })?;
        let err = file.try_clone().map_err(|source| ProcError::Log {
            path: log.display().to_string(),
            source,
        })?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ProcError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        info!(name, pid, program = %program.display(), "started");
        Ok(Proc {
            name: name.to_string(),
            child,
            pid,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn sample(&self) -> Result<Sample, ProcError> {
        sample(self.pid)
    }

    /// `Some` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and reap: a crash, not a shutdown.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Some(pid) = i32::try_from(self.pid).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            warn!(name = %self.name, "did not stop after SIGTERM; killing");
            self.kill().await;
        }
    }

    /// The last `n` lines of its log, for error reports.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// Samples a process every `every` and keeps the extremes.
#[derive(Debug, Clone)]
pub struct Series {
    pub first: Sample,
    pub last: Sample,
    pub max_rss: u64,
    pub started: Instant,
    pub ended: Instant,
    /// RSS at the first sample of each whole minute since the start
    /// (index 0 is the start): whether memory levels off or keeps growing.
    pub rss_by_minute: Vec<u64>,
}

impl Series {
    pub fn new(first: Sample) -> Series {
        let now = Instant::now();
        Series {
            first,
            last: first,
            max_rss: first.rss_bytes,
            started: now,
            ended: now,
            rss_by_minute: vec![first.rss_bytes],
        }
    }

    pub fn push(&mut self, s: Sample) {
        self.last = s;
        self.max_rss = self.max_rss.max(s.rss_bytes);
        self.ended = Instant::now();
        let minute = (self.ended - self.started).as_secs() / 60;
        if minute as usize >= self.rss_by_minute.len() {
            self.rss_by_minute.push(s.rss_bytes);
        }
    }

    /// RSS change over the second half of the series, in bytes: near zero
    /// once memory has levelled off. `None` for under two minutes.
    pub fn second_half_growth(&self) -> Option<i64> {
        let m = &self.rss_by_minute;
        (m.len() >= 3).then(|| m[m.len() - 1] as i64 - m[(m.len() - 1) / 2] as i64)
    }

    pub fn cpu_percent(&self) -> f64 {
        cpu_percent(&self.first, &self.last, self.ended - self.started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_half_growth_compares_the_last_minute_with_the_middle_one() {
        let at = |rss_bytes| Sample {
            rss_bytes,
            peak_rss_bytes: rss_bytes,
            cpu_ticks: 0,
            threads: 1,
        };
        let mut s = Series::new(at(100));
        assert_eq!(s.second_half_growth(), None, "one sample");
        s.rss_by_minute = vec![100, 130];
        assert_eq!(s.second_half_growth(), None, "under two minutes");
        s.rss_by_minute = vec![100, 150, 160, 170, 155];
        assert_eq!(s.second_half_growth(), Some(155 - 160));
        s.rss_by_minute = vec![100, 110, 140];
        assert_eq!(s.second_half_growth(), Some(30));
    }

    #[test]
    fn stat_cpu_fields_are_found_after_the_command_name() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_stat_cpu(stat), Some(300));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).expect("sample self");
        assert!(s.rss_bytes > 0 && s.threads > 0);
    }
}
