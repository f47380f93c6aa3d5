//! The device inventory sent in `hello`: what the orchestrator needs to pick
//! images (arch), spot outdated hosts (os, kernel, Docker) and plan capacity.

use drover_shared::payload::Hello;
use drover_shared::Platform;
use sysinfo::{Disks, System};

use crate::runtime::DockerRuntime;

/// Host facts that do not need Docker. Blocking (reads /proc), so callers run
/// it off the async executor.
pub fn host_facts() -> Hello {
    let mut sys = System::new();
    sys.refresh_memory();
    let (disk_total_bytes, disk_free_bytes) = root_disk();
    Hello {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        platform: Platform::of_this_build(),
        cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        memory_bytes: sys.total_memory(),
        disk_total_bytes,
        disk_free_bytes,
        booted_at_ms: System::boot_time().saturating_mul(1000),
        ..Default::default()
    }
}

/// (total, free) of the root file system, else of the largest disk.
pub fn root_disk() -> (u64, u64) {
    let disks = Disks::new_with_refreshed_list();
    let pick = disks
        .list()
        .iter()
        .find(|d| d.mount_point() == std::path::Path::new("/"))
        .or_else(|| disks.list().iter().max_by_key(|d| d.total_space()));
    pick.map_or((0, 0), |d| (d.total_space(), d.available_space()))
}

/// The full inventory. An unreachable daemon is reported, not fatal.
pub async fn collect(runtime: &DockerRuntime) -> Hello {
    let mut hello = tokio::task::spawn_blocking(host_facts)
        .await
        .unwrap_or_default();
    match runtime.version().await {
        Ok(v) => hello.docker_version = v,
        Err(e) => hello.docker_error = Some(e.to_string()),
    }
    // The daemon's platform is the one images must be for; the build's
    // (set by `host_facts`) stands in while the daemon cannot be asked.
    if let Ok(p) = runtime.platform().await {
        if !p.architecture.is_empty() {
            hello.platform = Some(p);
        }
    }
    match runtime.images().await {
        Ok(images) => hello.images = images,
        Err(e) => {
            hello.docker_error.get_or_insert_with(|| e.to_string());
        }
    }
    hello
}
