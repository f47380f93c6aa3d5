//! Edge jobs: a run-to-completion container sent to devices
//! (`cmd` → [`crate::payload::Action::RunJob`]) and each device's report of
//! it (`job` topic, [`JobReport`]).
//!
//! A device runs a job at most once per id: a repeated `RunJob` (the
//! orchestrator sends it again to a device that reconnects before
//! answering) is answered with the latest report of that id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::Message;
use crate::model::{check_count, check_text, limits, FieldError, ImageRef};
use crate::topic::TopicKind;

/// The longest a job may run: one day.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// The output a report carries: the last 4 KiB of stdout and stderr.
pub const OUTPUT_TAIL_BYTES: usize = 4 * 1024;
/// Bytes of a job id (the orchestrator's own: letters, digits, `-`, `_`).
pub const ID_BYTES: usize = 64;
/// Docker's label carrying the job id on a job's container.
pub const LABEL_JOB: &str = "io.drover.job";

/// One job, as a device is told to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSpec {
    pub id: String,
    pub image: String,
    /// The command and its arguments; empty runs the image's own.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Past this the container is killed and the job is `timed_out`.
    pub timeout_ms: u64,
}

/// Whether `id` can be a job id (and so a Docker name and label part).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl JobSpec {
    /// The bounds of an app's container (`model::limits`) and Docker's
    /// image reference grammar; normalises the image like an app's.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        if !valid_id(&self.id) {
            return Err(FieldError::new(
                "id",
                format!("must be 1 to {ID_BYTES} letters, digits, '-' or '_'"),
            ));
        }
        let image = ImageRef::parse(&self.image).map_err(|m| FieldError::new("image", m))?;
        self.image = image.to_string();
        check_count("command", self.command.len(), limits::COMMAND_ARGS)?;
        for (j, arg) in self.command.iter().enumerate() {
            check_text(
                &format!("command[{j}]"),
                "argument",
                arg,
                limits::COMMAND_ARG_BYTES,
                false,
            )?;
        }
        check_count("env", self.env.len(), limits::ENV_VARS)?;
        for (k, v) in &self.env {
            let f = format!("env.{k}");
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(FieldError::new(
                    if k.is_empty() { "env".to_string() } else { f },
                    format!("invalid variable name {k:?}: not empty, without '=' or NUL"),
                ));
            }
            check_text(&f, "name", k, limits::ENV_NAME_BYTES, false)?;
            check_text(&f, "value", v, limits::ENV_VALUE_BYTES, false)?;
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(FieldError::new(
                "timeout",
                "must be more than 0 and at most 24 hours",
            ));
        }
        let size = crate::codec::encode(&crate::payload::Command {
            id: String::new(),
            issued_at_ms: 0,
            action: crate::payload::Action::RunJob(self.clone()),
        })
        .len();
        if size > limits::APP_SPEC_BYTES {
            return Err(FieldError::new(
                "command",
                format!(
                    "the job is {size} bytes encoded, over the limit of {}",
                    limits::APP_SPEC_BYTES
                ),
            ));
        }
        Ok(())
    }
}

/// Where a job stands on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    Accepted,
    Pulling,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl JobPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::TimedOut | JobPhase::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Accepted => "accepted",
            JobPhase::Pulling => "pulling",
            JobPhase::Running => "running",
            JobPhase::Succeeded => "succeeded",
            JobPhase::Failed => "failed",
            JobPhase::TimedOut => "timed_out",
            JobPhase::Cancelled => "cancelled",
        }
    }
}

/// `job`: a device's progress and outcome of one job. QoS 1, not retained;
/// the final one is sent again on every reconnect until the job is gone
/// from the device's list of finished jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub id: String,
    pub phase: JobPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The last [`OUTPUT_TAIL_BYTES`] of stdout and stderr, merged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_tail: String,
    /// Why it failed, when it did not get to run or could not be read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: u64,
}

impl Message for JobReport {
    const KIND: TopicKind = TopicKind::Job;
}

/// The last `max` bytes of `bytes` as text, cut at a character boundary
/// (invalid UTF-8 replaced).
pub fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&bytes[start..]);
    if text.len() <= max {
        return text.into_owned();
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            id: "j-1".into(),
            image: "busybox".into(),
            command: vec!["echo".into(), "hi".into()],
            env: BTreeMap::new(),
            timeout_ms: 1000,
        }
    }

    #[test]
    fn a_job_is_checked_naming_the_field() {
        let mut ok = spec();
        ok.validate().expect("valid");
        assert_eq!(ok.image, "busybox:latest");
        type Change = fn(&mut JobSpec);
        let cases: Vec<(Change, &str)> = vec![
            (|s| s.id = "a/b".into(), "id"),
            (|s| s.image = "Not An Image".into(), "image"),
            (|s| s.timeout_ms = 0, "timeout"),
            (|s| s.timeout_ms = MAX_TIMEOUT_MS + 1, "timeout"),
            (|s| s.command = vec!["a\0b".into()], "command[0]"),
            (
                |s| {
                    s.env = (0..=limits::ENV_VARS)
                        .map(|i| (format!("K{i}"), "v".into()))
                        .collect()
                },
                "env",
            ),
            (
                |s| s.env = BTreeMap::from([("A=B".into(), "v".into())]),
                "env.A=B",
            ),
        ];
        for (change, field) in cases {
            let mut s = spec();
            change(&mut s);
            assert_eq!(s.validate().expect_err(field).field, field);
        }
    }

    #[test]
    fn the_tail_is_the_end_and_valid_text() {
        assert_eq!(tail(b"hello", 3), "llo");
        assert_eq!(tail(b"hi", 10), "hi");
        let s = "aé".repeat(10);
        let t = tail(s.as_bytes(), 5);
        assert!(t.len() <= 5 && s.ends_with(&t), "{t}");
        assert_eq!(tail(&[0xff, b'a'], 10), "\u{fffd}a");
    }

    #[test]
    fn reports_round_trip() {
        let r = JobReport {
            id: "j".into(),
            phase: JobPhase::TimedOut,
            exit_code: Some(137),
            output_tail: "x".into(),
            error: String::new(),
            started_at_ms: 1,
            finished_at_ms: 2,
        };
        assert_eq!(crate::decode::<JobReport>(&crate::encode(&r)), Ok(r));
    }
}
