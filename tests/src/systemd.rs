//! A Debian 12 container with systemd as PID 1, to install and start the
//! `.deb` packages in (tests/tests/packages.rs). `scripts/test-env.sh`
//! builds its image, [`IMAGE`], from Debian's mirror with debootstrap; a
//! missing image or tool is a failure that says what to run, never a skip.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The image `scripts/test-env.sh` builds (ensure_systemd_image).
pub const IMAGE: &str = "drover-test/debian-systemd:12";

fn run(cmd: &mut Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait for command")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A running container; removed when dropped.
pub struct SystemdContainer {
    pub name: String,
}

impl SystemdContainer {
    /// Starts [`IMAGE`] with `mounts` (`host:container[:ro]`) and waits
    /// until systemd has booted. Needs only CAP_SYS_ADMIN (systemd's mounts
    /// and the units' sandboxing) and the host's cgroup tree.
    pub fn start(mounts: &[String]) -> SystemdContainer {
        let o = run(
            Command::new("docker").args(["image", "inspect", IMAGE]),
            b"",
        );
        assert!(
            o.status.success(),
            "image {IMAGE} is missing; run scripts/test-env.sh (it builds it with debootstrap)"
        );
        let name = crate::unique("drover-pkg");
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--name", &name, "--cap-add", "SYS_ADMIN"])
            .args(["--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp"])
            .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]);
        for m in mounts {
            cmd.args(["-v", m]);
        }
        let o = run(cmd.arg(IMAGE), b"");
        assert!(o.status.success(), "docker run {IMAGE}: {}", text(&o));
        let c = SystemdContainer { name };
        // systemctl answers once systemd has its socket up; `--wait` then
        // returns when boot is over: running, or degraded when a unit
        // failed (shown in the assertion).
        let deadline = Instant::now() + Duration::from_secs(90);
        let (o, state) = loop {
            let o = c.exec(&["timeout", "90", "systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !state.is_empty() || Instant::now() >= deadline {
                break (o, state);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            state,
            "running",
            "systemd did not boot cleanly: {}\n{}",
            text(&o),
            c.sh("systemctl --failed --no-pager").1
        );
        c
    }

    /// Runs a command in the container.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_stdin(args, b"")
    }

    pub fn exec_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        run(
            Command::new("docker")
                .args(["exec", "-i", &self.name])
                .args(args),
            stdin,
        )
    }

    /// Runs a shell command: whether it succeeded, and its output.
    pub fn sh(&self, script: &str) -> (bool, String) {
        let o = self.exec(&["sh", "-c", script]);
        (o.status.success(), text(&o))
    }

    /// Runs a shell command that must succeed; returns its standard output.
    pub fn must(&self, script: &str) -> String {
        let o = self.exec(&["sh", "-c", script]);
        assert!(o.status.success(), "`{script}` failed: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Polls a shell command until it succeeds; panics with its last output
    /// and `diagnose`'s after `timeout`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        script: &str,
        diagnose: &str,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, out) = self.sh(script);
            if ok {
                return out;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not within {timeout:?}; last: {out}\n{}",
                    self.sh(diagnose).1
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Copies a host file into the container. `docker cp` writes to the
    /// container's own file system, under any tmpfs mounted over it: so
    /// not into /tmp or /run here (use /var/tmp).
    pub fn copy_in(&self, host: &Path, dest: &str) {
        let o = run(
            Command::new("docker")
                .arg("cp")
                .arg(host)
                .arg(format!("{}:{dest}", self.name)),
            b"",
        );
        assert!(
            o.status.success(),
            "docker cp {}: {}",
            host.display(),
            text(&o)
        );
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
