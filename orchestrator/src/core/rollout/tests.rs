use super::*;

fn spec() -> RolloutSpec {
    RolloutSpec {
        app: "web".into(),
        selector: "all".into(),
        to_release: 2,
        batches: vec![BatchSize::Count(1), BatchSize::Percent(50)],
        max_unavailable: None,
        success_threshold_percent: 100,
        on_failure: FailurePolicy::Rollback,
        device_timeout_ms: 1000,
        min_ready_ms: 0,
        approval: false,
    }
}

fn targets(n: usize) -> BTreeMap<String, u64> {
    (0..n).map(|i| (format!("d{i:05}"), 1)).collect()
}

fn ok() -> Observation {
    Observation {
        release: 2,
        ready: true,
        failed: None,
    }
}

fn sets(fx: &[Effect]) -> Vec<(String, u64)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::SetRelease { device, release } => Some((device.clone(), *release)),
            _ => None,
        })
        .collect()
}

#[test]
fn batches_are_per_batch_and_last_takes_the_rest() {
    let (r, fx) = Rollout::new("r".into(), spec(), targets(4), 0).unwrap();
    assert_eq!(
        r.batches.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 2, 1]
    );
    assert_eq!(sets(&fx), vec![("d00000".into(), 2)]);
}

#[test]
fn validate_names_the_field() {
    let mut s = spec();
    s.batches = vec![BatchSize::Percent(0)];
    assert!(
        matches!(s.validate(), Err(RolloutError::Field { field, .. }) if field == "batches[0]")
    );
    let mut s = spec();
    s.success_threshold_percent = 101;
    assert!(
        matches!(s.validate(), Err(RolloutError::Field { field, .. }) if field == "success_threshold_percent")
    );
    assert!(Rollout::new("r".into(), spec(), BTreeMap::new(), 0).is_err());
}

#[test]
fn happy_path_runs_every_batch_and_succeeds() {
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(4), 0).unwrap();
    let fx = r.observe("d00000", ok(), 10);
    assert_eq!(sets(&fx), vec![("d00001".into(), 2), ("d00002".into(), 2)]);
    assert!(r.observe("d00000", ok(), 11).is_empty(), "idempotent");
    r.observe("d00001", ok(), 20);
    let fx = r.observe("d00002", ok(), 20);
    assert_eq!(sets(&fx), vec![("d00003".into(), 2)]);
    let fx = r.observe("d00003", ok(), 30);
    assert!(fx.contains(&Effect::Finished(Phase::Succeeded)));
    assert_eq!(r.summary().percent, 100);
    assert!(r.observe("d00003", ok(), 31).is_empty());
}

#[test]
fn min_ready_and_ready_then_unready_restarts_timer() {
    let mut s = spec();
    s.min_ready_ms = 100;
    let (mut r, _) = Rollout::new("r".into(), s, targets(2), 0).unwrap();
    r.observe("d00000", ok(), 10);
    assert_eq!(r.next_deadline(), Some(110));
    r.observe(
        "d00000",
        Observation {
            ready: false,
            ..ok()
        },
        50,
    );
    assert!(matches!(
        r.device("d00000"),
        Some(DeviceProgress::Updating { since_ms: 0 })
    ));
    r.observe("d00000", ok(), 60);
    assert!(r.tick(110).is_empty() || !matches!(r.device("d00000"), Some(DeviceProgress::Updated)));
    let fx = r.tick(160);
    assert_eq!(r.device("d00000"), Some(&DeviceProgress::Updated));
    assert_eq!(sets(&fx), vec![("d00001".into(), 2)]);
}

#[test]
fn timeout_fails_and_rollback_touches_only_touched_devices() {
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(4), 0).unwrap();
    r.observe("d00000", ok(), 10); // batch 2 starts at 10
    let fx = r.tick(1010);
    assert_eq!(r.phase, Phase::RollingBack);
    let mut s = sets(&fx);
    s.sort();
    assert_eq!(
        s,
        vec![
            ("d00000".into(), 1),
            ("d00001".into(), 1),
            ("d00002".into(), 1)
        ]
    );
    assert_eq!(r.device("d00003"), Some(&DeviceProgress::Pending));
    r.observe(
        "d00000",
        Observation {
            release: 1,
            ready: true,
            failed: None,
        },
        1020,
    );
    r.observe(
        "d00001",
        Observation {
            release: 1,
            ready: true,
            failed: None,
        },
        1020,
    );
    let fx = r.observe(
        "d00002",
        Observation {
            release: 1,
            ready: true,
            failed: None,
        },
        1020,
    );
    assert!(fx.contains(&Effect::Finished(Phase::RolledBack)));
}

#[test]
fn rollback_times_out_too() {
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(1), 0).unwrap();
    r.observe(
        "d00000",
        Observation {
            failed: Some("crash loop".into()),
            ..ok()
        },
        5,
    );
    assert_eq!(r.phase, Phase::RollingBack);
    assert_eq!(r.next_deadline(), Some(1005));
    let fx = r.tick(1005);
    assert!(fx.contains(&Effect::Finished(Phase::RolledBack)));
}

#[test]
fn pause_policy_and_continue_policy() {
    let mut s = spec();
    s.on_failure = FailurePolicy::Pause;
    let (mut r, _) = Rollout::new("r".into(), s.clone(), targets(2), 0).unwrap();
    r.observe(
        "d00000",
        Observation {
            failed: Some("pull".into()),
            ..ok()
        },
        5,
    );
    assert_eq!(r.phase, Phase::Paused);
    let fx = r.resume(6).unwrap();
    assert_eq!(sets(&fx), vec![("d00001".into(), 2)]);
    s.on_failure = FailurePolicy::Continue;
    let (mut r, _) = Rollout::new("r".into(), s, targets(2), 0).unwrap();
    r.observe(
        "d00000",
        Observation {
            failed: Some("pull".into()),
            ..ok()
        },
        5,
    );
    assert_eq!(r.phase, Phase::Running);
    let fx = r.observe("d00001", ok(), 6);
    assert!(fx.contains(&Effect::Finished(Phase::Failed)));
}

#[test]
fn threshold_below_100_tolerates_failures() {
    let mut s = spec();
    s.batches = vec![];
    s.success_threshold_percent = 50;
    let (mut r, _) = Rollout::new("r".into(), s, targets(2), 0).unwrap();
    r.observe(
        "d00000",
        Observation {
            failed: Some("x".into()),
            ..ok()
        },
        5,
    );
    assert_eq!(r.phase, Phase::Running);
    let fx = r.observe("d00001", ok(), 6);
    assert!(fx.contains(&Effect::Finished(Phase::Failed)));
}

#[test]
fn max_unavailable_bounds_updating() {
    let mut s = spec();
    s.batches = vec![];
    s.max_unavailable = Some(BatchSize::Count(2));
    let (mut r, fx) = Rollout::new("r".into(), s, targets(5), 0).unwrap();
    assert_eq!(sets(&fx).len(), 2);
    let fx = r.observe("d00000", ok(), 1);
    assert_eq!(sets(&fx), vec![("d00002".into(), 2)]);
}

#[test]
fn approval_waits_between_batches() {
    let mut s = spec();
    s.approval = true;
    let (mut r, _) = Rollout::new("r".into(), s, targets(3), 0).unwrap();
    let fx = r.observe("d00000", ok(), 1);
    assert!(sets(&fx).is_empty());
    assert_eq!(r.phase, Phase::WaitingApproval);
    assert!(r.resume(2).is_err());
    let fx = r.approve(2).unwrap();
    assert_eq!(sets(&fx).len(), 2);
    assert!(matches!(
        r.approve(3),
        Err(RolloutError::InvalidTransition {
            phase: Phase::Running,
            ..
        })
    ));
}

#[test]
fn operator_actions() {
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(3), 0).unwrap();
    r.pause(1).unwrap();
    assert!(r.pause(1).is_err());
    assert!(r
        .observe("d00000", ok(), 2)
        .iter()
        .all(|e| !matches!(e, Effect::SetRelease { .. })));
    let fx = r.resume(3).unwrap();
    assert_eq!(sets(&fx).len(), 1);
    r.abort(4).unwrap();
    assert!(r.abort(5).is_err());
    assert!(r.rollback(5).is_err());
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(3), 0).unwrap();
    let fx = r.supersede(1);
    assert_eq!(sets(&fx), vec![]);
    assert!(fx.contains(&Effect::Finished(Phase::Superseded)));
    assert!(r.supersede(2).is_empty());
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(3), 0).unwrap();
    let fx = r.rollback(1).unwrap();
    assert_eq!(sets(&fx), vec![("d00000".into(), 1)]);
}

#[test]
fn device_gone_is_skipped() {
    let mut s = spec();
    s.batches = vec![];
    let (mut r, _) = Rollout::new("r".into(), s, targets(2), 0).unwrap();
    r.observe("d00000", ok(), 1);
    let fx = r.device_gone("d00001", 2);
    assert!(fx.contains(&Effect::Finished(Phase::Succeeded)));
}

#[test]
fn serde_roundtrip_and_resume_effects() {
    let (mut r, _) = Rollout::new("r".into(), spec(), targets(4), 0).unwrap();
    r.observe("d00000", ok(), 1);
    let json = serde_json::to_string(&r).unwrap();
    let r2: Rollout = serde_json::from_str(&json).unwrap();
    let mut s = sets(&r2.resume_effects(2));
    s.sort();
    assert_eq!(s, vec![("d00001".into(), 2), ("d00002".into(), 2)]);
}

#[test]
fn ten_thousand_devices_in_one_batch_is_cheap() {
    let mut s = spec();
    s.batches = vec![];
    let (mut r, fx) = Rollout::new("r".into(), s, targets(10_000), 0).unwrap();
    assert_eq!(sets(&fx).len(), 10_000);
    let t = std::time::Instant::now();
    for i in 0..10_000 {
        r.observe(&format!("d{i:05}"), ok(), 1);
    }
    assert_eq!(r.phase, Phase::Succeeded);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}
