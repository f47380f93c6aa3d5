//! The orchestrator's data directory on a full file system (a small tmpfs
//! mounted for the test; needs root, as CI runs): changes fail cleanly,
//! health says so, and once there is room again the store recovers by
//! itself, with the audit records of the outage kept.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_tests::*;
use serde_json::json;

/// A tmpfs of `mib` MiB, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system that holds `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // Whatever is left, byte by byte in small pieces.
    for _ in 0..64 {
        if f.write_all(&chunk[..1024]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    path
}

async fn health(api: &Api) -> (u16, String) {
    let resp = reqwest::get(format!("{}/healthz", api.base))
        .await
        .expect("healthz");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn app(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "containers": [{
            "name": "main",
            "image": format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"),
            "env": {"PADDING": "x".repeat(16 * 1024)}
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_changes_cleanly_and_the_store_recovers_by_itself() {
    let fs = Tmpfs::mount(16);
    let data = fs.path().join("data");
    let orch = Orch::start_config({
        let data = data.clone();
        move |cfg| cfg.data_dir = data
    })
    .await;
    let (s, v) = orch.api.post("/api/v1/apps", &app("before")).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(health(&orch.api).await.0, 200);

    let filler = fill(fs.path());
    // Changes fail, saying nothing was changed; none is half done.
    let mut failed = Vec::new();
    for i in 0..40 {
        let name = format!("during-{i}");
        let (s, v) = orch.api.post("/api/v1/apps", &app(&name)).await;
        if s >= 500 {
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("nothing was changed")),
                "{v}"
            );
            failed.push(name);
            if failed.len() >= 3 {
                break;
            }
        }
    }
    assert!(!failed.is_empty(), "no change failed on a full disk");
    let (status, text) = health(&orch.api).await;
    assert_eq!(status, 503, "health says ok while the store cannot write");
    assert!(text.contains("store"), "{text}");
    for name in &failed {
        let (s, _) = orch.api.get(&format!("/api/v1/apps/{name}")).await;
        assert_eq!(s, 404, "{name} failed but exists");
    }

    // Room again: it recovers with no restart.
    std::fs::remove_file(&filler).expect("remove filler");
    wait_for(Duration::from_secs(20), "healthy again", || async {
        (health(&orch.api).await.0 == 200).then_some(())
    })
    .await;
    let (s, v) = orch.api.post("/api/v1/apps", &app("after")).await;
    assert_eq!(s, 201, "{v}");
    let (s, list) = orch.api.get("/api/v1/apps").await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list
        .as_array()
        .expect("apps")
        .iter()
        .filter_map(|a| a["spec"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"before") && names.contains(&"after"),
        "{names:?}"
    );

    // The audit log kept what was refused during the outage.
    let (_, log) = orch
        .api
        .get("/api/v1/audit?outcome=failed&limit=1000")
        .await;
    let failed_creates = log
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["action"] == json!("POST /api/v1/apps"))
        .count();
    assert!(
        failed_creates >= failed.len(),
        "{failed_creates} failed creates audited, {} happened: {log}",
        failed.len()
    );
    assert_eq!(
        metric(&orch.api, "drover_audit_records_dropped_total").await,
        0
    );
    orch.stop().await;
}
