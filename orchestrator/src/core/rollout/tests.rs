use super::*;

fn spec() -> RolloutSpec {
    RolloutSpec {
        app: Name::new("web").expect("accepted"),
        selector: "all".into(),
        to_release: 2,
        batches: vec![BatchSize::Count(1), BatchSize::Percent(50)],
        max_unavailable: None,
        success_threshold_percent: 100,
        on_failure: FailurePolicy::Rollback,
        device_timeout_ms: 1000,
        min_ready_ms: 0,
        approval: false,
        author: "ops".into(),
        agent_version: None,
    }
}

fn d(i: usize) -> DeviceId {
    DeviceId::new(format!("d{i:05}")).expect("accepted")
}

fn targets(n: usize) -> BTreeMap<DeviceId, u64> {
    (0..n).map(|i| (d(i), 1)).collect()
}

fn ok() -> Observation {
    Observation {
        release: 2,
        ready: true,
        failed: None,
    }
}

fn unready() -> Observation {
    Observation {
        ready: false,
        ..ok()
    }
}

fn failed(why: &str) -> Observation {
    Observation {
        failed: Some(why.into()),
        ready: false,
        ..ok()
    }
}

fn old() -> Observation {
    Observation {
        release: 1,
        ready: true,
        failed: None,
    }
}

fn sets(fx: &[Effect]) -> Vec<(DeviceId, u64)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::SetRelease { device, release } => Some((device.clone(), *release)),
            _ => None,
        })
        .collect()
}

fn sorted_sets(fx: &[Effect]) -> Vec<(DeviceId, u64)> {
    let mut s = sets(fx);
    s.sort();
    s
}

fn start(s: RolloutSpec, n: usize) -> Rollout {
    Rollout::new("r".into(), s, targets(n), 0)
        .expect("accepted")
        .0
}

fn state(r: &Rollout, i: usize) -> DeviceProgress {
    r.device(&d(i)).expect("accepted").clone()
}

/// The counters, the deadline index and the cursor agree with the devices.
fn check_invariants(r: &Rollout) {
    let mut counts: Vec<BatchCounts> =
        r.s.batches
            .iter()
            .map(|b| BatchCounts {
                total: b.len(),
                ..Default::default()
            })
            .collect();
    let mut deadlines = BTreeSet::new();
    for (dev, e) in &r.s.devices {
        *counts[e.batch].slot(&e.progress) += 1;
        if let Some(t) = r.deadline_of(&e.progress) {
            deadlines.insert((t, dev.clone()));
        }
    }
    assert_eq!(counts, r.s.counts, "counters");
    assert_eq!(
        r.s.rolling_back,
        counts.iter().map(|c| c.rolling_back).sum::<usize>()
    );
    if !r.phase().is_final() {
        assert_eq!(deadlines, r.deadlines, "deadline index");
    }
    if let Some(b) = r.s.batches.get(r.s.current) {
        for dev in &b[..r.s.cursor] {
            assert_ne!(r.s.devices[dev].progress, DeviceProgress::Pending);
        }
    }
}

// ---- batches and validation ----

#[test]
fn batches_are_per_batch_and_last_takes_the_rest() {
    let (r, fx) = Rollout::new("r".into(), spec(), targets(4), 0).expect("accepted");
    assert_eq!(
        r.batches().iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 2, 1]
    );
    assert_eq!(fx[0], Effect::Changed);
    assert_eq!(sets(&fx), vec![(d(0), 2)]);
    assert_eq!(r.from_release(), 1);
    // a percentage rounds down, to at least one device
    let r = start(spec(), 3);
    assert_eq!(
        r.batches().iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 1, 1]
    );
    let mut s = spec();
    s.batches = vec![BatchSize::Percent(1)];
    let r = start(s, 3);
    assert_eq!(
        r.batches().iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 2]
    );
    // more batches than devices: the extra ones are dropped
    let mut s = spec();
    s.batches = vec![BatchSize::Count(5), BatchSize::Count(5)];
    assert_eq!(start(s, 3).batches().len(), 1);
}

#[test]
fn validate_names_the_field() {
    let bad = |f: &dyn Fn(&mut RolloutSpec), name: &str| {
        let mut s = spec();
        f(&mut s);
        match s.validate() {
            Err(RolloutError::Field { field, .. }) => assert_eq!(field, name),
            other => panic!("{name}: {other:?}"),
        }
    };
    bad(&|s| s.batches = vec![BatchSize::Percent(0)], "batches[0]");
    bad(
        &|s| s.batches = vec![BatchSize::Count(1), BatchSize::Count(0)],
        "batches[1]",
    );
    bad(&|s| s.batches = vec![BatchSize::Percent(101)], "batches[0]");
    bad(
        &|s| s.max_unavailable = Some(BatchSize::Count(0)),
        "max_unavailable",
    );
    bad(
        &|s| s.success_threshold_percent = 101,
        "success_threshold_percent",
    );
    bad(&|s| s.device_timeout_ms = 0, "device_timeout_ms");
    bad(&|s| s.to_release = 0, "to_release");
    assert!(matches!(
        Rollout::new("r".into(), spec(), BTreeMap::new(), 0),
        Err(RolloutError::Field { field, .. }) if field == "selector"
    ));
}

#[test]
fn batch_size_serialises_as_a_number_or_a_percentage() {
    assert_eq!(
        serde_json::to_string(&BatchSize::Count(3)).expect("accepted"),
        "3"
    );
    assert_eq!(
        serde_json::to_string(&BatchSize::Percent(50)).expect("accepted"),
        "\"50%\""
    );
    let parse = |s: &str| serde_json::from_str::<BatchSize>(s);
    assert_eq!(parse("3").expect("accepted"), BatchSize::Count(3));
    assert_eq!(parse("\"50%\"").expect("accepted"), BatchSize::Percent(50));
    assert_eq!(
        parse("\"100%\"").expect("accepted"),
        BatchSize::Percent(100)
    );
    for (input, says) in [
        ("\"0%\"", "1% to 100%"),
        ("\"150%\"", "1% to 100%"),
        ("\"300%\"", "1% to 100%"),
        ("\"abc\"", "a device count (3) or a percentage"),
        ("\"50\"", "a device count (3) or a percentage"),
        ("0", "at least 1"),
        ("-1", "at least 1"),
        ("1.5", "a device count (3) or a percentage"),
    ] {
        let e = parse(input).expect_err("refused").to_string();
        assert!(e.contains(says), "{input}: {e}");
    }
}

// ---- the happy path, min-ready, timeouts ----

#[test]
fn happy_path_runs_every_batch_and_succeeds() {
    let mut r = start(spec(), 4);
    let fx = r.observe(&d(0), ok(), 10);
    assert_eq!(fx[0], Effect::Changed);
    assert_eq!(sets(&fx), vec![(d(1), 2), (d(2), 2)]);
    assert!(r.observe(&d(0), ok(), 11).is_empty(), "idempotent");
    assert_eq!(r.summary().current_batch, 1);
    r.observe(&d(1), ok(), 20);
    let fx = r.observe(&d(2), ok(), 20);
    assert_eq!(sets(&fx), vec![(d(3), 2)]);
    check_invariants(&r);
    let fx = r.observe(&d(3), ok(), 30);
    assert!(fx.contains(&Effect::Finished(Phase::Succeeded)));
    assert_eq!(r.summary().percent, 100);
    assert_eq!(r.next_deadline(), None);
    assert!(r.observe(&d(3), ok(), 31).is_empty());
    assert!(r.tick(10_000).is_empty());
}

#[test]
fn reports_that_change_nothing_yield_nothing() {
    let mut r = start(spec(), 4);
    // still on the old release, or unready on the new: nothing
    assert!(r.observe(&d(0), old(), 1).is_empty());
    assert!(r.observe(&d(0), unready(), 1).is_empty());
    // a failure of the old release is not the new release's failure
    assert!(r
        .observe(
            &d(0),
            Observation {
                release: 1,
                ..failed("x")
            },
            1
        )
        .is_empty());
    // a Pending device's reports are ignored
    assert!(r.observe(&d(3), ok(), 1).is_empty());
    assert_eq!(state(&r, 3), DeviceProgress::Pending);
    // an unknown device too
    assert!(r
        .observe(&DeviceId::new("elsewhere").expect("accepted"), ok(), 1)
        .is_empty());
    assert!(r
        .device_gone(&DeviceId::new("elsewhere").expect("accepted"), 1)
        .is_empty());
}

#[test]
fn min_ready_and_ready_then_unready_restarts_timer() {
    let mut s = spec();
    s.min_ready_ms = 100;
    let mut r = start(s, 2);
    r.observe(&d(0), ok(), 10);
    assert_eq!(
        state(&r, 0),
        DeviceProgress::Ready {
            since_ms: 10,
            updating_since_ms: 0
        }
    );
    assert_eq!(r.next_deadline(), Some(110));
    assert!(
        r.observe(&d(0), ok(), 20).is_empty(),
        "still ready: nothing"
    );
    // Ready → Updating: the min-ready timer restarts, the timeout does not
    r.observe(&d(0), unready(), 50);
    assert_eq!(state(&r, 0), DeviceProgress::Updating { since_ms: 0 });
    assert_eq!(r.next_deadline(), Some(1000));
    r.observe(&d(0), ok(), 60);
    assert_eq!(r.next_deadline(), Some(160));
    assert!(r.tick(159).is_empty());
    // Ready → Updated at the deadline
    let fx = r.tick(160);
    assert_eq!(state(&r, 0), DeviceProgress::Updated);
    assert_eq!(sets(&fx), vec![(d(1), 2)]);
    check_invariants(&r);
}

#[test]
fn ready_then_failed_fails() {
    let mut s = spec();
    s.min_ready_ms = 100;
    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 2);
    r.observe(&d(0), ok(), 10);
    r.observe(&d(0), failed("crash loop"), 20);
    assert_eq!(
        state(&r, 0),
        DeviceProgress::Failed {
            reason: "crash loop".into()
        }
    );
    check_invariants(&r);
}

#[test]
fn timeout_fails_and_rollback_touches_only_touched_devices() {
    let mut r = start(spec(), 4);
    r.observe(&d(0), ok(), 10); // batch 2 starts at 10
    assert_eq!(r.next_deadline(), Some(1010));
    assert!(r.tick(1009).is_empty());
    let fx = r.tick(1010);
    // d1 and d2 timed out (Updating → Failed), which started the rollback
    assert_eq!(state(&r, 1), DeviceProgress::RollingBack { since_ms: 1010 });
    assert_eq!(r.phase(), Phase::RollingBack);
    assert_eq!(sorted_sets(&fx), vec![(d(0), 1), (d(1), 1), (d(2), 1)]);
    assert_eq!(state(&r, 3), DeviceProgress::Pending);
    check_invariants(&r);
    r.observe(&d(0), old(), 1020);
    r.observe(&d(1), old(), 1020);
    let fx = r.observe(&d(2), old(), 1020);
    assert!(fx.contains(&Effect::Finished(Phase::RolledBack)));
    assert_eq!(state(&r, 0), DeviceProgress::RolledBack);
    assert_eq!(state(&r, 3), DeviceProgress::Pending);
}

#[test]
fn rollback_times_out_too() {
    let mut r = start(spec(), 1);
    r.observe(&d(0), failed("crash loop"), 5);
    assert_eq!(r.phase(), Phase::RollingBack);
    assert_eq!(state(&r, 0), DeviceProgress::RollingBack { since_ms: 5 });
    assert_eq!(r.next_deadline(), Some(1005));
    let fx = r.tick(1005);
    assert!(fx.contains(&Effect::Finished(Phase::RolledBack)));
    assert!(
        matches!(state(&r, 0), DeviceProgress::Failed { ref reason } if reason.contains("rollback"))
    );
}

// ---- failure policies and thresholds ----

#[test]
fn broken_canary_rolls_back_only_the_canary() {
    let mut all = Vec::new();
    let (mut r, fx) = Rollout::new("r".into(), spec(), targets(10), 0).expect("accepted");
    all.extend(sets(&fx));
    assert_eq!(all, vec![(d(0), 2)]);
    let fx = r.observe(&d(0), failed("health check failed"), 5);
    all.extend(sets(&fx));
    assert_eq!(r.phase(), Phase::RollingBack);
    assert_eq!(sets(&fx), vec![(d(0), 1)]);
    let fx = r.observe(&d(0), old(), 6);
    all.extend(sets(&fx));
    assert_eq!(
        fx,
        vec![Effect::Changed, Effect::Finished(Phase::RolledBack)]
    );
    assert_eq!(r.phase(), Phase::RolledBack);
    assert_eq!(all, vec![(d(0), 2), (d(0), 1)], "no other device touched");
    for i in 1..10 {
        assert_eq!(state(&r, i), DeviceProgress::Pending);
    }
    // a final rollout ignores everything
    assert!(r.observe(&d(0), ok(), 7).is_empty());
    assert!(r.tick(100_000).is_empty());
    assert!(r.device_gone(&d(1), 8).is_empty());
}

#[test]
fn rollback_puts_an_absent_app_back_to_absent() {
    let mut t = targets(2);
    t.insert(d(0), 0);
    let (mut r, _) = Rollout::new("r".into(), spec(), t, 0).expect("accepted");
    let fx = r.observe(&d(0), failed("exit 1"), 5);
    assert_eq!(sets(&fx), vec![(d(0), 0)]);
    let fx = r.observe(
        &d(0),
        Observation {
            release: 0,
            ready: false,
            failed: None,
        },
        6,
    );
    assert!(fx.contains(&Effect::Finished(Phase::RolledBack)));
}

#[test]
fn pause_policy_and_continue_policy() {
    let mut s = spec();
    s.on_failure = FailurePolicy::Pause;
    let mut r = start(s.clone(), 3);
    let fx = r.observe(&d(0), failed("pull"), 5);
    assert_eq!(r.phase(), Phase::Paused);
    assert!(sets(&fx).is_empty());
    let fx = r.resume(6).expect("accepted");
    assert_eq!(r.phase(), Phase::Running);
    assert_eq!(sets(&fx), vec![(d(1), 2)]);
    r.observe(&d(1), ok(), 7);
    let fx = r.observe(&d(2), ok(), 8);
    assert!(fx.contains(&Effect::Finished(Phase::Failed)));

    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 2);
    r.observe(&d(0), failed("pull"), 5);
    assert_eq!(r.phase(), Phase::Running);
    let fx = r.observe(&d(1), ok(), 6);
    assert!(fx.contains(&Effect::Finished(Phase::Failed)));
}

#[test]
fn resume_after_a_failure_pause_accepts_that_batch_only() {
    let mut s = spec();
    s.batches = vec![BatchSize::Count(2)];
    s.on_failure = FailurePolicy::Pause;
    let mut r = start(s, 4);
    r.observe(&d(0), failed("x"), 1);
    assert_eq!(r.phase(), Phase::Paused);
    r.resume(2).expect("accepted");
    // another failure in the accepted batch does not pause again
    r.observe(&d(1), failed("y"), 3);
    assert_eq!(r.phase(), Phase::Running);
    assert_eq!(r.summary().current_batch, 1);
    // a failure in the next batch does
    r.observe(&d(2), failed("z"), 4);
    assert_eq!(r.phase(), Phase::Paused);
    check_invariants(&r);
}

#[test]
fn threshold_below_100_tolerates_failures() {
    let mut s = spec();
    s.batches = vec![];
    s.success_threshold_percent = 50;
    let mut r = start(s.clone(), 4);
    r.observe(&d(0), failed("x"), 5);
    r.observe(&d(1), failed("x"), 5);
    assert_eq!(r.phase(), Phase::Running, "2 of 4 may still succeed");
    r.observe(&d(2), ok(), 6);
    let fx = r.observe(&d(3), ok(), 6);
    assert!(fx.contains(&Effect::Finished(Phase::Failed)));

    // a third failure makes 50 % unreachable: the policy applies
    for (policy, phase) in [
        (FailurePolicy::Rollback, Phase::RollingBack),
        (FailurePolicy::Pause, Phase::Paused),
        (FailurePolicy::Continue, Phase::Running),
    ] {
        s.on_failure = policy;
        let mut r = start(s.clone(), 4);
        for i in 0..3 {
            r.observe(&d(i), failed("x"), 5);
        }
        assert_eq!(r.phase(), phase, "{policy:?}");
        check_invariants(&r);
    }

    // threshold 0: every device may fail
    s.success_threshold_percent = 0;
    s.on_failure = FailurePolicy::Rollback;
    let mut r = start(s, 2);
    r.observe(&d(0), failed("x"), 5);
    let fx = r.observe(&d(1), failed("x"), 5);
    assert!(fx.contains(&Effect::Finished(Phase::Failed)));
}

#[test]
fn max_unavailable_bounds_updating() {
    let mut s = spec();
    s.batches = vec![];
    s.max_unavailable = Some(BatchSize::Count(2));
    s.min_ready_ms = 10;
    let (mut r, fx) = Rollout::new("r".into(), s.clone(), targets(5), 0).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(0), 2), (d(1), 2)]);
    // Ready (not yet for min_ready) still counts as unavailable
    assert!(sets(&r.observe(&d(0), ok(), 1)).is_empty());
    let fx = r.tick(11);
    assert_eq!(sets(&fx), vec![(d(2), 2)]);
    // a failure (threshold 100 → rollback) is not the point here
    check_invariants(&r);

    // as a percentage of all devices, at least one
    s.max_unavailable = Some(BatchSize::Percent(10));
    s.min_ready_ms = 0;
    let (mut r, fx) = Rollout::new("r".into(), s, targets(5), 0).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(0), 2)]);
    let fx = r.observe(&d(0), ok(), 1);
    assert_eq!(sets(&fx), vec![(d(1), 2)]);
}

// ---- approval and operator actions ----

#[test]
fn approval_waits_between_batches() {
    let mut s = spec();
    s.approval = true;
    let mut r = start(s, 4);
    let fx = r.observe(&d(0), ok(), 1);
    assert!(sets(&fx).is_empty());
    assert_eq!(r.phase(), Phase::WaitingApproval);
    assert_eq!(r.summary().current_batch, 1);
    assert!(r.resume(2).is_err());
    let fx = r.approve(2).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(1), 2), (d(2), 2)]);
    assert!(matches!(
        r.approve(3),
        Err(RolloutError::InvalidTransition {
            phase: Phase::Running,
            ..
        })
    ));
    r.observe(&d(1), ok(), 4);
    r.observe(&d(2), ok(), 4);
    assert_eq!(r.phase(), Phase::WaitingApproval);
    // WaitingApproval → Paused → (resume) WaitingApproval
    r.pause(5).expect("accepted");
    assert_eq!(r.phase(), Phase::Paused);
    let fx = r.resume(6).expect("accepted");
    assert!(sets(&fx).is_empty());
    assert_eq!(r.phase(), Phase::WaitingApproval);
    let fx = r.approve(7).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(3), 2)]);
    let fx = r.observe(&d(3), ok(), 8);
    assert!(
        fx.contains(&Effect::Finished(Phase::Succeeded)),
        "no approval after the last batch"
    );
}

#[test]
fn operator_actions() {
    let mut r = start(spec(), 3);
    r.pause(1).expect("accepted");
    assert!(r.pause(1).is_err());
    assert!(r.approve(1).is_err());
    // a device that becomes ready while paused is promoted; no new device
    // starts until resume
    let fx = r.observe(&d(0), ok(), 2);
    assert!(sets(&fx).is_empty());
    assert_eq!(state(&r, 0), DeviceProgress::Updated);
    let fx = r.resume(3).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(1), 2)]);
    r.abort(4).expect("accepted");
    assert!(r.abort(5).is_err());
    assert!(r.rollback(5).is_err());
    assert!(r.pause(5).is_err());
    assert!(r.resume(5).is_err());
    assert!(r.supersede("new", 5).is_empty());
    let mut r = start(spec(), 3);
    let fx = r.supersede("new", 1);
    assert_eq!(sets(&fx), vec![]);
    assert!(fx.contains(&Effect::Finished(Phase::Superseded)));
    assert!(r.supersede("new", 2).is_empty());
    let mut r = start(spec(), 3);
    let fx = r.rollback(1).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(0), 1)]);
    assert!(r.rollback(2).is_err(), "already rolling back");
    assert!(r.pause(2).is_err());
}

#[test]
fn a_failure_while_paused_by_the_operator_applies_the_policy_on_resume() {
    let mut r = start(spec(), 3);
    r.pause(1).expect("accepted");
    let fx = r.observe(&d(0), failed("x"), 2);
    assert!(sets(&fx).is_empty());
    assert_eq!(r.phase(), Phase::Paused);
    let fx = r.resume(3).expect("accepted");
    assert_eq!(r.phase(), Phase::RollingBack);
    assert_eq!(sets(&fx), vec![(d(0), 1)]);
}

#[test]
fn ready_while_paused_is_promoted_on_resume_with_min_ready() {
    let mut s = spec();
    s.min_ready_ms = 50;
    let mut r = start(s, 3);
    r.pause(1).expect("accepted");
    r.observe(&d(0), ok(), 2);
    // the clock does not stop while paused
    let fx = r.tick(52);
    assert!(sets(&fx).is_empty());
    assert_eq!(state(&r, 0), DeviceProgress::Updated);
    let fx = r.resume(60).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(1), 2)]);
}

#[test]
fn ready_while_waiting_for_approval_of_the_next_batch() {
    // WaitingApproval → Running via approve with the batch already done
    // by the time of approval is not possible (the next batch is all
    // Pending); an approve starts it.
    let mut s = spec();
    s.approval = true;
    s.batches = vec![BatchSize::Count(1)];
    let mut r = start(s, 2);
    r.observe(&d(0), ok(), 1);
    assert_eq!(r.phase(), Phase::WaitingApproval);
    assert_eq!(state(&r, 1), DeviceProgress::Pending);
    let fx = r.approve(2).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(1), 2)]);
}

#[test]
fn manual_rollback_mid_batch() {
    let mut s = spec();
    s.min_ready_ms = 100;
    let mut r = start(s, 6); // batches 1, 3, 2
    r.observe(&d(0), ok(), 1);
    r.tick(101); // d0 Updated, batch 1 starts: d1..d3
    r.observe(&d(1), ok(), 110); // Ready
    r.observe(&d(2), failed("x"), 110); // Failed → policy rollback!
    assert_eq!(r.phase(), Phase::RollingBack);
    // the same via the operator, with one each of Updated, Ready,
    // Updating in flight
    let mut s = spec();
    s.min_ready_ms = 100;
    let mut r = start(s, 6);
    r.observe(&d(0), ok(), 1);
    r.tick(101);
    r.observe(&d(1), ok(), 110);
    let fx = r.rollback(120).expect("accepted");
    assert_eq!(r.phase(), Phase::RollingBack);
    assert_eq!(
        sorted_sets(&fx),
        vec![(d(0), 1), (d(1), 1), (d(2), 1), (d(3), 1)]
    );
    for i in 0..4 {
        assert_eq!(state(&r, i), DeviceProgress::RollingBack { since_ms: 120 });
    }
    assert_eq!(state(&r, 4), DeviceProgress::Pending);
    check_invariants(&r);
    // a device reporting the new release while rolling back: nothing
    assert!(r.observe(&d(1), ok(), 121).is_empty());
    // a device gone while rolling back is skipped
    r.device_gone(&d(3), 122);
    assert_eq!(state(&r, 3), DeviceProgress::Skipped);
    for i in 0..2 {
        r.observe(&d(i), old(), 130);
    }
    let fx = r.observe(&d(2), old(), 130);
    assert!(fx.contains(&Effect::Finished(Phase::RolledBack)));
    check_invariants(&r);
}

#[test]
fn rollback_and_abort_from_every_live_phase() {
    let mut s = spec();
    s.approval = true;
    let waiting = || {
        let mut r = start(s.clone(), 4);
        r.observe(&d(0), ok(), 1);
        assert_eq!(r.phase(), Phase::WaitingApproval);
        r
    };
    // WaitingApproval → RollingBack: only the first batch goes back
    let mut r = waiting();
    let fx = r.rollback(2).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(0), 1)]);
    // Paused → RollingBack
    let mut r = waiting();
    r.pause(2).expect("accepted");
    let fx = r.rollback(3).expect("accepted");
    assert_eq!(sets(&fx), vec![(d(0), 1)]);
    assert_eq!(r.phase(), Phase::RollingBack);
    // RollingBack → Aborted: devices keep what they run
    let fx = r.abort(4).expect("accepted");
    assert_eq!(fx, vec![Effect::Changed, Effect::Finished(Phase::Aborted)]);
    assert_eq!(r.next_deadline(), None);
    assert!(r.observe(&d(0), old(), 5).is_empty());
    // RollingBack → Superseded
    let mut r = waiting();
    r.rollback(2).expect("accepted");
    assert!(r
        .supersede("new", 3)
        .contains(&Effect::Finished(Phase::Superseded)));
    // WaitingApproval → Aborted, Paused → Aborted, Running → Aborted
    let mut r = waiting();
    assert!(r
        .abort(2)
        .expect("accepted")
        .contains(&Effect::Finished(Phase::Aborted)));
    let mut r = waiting();
    r.pause(2).expect("accepted");
    assert!(r
        .abort(3)
        .expect("accepted")
        .contains(&Effect::Finished(Phase::Aborted)));
    let mut r = start(spec(), 4);
    let fx = r.abort(1).expect("accepted");
    assert!(sets(&fx).is_empty(), "abort rolls nothing back");
    assert_eq!(r.phase(), Phase::Aborted);
    // WaitingApproval → Superseded, Paused → Superseded
    let mut r = waiting();
    assert!(r
        .supersede("new", 2)
        .contains(&Effect::Finished(Phase::Superseded)));
    let mut r = waiting();
    r.pause(2).expect("accepted");
    assert!(r
        .supersede("new", 3)
        .contains(&Effect::Finished(Phase::Superseded)));
    assert_eq!(r.phase(), Phase::Superseded);
}

// ---- devices leaving, re-reporting ----

#[test]
fn device_gone_is_skipped() {
    let mut s = spec();
    s.batches = vec![];
    let mut r = start(s.clone(), 2);
    r.observe(&d(0), ok(), 1);
    let fx = r.device_gone(&d(1), 2); // Updating → Skipped
    assert!(fx.contains(&Effect::Finished(Phase::Succeeded)));
    assert_eq!(r.summary().percent, 100);

    // Pending → Skipped: the batch start passes it
    let mut r = start(spec(), 4);
    r.device_gone(&d(1), 1);
    assert!(r.device_gone(&d(1), 1).is_empty(), "idempotent");
    let fx = r.observe(&d(0), ok(), 2);
    assert_eq!(sets(&fx), vec![(d(2), 2)]);
    check_invariants(&r);
    // Updated → Skipped
    r.device_gone(&d(0), 3);
    assert_eq!(state(&r, 0), DeviceProgress::Skipped);
    // a whole batch gone: the next one starts
    let fx = r.device_gone(&d(2), 4);
    assert_eq!(sets(&fx), vec![(d(3), 2)]);
    check_invariants(&r);

    // Ready → Skipped, Failed → Skipped
    let mut s = spec();
    s.batches = vec![];
    s.min_ready_ms = 10;
    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 3);
    r.observe(&d(0), ok(), 1);
    r.observe(&d(1), failed("x"), 1);
    r.device_gone(&d(0), 2);
    r.device_gone(&d(1), 2);
    assert_eq!(state(&r, 0), DeviceProgress::Skipped);
    assert_eq!(state(&r, 1), DeviceProgress::Skipped);
    let fx = r.observe(&d(2), ok(), 3);
    assert!(fx.is_empty() || !fx.contains(&Effect::Finished(Phase::Failed)));
    let fx = r.tick(13);
    assert!(fx.contains(&Effect::Finished(Phase::Succeeded)), "{fx:?}");
    check_invariants(&r);
}

#[test]
fn an_updated_device_reporting_the_old_release_stays_updated() {
    // Decision: once Updated, a device is done as far as the rollout goes;
    // putting it back on its desired release is the fleet's
    // level-triggered reconciliation. Its later reports change nothing.
    let mut r = start(spec(), 4);
    r.observe(&d(0), ok(), 1);
    assert!(r.observe(&d(0), old(), 2).is_empty());
    assert!(r.observe(&d(0), failed("x"), 2).is_empty());
    assert!(r.observe(&d(0), unready(), 2).is_empty());
    assert_eq!(state(&r, 0), DeviceProgress::Updated);
    assert_eq!(r.phase(), Phase::Running);
}

#[test]
fn a_failed_device_stays_failed() {
    let mut s = spec();
    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 2);
    r.observe(&d(0), failed("x"), 1);
    assert!(r.observe(&d(0), ok(), 2).is_empty());
    assert!(matches!(state(&r, 0), DeviceProgress::Failed { .. }));
}

#[test]
fn rollback_covers_updated_and_failed_devices_not_rolled_back_ones() {
    let mut s = spec();
    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 4);
    r.observe(&d(0), ok(), 1); // Updated
    r.observe(&d(1), failed("x"), 2); // Failed
    let fx = r.rollback(3).expect("accepted");
    assert_eq!(sorted_sets(&fx), vec![(d(0), 1), (d(1), 1), (d(2), 1)]);
    check_invariants(&r);
    // Rolled back, the failed device still says why it failed.
    r.observe(&d(1), old(), 4);
    assert_eq!(r.device(&d(1)), Some(&DeviceProgress::RolledBack));
    assert_eq!(r.failure_of(&d(1)), Some("x"));
    let v = r.device_view(&d(1), 0, r.device(&d(1)).expect("known"));
    assert!(v.reason.as_deref().unwrap_or("").contains('x'), "{v:?}");
    assert_eq!(r.failure_of(&d(0)), None);
}

// ---- persistence ----

#[test]
fn serde_roundtrip_mid_batch_and_resume_effects() {
    let mut s = spec();
    s.min_ready_ms = 100;
    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 6); // batches 1, 3, 2
    r.observe(&d(0), ok(), 1);
    r.tick(101); // batch 1: d1, d2, d3 start at 101
    r.observe(&d(1), ok(), 110); // Ready
    r.observe(&d(2), failed("x"), 110); // Failed
    let json = serde_json::to_string(&r).expect("accepted");
    assert!(!json.contains("deadlines"), "the index is not stored");
    let mut r2: Rollout = serde_json::from_str(&json).expect("accepted");
    check_invariants(&r2);
    assert_eq!(r2.summary(), r.summary());
    assert_eq!(r2.next_deadline(), r.next_deadline());
    // only the devices in flight (Updating, Ready) get SetRelease again
    assert_eq!(sets(&r2.resume_effects(200)), vec![(d(1), 2), (d(3), 2)]);
    // and it goes on where it was
    r2.tick(210); // d1 Updated
    let fx = r2.observe(&d(3), ok(), 220);
    let fx2 = r2.tick(320);
    assert!(sets(&fx).is_empty());
    assert_eq!(sets(&fx2), vec![(d(4), 2), (d(5), 2)]);

    // while rolling back: the previous release, only to RollingBack devices
    let mut r = start(spec(), 4);
    r.observe(&d(0), ok(), 1);
    r.observe(&d(1), ok(), 2);
    r.observe(&d(2), failed("x"), 3);
    r.observe(&d(0), old(), 4); // RolledBack
    let r2: Rollout =
        serde_json::from_str(&serde_json::to_string(&r).expect("accepted")).expect("accepted");
    assert_eq!(r2.phase(), Phase::RollingBack);
    assert_eq!(sets(&r2.resume_effects(5)), vec![(d(1), 1), (d(2), 1)]);
    check_invariants(&r2);

    // a final rollout re-sends nothing
    let mut r = start(spec(), 1);
    r.abort(1).expect("accepted");
    let r2: Rollout =
        serde_json::from_str(&serde_json::to_string(&r).expect("accepted")).expect("accepted");
    assert!(r2.resume_effects(2).is_empty());
    assert_eq!(r2.next_deadline(), None);
}

#[test]
fn contract_views() {
    let mut s = spec();
    s.on_failure = FailurePolicy::Continue;
    let mut r = start(s, 4);
    r.observe(&d(0), failed("pull failed"), 1);
    let v = contract::Rollout::from(&r);
    assert_eq!(v.phase, contract::RolloutPhase::Running);
    assert_eq!((v.from_release, v.to_release), (1, 2));
    assert_eq!(v.batches.len(), 3);
    assert_eq!(v.counts.total, 4);
    assert_eq!(v.counts.failed, 1);
    assert_eq!(v.counts.updating, 2);
    assert_eq!(v.author, "ops");
    let devs: Vec<_> = r.devices().map(|(d, b, p)| device_view(d, b, p)).collect();
    assert_eq!(devs[0].state, contract::RolloutDeviceState::Failed);
    assert_eq!(devs[0].reason.as_deref(), Some("pull failed"));
    assert_eq!(devs[1].batch, 1);
    assert_eq!(devs[3].state, contract::RolloutDeviceState::Pending);
    let json = serde_json::to_value(&v).expect("accepted");
    assert_eq!(json["phase"], "running");
    let c: contract::CreateRollout =
        serde_json::from_str(r#"{"app":"web","batches":[1,"10%"],"on_failure":"pause"}"#)
            .expect("accepted");
    assert_eq!(c.batches, vec![BatchSize::Count(1), BatchSize::Percent(10)]);
    assert_eq!(FailurePolicy::from(c.on_failure), FailurePolicy::Pause);
    assert_eq!(c.success_threshold_percent, 100);
    let e = serde_json::from_str::<contract::CreateRollout>(r#"{"app":"web","batches":["0%"]}"#)
        .expect_err("refused");
    assert!(e.to_string().contains("1% to 100%"), "{e}");
}

// ---- cost ----

#[test]
fn ten_thousand_devices_in_one_batch_is_cheap() {
    let mut s = spec();
    s.batches = vec![];
    let (mut r, fx) = Rollout::new("r".into(), s, targets(10_000), 0).expect("accepted");
    assert_eq!(sets(&fx).len(), 10_000);
    let ids: Vec<DeviceId> = (0..10_000).map(d).collect();
    let t = std::time::Instant::now();
    for id in &ids {
        r.observe(id, ok(), 1);
        r.next_deadline();
    }
    assert_eq!(r.phase(), Phase::Succeeded);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn ten_batches_with_min_ready_and_ticks_are_cheap() {
    let mut s = spec();
    s.batches = vec![BatchSize::Percent(10); 10];
    s.min_ready_ms = 10;
    let (mut r, _) = Rollout::new("r".into(), s, targets(10_000), 0).expect("accepted");
    let t = std::time::Instant::now();
    let mut now = 0;
    for b in 0..10 {
        for i in b * 1000..(b + 1) * 1000 {
            r.observe(&d(i), ok(), now);
        }
        now = r.next_deadline().expect("accepted");
        r.tick(now);
    }
    assert_eq!(r.phase(), Phase::Succeeded);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
}
