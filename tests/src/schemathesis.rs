//! schemathesis (PyPI), which tests a running server against its OpenAPI
//! document. `scripts/test-env.sh` installs it into a virtual environment
//! at [`VENV`]; like every other service the tests need, a missing one is
//! a failure that says what to run, never a skip.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// Where `scripts/test-env.sh` creates the virtual environment; the
/// `DROVER_TEST_VENV` variable points elsewhere.
pub const VENV: &str = "/opt/drover-test-venv";

/// A program of the test virtual environment (`schemathesis`, `python`).
pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("DROVER_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(VENV));
    let p = venv.join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing; run `bash scripts/test-env.sh` (it installs schemathesis into {})",
        p.display(),
        venv.display()
    );
    p
}

/// What one run printed, and whether it passed.
pub struct Outcome {
    pub success: bool,
    pub output: String,
}

/// Runs `program args...` from the virtual environment with its output
/// captured, killed after `limit`.
pub async fn run(program: &str, args: &[String], limit: Duration) -> Outcome {
    // schemathesis keeps a cache of what it found under `.schemathesis/`
    // in its working directory: a scratch one, not the checkout.
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut cmd = tokio::process::Command::new(venv_bin(program));
    cmd.args(args)
        .current_dir(scratch.path())
        // No color codes in what a failing test prints.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} ran longer than {limit:?}"))
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Outcome {
        success: out.status.success(),
        output,
    }
}
