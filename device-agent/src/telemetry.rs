//! Periodic resource telemetry: host metrics from sysinfo and per-container
//! usage from Docker's stats API, computed the way `docker stats` does.

use std::time::Duration;

use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::StatsOptionsBuilder;
use drover_shared::payload::{ContainerMetrics, HostMetrics, Telemetry};
use futures_util::StreamExt;
use sysinfo::System;
use tracing::debug;

use crate::mqtt::Publisher;
use crate::now_ms;
use crate::runtime::{DockerRuntime, ManagedContainer, Runtime};

/// Publishes a sample every `interval` while connected.
pub async fn run(runtime: DockerRuntime, publisher: Publisher, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // CPU usage is a difference between two refreshes: keep one System alive.
    let mut sys = System::new();
    loop {
        tick.tick().await;
        if !publisher.is_online() {
            continue;
        }
        let (next, host) = match tokio::task::spawn_blocking(move || {
            let host = host_metrics(&mut sys);
            (sys, host)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => return,
        };
        sys = next;
        let containers = container_metrics(&runtime).await;
        publisher.send_sample(&Telemetry {
            at_ms: now_ms(),
            host,
            containers,
        });
    }
}

fn host_metrics(sys: &mut System) -> HostMetrics {
    sys.refresh_cpu_usage();
    sys.refresh_memory();
    let load = System::load_average();
    let (disk_total, disk_free) = crate::inventory::root_disk();
    HostMetrics {
        cpu_percent: sys.global_cpu_usage(),
        memory_used_bytes: sys.used_memory(),
        memory_total_bytes: sys.total_memory(),
        disk_used_bytes: disk_total.saturating_sub(disk_free),
        disk_total_bytes: disk_total,
        load_1: load.one,
        load_5: load.five,
        load_15: load.fifteen,
        uptime_s: System::uptime(),
    }
}

async fn container_metrics(runtime: &DockerRuntime) -> Vec<ContainerMetrics> {
    let Ok(list) = runtime.list_managed().await else {
        return Vec::new();
    };
    let Ok(docker) = runtime.client().await else {
        return Vec::new();
    };
    let running: Vec<ManagedContainer> =
        list.into_iter().filter(|c| c.state == "running").collect();
    let samples = futures_util::future::join_all(running.iter().map(|c| {
        let docker = docker.clone();
        async move {
            // stream=false, one_shot=false: the daemon takes two samples, so
            // precpu_stats is filled and CPU% can be computed.
            let opts = StatsOptionsBuilder::new()
                .stream(false)
                .one_shot(false)
                .build();
            docker.stats(&c.id, Some(opts)).next().await
        }
    }))
    .await;
    running
        .iter()
        .zip(samples)
        .filter_map(|(c, s)| match s {
            Some(Ok(stats)) => Some(metrics_from(c, &stats)),
            Some(Err(e)) => {
                debug!(container = %c.id, error = %e, "no stats");
                None
            }
            None => None,
        })
        .collect()
}

fn metrics_from(c: &ManagedContainer, s: &ContainerStatsResponse) -> ContainerMetrics {
    let mem = s.memory_stats.as_ref();
    ContainerMetrics {
        app: c.app.clone(),
        container: c.container.clone(),
        cpu_percent: cpu_percent(s),
        memory_bytes: mem.map_or(0, |m| {
            let usage = m.usage.unwrap_or(0);
            // `docker stats` subtracts the page cache: cgroup v2 reports it as
            // inactive_file, v1 as total_inactive_file.
            let stats = m.stats.as_ref();
            let cache = stats
                .and_then(|st| {
                    st.get("inactive_file")
                        .or_else(|| st.get("total_inactive_file"))
                })
                .copied()
                .unwrap_or(0);
            usage.saturating_sub(cache)
        }),
        memory_limit_bytes: mem.and_then(|m| m.limit),
    }
}

/// Percent of one core, as `docker stats` computes it.
fn cpu_percent(s: &ContainerStatsResponse) -> f32 {
    let (Some(cpu), Some(pre)) = (s.cpu_stats.as_ref(), s.precpu_stats.as_ref()) else {
        return 0.0;
    };
    let total = |c: &bollard::models::ContainerCpuStats| {
        c.cpu_usage
            .as_ref()
            .and_then(|u| u.total_usage)
            .unwrap_or(0)
    };
    let cpu_delta = total(cpu).saturating_sub(total(pre)) as f64;
    let system_delta = cpu
        .system_cpu_usage
        .unwrap_or(0)
        .saturating_sub(pre.system_cpu_usage.unwrap_or(0)) as f64;
    let online = cpu
        .online_cpus
        .map(f64::from)
        .filter(|n| *n > 0.0)
        .or_else(|| {
            cpu.cpu_usage
                .as_ref()
                .and_then(|u| u.percpu_usage.as_ref())
                .map(|p| p.len() as f64)
        })
        .unwrap_or(1.0);
    if system_delta > 0.0 && cpu_delta > 0.0 {
        (cpu_delta / system_delta * online * 100.0) as f32
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerCpuStats, ContainerCpuUsage};

    fn cpu(total: u64, system: u64) -> ContainerCpuStats {
        ContainerCpuStats {
            cpu_usage: Some(ContainerCpuUsage {
                total_usage: Some(total),
                ..Default::default()
            }),
            system_cpu_usage: Some(system),
            online_cpus: Some(4),
            ..Default::default()
        }
    }

    #[test]
    fn cpu_percent_matches_docker_stats() {
        let s = ContainerStatsResponse {
            cpu_stats: Some(cpu(300, 2000)),
            precpu_stats: Some(cpu(100, 1000)),
            ..Default::default()
        };
        // 200 of 1000 system ticks on 4 cpus: 80% of one core.
        assert!((cpu_percent(&s) - 80.0).abs() < 1e-3);
        let first = ContainerStatsResponse {
            cpu_stats: Some(cpu(300, 2000)),
            precpu_stats: None,
            ..Default::default()
        };
        assert_eq!(cpu_percent(&first), 0.0);
    }
}
