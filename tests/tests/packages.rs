//! The `.deb` packages: built with cargo-deb from the binaries the tests
//! use, installed with `dpkg -i` into a Debian 12 container whose PID 1 is
//! systemd, started by their units as the `drover` system user, and
//! working: the orchestrator's CLI issues an enrollment token, the agent
//! enrolls with it and the orchestrator's REST API lists it online. The
//! agent reaches the host's Docker through its socket, mounted into the
//! container, with the container's `docker` group given the socket's gid.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_tests::systemd::SystemdContainer;

const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const JOURNAL: &str = "journalctl --no-pager -n 60 -u drover -u drover-agent; systemctl status --no-pager drover drover-agent";

/// `cargo deb --no-build` for `package`, from the binaries in `bin_dir`
/// (`target/debug` in the test profile: no release build in CI).
fn build_deb(package: &str, bin_dir: &Path, out: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let profile = match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => panic!("no profile in {}", bin_dir.display()),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .current_dir(workspace)
        .args(["deb", "--no-build", "--fast", "--quiet", "-p", package])
        .args(["--profile", profile, "--output"])
        .arg(out)
        .output()
        .expect("run cargo deb");
    assert!(
        o.status.success(),
        "cargo deb -p {package} failed (cargo-deb missing? run scripts/test-env.sh): {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let deb = std::fs::read_dir(out)
        .expect("read deb dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        });
    deb.unwrap_or_else(|| panic!("cargo deb wrote no {package}_*.deb in {}", out.display()))
}

#[test]
fn debs_install_and_run_under_systemd() {
    let bin_dir = drover_tests::binary("drover")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    drover_tests::binary("drover-agent");
    let out = tempfile::tempdir().expect("temp dir");
    let orch_deb = build_deb("drover", &bin_dir, out.path());
    let agent_deb = build_deb("drover-agent", &bin_dir, out.path());

    let docker_gid = std::fs::metadata(DOCKER_SOCKET)
        .unwrap_or_else(|e| panic!("{DOCKER_SOCKET}: {e}; is Docker running?"))
        .gid();
    let c = SystemdContainer::start(&[format!("{DOCKER_SOCKET}:/var/run/docker.sock")]);
    c.copy_in(&orch_deb, "/var/tmp/drover.deb");
    c.copy_in(&agent_deb, "/var/tmp/drover-agent.deb");
    // Docker's package would make the group; here the socket's gid must
    // match it for the agent to get in.
    c.must(&format!("groupadd --gid {docker_gid} docker"));
    c.must("dpkg -i /var/tmp/drover.deb /var/tmp/drover-agent.deb");

    // Both units enabled and started by the packages, as the system user.
    c.wait_until(
        Duration::from_secs(60),
        "drover.service active with an admin token",
        "systemctl is-active --quiet drover && test -s /var/lib/drover/admin.token",
        JOURNAL,
    );
    for unit in ["drover", "drover-agent"] {
        c.must(&format!("systemctl is-enabled --quiet {unit}"));
        let user = c.must(&format!(
            "stat -c %U /proc/$(systemctl show -p MainPID --value {unit})"
        ));
        assert_eq!(user.trim(), "drover", "{unit} runs as {user}");
    }
    let conffiles = c.must("dpkg-query -W -f='${Conffiles}' drover drover-agent");
    for f in ["/etc/drover/drover.toml", "/etc/drover/agent.toml"] {
        assert!(conffiles.contains(f), "{f} is no conffile: {conffiles}");
    }

    // The operator's steps of the README: a token from the CLI (the admin
    // token read from the state directory), the broker filled into the
    // agent's config, the token in a file it names.
    let token = c.must(
        "drover --token-file /var/lib/drover/admin.token -o json enroll-tokens create --device pkg-device",
    );
    let token: serde_json::Value = serde_json::from_str(&token).expect("token json");
    let token = token["token"].as_str().expect("token field").to_string();
    let o = c.exec_stdin(
        &[
            "sh",
            "-c",
            "umask 027 && cat >/etc/drover/enroll.token && chgrp drover /etc/drover/enroll.token",
        ],
        token.as_bytes(),
    );
    assert!(o.status.success(), "write token: {o:?}");
    c.must(
        "sed -i -e 's|^#broker = .*|broker = \"mqtt://127.0.0.1:1883\"|' \
         -e 's|^#enroll-token-file|enroll-token-file|' \
         -e 's|^#device-id = .*|device-id = \"pkg-device\"|' /etc/drover/agent.toml \
         && systemctl restart drover-agent",
    );

    let devices = c.wait_until(
        Duration::from_secs(60),
        "the agent online in the device list",
        "curl -fsS -H \"Authorization: Bearer $(cat /var/lib/drover/admin.token)\" \
         http://127.0.0.1:8080/api/v1/devices | grep -q '\"online\":true' \
         && curl -fsS -H \"Authorization: Bearer $(cat /var/lib/drover/admin.token)\" \
         http://127.0.0.1:8080/api/v1/devices",
        JOURNAL,
    );
    let devices: serde_json::Value = serde_json::from_str(&devices).expect("devices json");
    let list = devices.as_array().or_else(|| devices["items"].as_array());
    let device = list
        .into_iter()
        .flatten()
        .find(|d| d["id"] == "pkg-device")
        .unwrap_or_else(|| panic!("pkg-device not listed: {devices}"));
    assert_eq!(device["online"], true, "{device}");
    for unit in ["drover", "drover-agent"] {
        let (active, out) = c.sh(&format!("systemctl is-active {unit}"));
        assert!(active, "{unit}: {out}\n{}", c.sh(JOURNAL).1);
    }
}
