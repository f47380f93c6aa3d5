//! What the image platform check costs a rollout request: N simulated
//! agents (they report `aarch64`, so `linux/arm64`), an app whose image is
//! the real test image in the local registry (one manifest, `linux/amd64`),
//! and `POST /api/v1/rollouts` over the whole fleet, which the check
//! refuses after doing all of its work: one engine read of the targets,
//! the registry lookup (manifest, then the config blob) and the verdict
//! over every device. The first request finds the cache empty (the
//! registry is asked); the next `rounds` find the digest cached (the tag
//! resolved less than 30 s before). The registry requests come from the
//! orchestrator's own counters. A second app whose image is not in the
//! registry measures a rollout that goes ahead unchecked (the failure
//! cached after the first request). Nothing here asserts a timing.

use std::time::{Duration, Instant};

use tracing::info;

use super::{prepare_fds, unique_app, wait_online, Common, ScenarioError};
use crate::api::ApiError;
use crate::report::{ms, percentile, Table};
use crate::sim::Fleet;
use crate::target::Target;

/// The single-platform (`linux/amd64`) test image `scripts/test-env.sh`
/// pushes.
pub const IMAGE: &str = "127.0.0.1:5000/drover/busybox:2";

const REQUESTS: &str = "drover_image_platform_registry_requests_total";
const HITS: &str = "drover_image_platform_cache_hits_total";

pub async fn platform_check(
    c: &Common,
    n: usize,
    rounds: usize,
) -> Result<Vec<Table>, ScenarioError> {
    let fd_note = prepare_fds(n)?;
    let mut table = Table::new(
        format!("platform check: POST /api/v1/rollouts over {n} simulated devices"),
        &[
            "image",
            "request",
            "answer",
            "answered in",
            "registry requests",
            "cache hits",
        ],
    );
    table.note(fd_note);
    let mut t = Target::start(c.target.clone()).await?;
    table.note(c.setup_note(&t));
    let mut fleet = Fleet::new(c.sim(&t), "sim")?;
    let started = Instant::now();
    fleet.grow_to(n, c.ramp_per_sec).await?;
    wait_online(&mut t, &fleet, n, Duration::from_secs(600), started)
        .await
        .map_err(ScenarioError::Failed)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let selector = fleet.selector();

    for (label, image) in [
        ("in the registry, linux/amd64 only", IMAGE.to_string()),
        (
            "not in the registry",
            format!("127.0.0.1:5000/loadtest/absent:{}", crate::unique_suffix()),
        ),
    ] {
        let app = unique_app();
        t.api.create_app(&app, &image, None).await?;
        let mut warm = Vec::new();
        for round in 0..=rounds {
            let before = t.api.metrics().await?;
            let at = Instant::now();
            let answer = t
                .api
                .create_rollout(serde_json::json!({ "app": app, "selector": selector }))
                .await;
            let took = at.elapsed().as_secs_f64();
            let after = t.api.metrics().await?;
            let delta = |k: &str| {
                after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0)
            };
            let outcome = match &answer {
                Ok(r) => format!("201, {} device(s)", r.counts.total),
                Err(ApiError::Status { status, .. }) => status.to_string(),
                Err(e) => return Err(ScenarioError::Failed(e.to_string())),
            };
            info!(label, round, took, outcome, "platform check");
            if round == 0 {
                table.row(vec![
                    label.into(),
                    "first (cache empty)".into(),
                    outcome,
                    ms(took),
                    format!("{}", delta(REQUESTS)),
                    format!("{}", delta(HITS)),
                ]);
            } else {
                warm.push((took, outcome, delta(REQUESTS), delta(HITS)));
            }
        }
        if let Some((_, outcome, _, _)) = warm.last() {
            let mut times: Vec<f64> = warm.iter().map(|w| w.0).collect();
            times.sort_by(f64::total_cmp);
            table.row(vec![
                label.into(),
                format!("next {} (cached), p50 / p99", warm.len()),
                outcome.clone(),
                format!(
                    "{} / {}",
                    ms(percentile(&times, 50.0).unwrap_or(0.0)),
                    ms(percentile(&times, 99.0).unwrap_or(0.0))
                ),
                format!("{}", warm.iter().map(|w| w.2).sum::<f64>()),
                format!("{}", warm.iter().map(|w| w.3).sum::<f64>()),
            ]);
        }
    }
    table.note("the simulated agents report `aarch64` (no platform field), which the orchestrator reads as linux/arm64: the image in the registry is refused (409) after the whole check, its registry lookup and a verdict over every device; the absent image is not judged and each request creates a rollout (superseding the previous one), so its time includes creating the rollout");
    table.note("registry requests and cache hits: the orchestrator's drover_image_platform_registry_requests_total and drover_image_platform_cache_hits_total around each request; the registry is Debian's docker-registry on 127.0.0.1:5000, on this machine");
    fleet.shutdown(Duration::from_secs(10)).await;
    t.stop(c.keep).await;
    Ok(vec![table])
}
