//! Two network namespaces joined by a veth pair: a small LAN of the test's
//! own, for what loopback cannot show (multicast DNS discovery between
//! machines). Addresses are 10.213.0.1/24 (side A) and 10.213.0.2/24 (side
//! B), and exist only inside the namespaces. Needs root (CI is root) and
//! iproute2 (`scripts/test-env.sh`); a failure to build the LAN fails the
//! test, it never skips. Dropping the pair deletes both namespaces (and so
//! the veth pair) even when the test panicked.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Side A's address.
pub const ADDR_A: &str = "10.213.0.1";
/// Side B's address.
pub const ADDR_B: &str = "10.213.0.2";

pub struct NetPair {
    pub a: String,
    pub b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| {
            format!("cannot run `ip` (iproute2, installed by scripts/test-env.sh): {e}")
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetPair {
    /// Creates the namespaces, the veth pair, the addresses, and brings
    /// every link (loopback too) up. Panics naming the step that failed.
    pub fn new() -> NetPair {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let pair = NetPair {
            a: format!("drover-t{pid}-{n}-a"),
            b: format!("drover-t{pid}-{n}-b"),
        };
        // Interface names have at most 15 bytes.
        let (va, vb) = (format!("dv{pid:x}n{n}a"), format!("dv{pid:x}n{n}b"));
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &pair.a])?;
            ip(&["netns", "add", &pair.b])?;
            ip(&[
                "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
                &pair.b,
            ])?;
            for (ns, dev, addr) in [(&pair.a, &va, ADDR_A), (&pair.b, &vb, ADDR_B)] {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            // Drop cleans up what was made.
            panic!("cannot build the test LAN (needs root and iproute2): {e}");
        }
        pair
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// `curl` inside namespace `ns` (an API listening on that namespace's
    /// loopback): the status code and the body as JSON (Null if none).
    pub async fn curl(
        ns: &str,
        method: &str,
        url: &str,
        token: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5"])
            .args([
                "-X",
                method,
                "-H",
                &format!("Authorization: Bearer {token}"),
            ])
            .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data",
                &b.to_string(),
            ]);
        }
        let out = cmd
            .arg(url)
            .output()
            .await
            .expect("run curl (scripts/test-env.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().unwrap_or(0);
        (
            code,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Waits until `GET url` inside `ns` answers 200.
    pub async fn wait_http(ns: &str, url: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if NetPair::curl(ns, "GET", url, "", None).await.0 == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{url} in {ns} not up after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Default for NetPair {
    fn default() -> Self {
        NetPair::new()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the
        // peer. Processes still inside keep it alive until they exit; the
        // tests' processes are killed on drop.
        let _ = ip(&["netns", "delete", &self.a]);
        let _ = ip(&["netns", "delete", &self.b]);
    }
}
