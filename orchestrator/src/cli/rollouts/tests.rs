//! The pure parts of `drover rollouts` (arguments, tables, the progress
//! bar, the exit status) and `--wait` against a stand-in for the API.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use drover_shared::{DeviceId, Name};
use tokio::sync::mpsc;

use super::*;
use crate::cli::ClientCmd;

fn counts(total: usize, updated: usize, failed: usize) -> RolloutCounts {
    RolloutCounts {
        total,
        pending: total - updated - failed,
        updated,
        failed,
        ..Default::default()
    }
}

/// Three batches of 2, 8 and 10 devices, the second running.
fn rollout(phase: RolloutPhase, updated_at_ms: u64) -> Rollout {
    let batches = vec![counts(2, 2, 0), counts(8, 7, 0), counts(10, 0, 0)];
    Rollout {
        id: "r-1".into(),
        app: Name::new("web").expect("valid name"),
        agent_version: None,
        selector: "env=prod".into(),
        from_release: 3,
        to_release: 4,
        phase,
        created_at_ms: 1,
        author: "admin".into(),
        current_batch: 1,
        counts: counts(20, 9, 0),
        batches,
        percent: 45,
        on_failure: OnFailure::Rollback,
        approval: false,
        updated_at_ms,
        finished_at_ms: None,
        reason: None,
    }
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: ClientCmd,
}

fn parse(args: &[&str]) -> Result<RolloutsCmd, String> {
    let cli = Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    match cli.cmd {
        ClientCmd::Rollouts { cmd } => Ok(cmd.unwrap_or(RolloutsCmd::List { app: None })),
        other => Err(format!("not a rollouts command: {other:?}")),
    }
}

#[test]
fn batch_sizes_are_counts_or_percentages() {
    assert_eq!(parse_batch("3"), Ok(BatchSize::Count(3)));
    assert_eq!(parse_batch(" 50% "), Ok(BatchSize::Percent(50)));
    assert_eq!(parse_batch("100%"), Ok(BatchSize::Percent(100)));
    assert!(parse_batch("0").is_err_and(|e| e.contains("at least 1")));
    assert!(parse_batch("0%").is_err_and(|e| e.contains("1% to 100%")));
    assert!(parse_batch("150%").is_err_and(|e| e.contains("1% to 100%")));
    assert!(parse_batch("-2").is_err_and(|e| e.contains("device count")));
    assert!(parse_batch("half").is_err_and(|e| e.contains("\"half\"")));
}

#[test]
fn a_batch_list_names_its_bad_item() {
    assert_eq!(
        parse_batches("1,10%,50%").expect("valid"),
        vec![
            BatchSize::Count(1),
            BatchSize::Percent(10),
            BatchSize::Percent(50)
        ]
    );
    let err = parse_batches("1,5O%,50%")
        .expect_err("a letter O")
        .to_string();
    assert!(err.contains("item 2 (\"5O%\")"), "{err}");
    let err = parse_batches("1,,2")
        .expect_err("an empty item")
        .to_string();
    assert!(err.contains("item 2 (\"\")"), "{err}");
    assert!(parse_batches(" ").is_err());
}

#[test]
fn create_keeps_the_api_defaults_for_what_is_not_given() {
    let Ok(RolloutsCmd::Create(a)) = parse(&["rollouts", "create", "web"]) else {
        panic!("a create command");
    };
    let body = create_body(&a).expect("valid");
    assert_eq!(body.app.as_ref().map(Name::as_str), Some("web"));
    assert_eq!(body.agent_version, None);
    let Ok(RolloutsCmd::Create(a)) = parse(&["rollouts", "create", "--agent-version", "2.0"])
    else {
        panic!("an agent rollout");
    };
    let agent = create_body(&a).expect("valid");
    assert_eq!(
        (agent.app, agent.agent_version.as_deref()),
        (None, Some("2.0"))
    );
    assert!(parse(&["rollouts", "create", "web", "--agent-version", "2.0"]).is_err());
    assert!(parse(&["rollouts", "create"]).is_err());
    assert_eq!(body.selector, "");
    assert_eq!(body.release, 0, "0 is the latest release");
    assert!(body.batches.is_empty(), "one batch");
    assert_eq!(body.max_unavailable, None);
    assert_eq!(body.success_threshold_percent, 100);
    assert_eq!(body.on_failure, OnFailure::Rollback);
    assert_eq!(body.device_timeout_secs, 600);
    assert_eq!(body.min_ready_secs, 0);
    assert!(!body.approval);
    assert!(!a.wait.wait);
}

#[test]
fn create_takes_every_flag() {
    let Ok(RolloutsCmd::Create(a)) = parse(&[
        "rollouts",
        "create",
        "web",
        "--release",
        "7",
        "-l",
        "env=prod",
        "--batches",
        "1,50%",
        "--max-unavailable",
        "25%",
        "--threshold",
        "90%",
        "--on-failure",
        "pause",
        "--device-timeout",
        "120",
        "--min-ready",
        "30",
        "--approval",
        "--wait",
        "--timeout",
        "900",
    ]) else {
        panic!("a create command");
    };
    let body = create_body(&a).expect("valid");
    assert_eq!(body.release, 7);
    assert_eq!(body.selector, "env=prod");
    assert_eq!(
        body.batches,
        vec![BatchSize::Count(1), BatchSize::Percent(50)]
    );
    assert_eq!(body.max_unavailable, Some(BatchSize::Percent(25)));
    assert_eq!(body.success_threshold_percent, 90);
    assert_eq!(body.on_failure, OnFailure::Pause);
    assert_eq!(body.device_timeout_secs, 120);
    assert_eq!(body.min_ready_secs, 30);
    assert!(body.approval);
    assert!(a.wait.wait);
    assert_eq!(a.wait.timeout, 900);
    // What goes on the wire is what the server reads.
    let wire = serde_json::to_value(&body).expect("serialises");
    assert_eq!(wire["batches"], json!([1, "50%"]));
    assert_eq!(wire["max_unavailable"], json!("25%"));
}

#[test]
fn bad_create_arguments_are_refused_by_name() {
    let Ok(RolloutsCmd::Create(a)) = parse(&["rollouts", "create", "web", "--batches", "1,x"])
    else {
        panic!("a create command");
    };
    let err = create_body(&a).expect_err("bad batch").to_string();
    assert!(err.starts_with("--batches \"1,x\": item 2"), "{err}");
    let Ok(RolloutsCmd::Create(a)) =
        parse(&["rollouts", "create", "web", "--max-unavailable", "0"])
    else {
        panic!("a create command");
    };
    let err = create_body(&a).expect_err("zero").to_string();
    assert!(err.starts_with("--max-unavailable \"0\""), "{err}");
    let Ok(RolloutsCmd::Create(a)) = parse(&["rollouts", "create", "No Such App"]) else {
        panic!("a create command");
    };
    assert!(create_body(&a).is_err());
    let err = parse(&["rollouts", "create", "web", "--threshold", "101"]).expect_err("over 100");
    assert!(err.contains("0 to 100"), "{err}");
    let err = parse(&["rollouts", "create", "web", "--on-failure", "explode"]).expect_err("no");
    assert!(err.contains("rollback"), "{err}");
    let err = parse(&["rollouts", "pause", "r-1", "--timeout", "5"]).expect_err("no --wait");
    assert!(err.contains("--wait"), "{err}");
}

#[test]
fn commands_parse_with_their_defaults() {
    assert!(matches!(
        parse(&["rollouts"]),
        Ok(RolloutsCmd::List { app: None })
    ));
    assert!(matches!(
        parse(&["rollouts", "list", "--app", "web"]),
        Ok(RolloutsCmd::List { app: Some(a) }) if a == "web"
    ));
    let Ok(RolloutsCmd::Show(s)) = parse(&["rollouts", "show", "r-1", "--state", "failed"]) else {
        panic!("a show command");
    };
    assert_eq!(s.state, Some(RolloutDeviceState::Failed));
    assert_eq!((s.limit, s.offset), (100, 0));
    assert!(parse(&["rollouts", "show", "r-1", "--state", "broken"]).is_err());
    assert!(parse(&["rollouts", "show", "r-1", "--batch", "0"]).is_err());
    for (verb, want) in [
        ("pause", "Pause"),
        ("resume", "Resume"),
        ("approve", "Approve"),
        ("abort", "Abort"),
        ("rollback", "Rollback"),
    ] {
        let cmd = parse(&["rollouts", verb, "r-1", "--wait"]).expect("parses");
        assert!(format!("{cmd:?}").starts_with(want), "{cmd:?}");
    }
}

#[test]
fn the_list_shows_one_row_per_rollout() {
    let mut done = rollout(RolloutPhase::Succeeded, 5);
    done.id = "r-0".into();
    done.from_release = 0;
    done.to_release = 3;
    let out = rollouts_table(vec![rollout(RolloutPhase::Running, 5), done]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let cells: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        cells,
        ["ID", "APP", "RELEASE", "PHASE", "BATCH", "PROGRESS", "FAILED", "AUTHOR", "AGE"]
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &cells[..8],
        ["r-1", "web", "3->4", "running", "2/3", "9/20", "45%", "0"]
    );
    assert!(lines[2].contains("none->3"), "{out}");
}

#[test]
fn the_detail_marks_the_running_batch_and_says_why() {
    let mut r = rollout(RolloutPhase::Paused, 5);
    r.reason = Some("paused by an operator".into());
    let out = rollout_detail(&r);
    assert!(out.contains("phase:       paused (batch 2/3)"), "{out}");
    assert!(
        out.contains("progress:    9/20 updated (45%), 0 failed\n"),
        "{out}"
    );
    assert!(
        out.contains("reason:      paused by an operator\n"),
        "{out}"
    );
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("BATCH"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert_eq!(rows[0], ["1", "2", "0", "0", "2", "0", "0", "0", "0"]);
    assert_eq!(rows[1][0], "2*", "the running batch is marked");
    assert_eq!(rows[2][0], "3");
    // A rollout that ended runs no batch.
    let out = rollout_detail(&rollout(RolloutPhase::Aborted, 5));
    assert!(!out.contains("2*"), "{out}");
}

#[test]
fn the_devices_table_counts_batches_from_one() {
    let out = devices_table(vec![RolloutDevice {
        device: DeviceId::new("pi-1").expect("valid id"),
        batch: 0,
        state: RolloutDeviceState::Failed,
        reason: Some("no release 4 after 600s".into()),
    }]);
    assert_eq!(
        out,
        "DEVICE  BATCH  STATE   REASON\npi-1    1      failed  no release 4 after 600s\n"
    );
}

#[test]
fn the_bar_shows_percent_batch_counts_and_phase() {
    assert_eq!(
        bar_line(&rollout(RolloutPhase::Running, 5)),
        "[#########...........]  45%  batch 2/3  updated 9/20  failed 0  running"
    );
    let mut r = rollout(RolloutPhase::RollingBack, 5);
    r.percent = 100;
    r.counts.skipped = 1;
    r.counts.rolling_back = 2;
    r.counts.rolled_back = 1;
    assert_eq!(
        bar_line(&r),
        "[####################] 100%  batch 2/3  updated 9/19  failed 0  skipped 1  rolled back 1/3  rolling_back"
    );
    r.percent = 0;
    assert!(bar_line(&r).starts_with("[....................]   0%"));
}

#[test]
fn only_success_exits_zero() {
    assert!(outcome(&rollout(RolloutPhase::Succeeded, 5)).is_ok());
    let mut r = rollout(RolloutPhase::RolledBack, 5);
    r.reason = Some("batch 1 of 3: 1 of 2 devices failed".into());
    assert_eq!(
        outcome(&r).expect_err("rolled back").to_string(),
        "rollout r-1 ended rolled_back: batch 1 of 3: 1 of 2 devices failed"
    );
    for phase in [
        RolloutPhase::Failed,
        RolloutPhase::Aborted,
        RolloutPhase::Superseded,
    ] {
        let err = outcome(&rollout(phase, 5)).expect_err("not success");
        assert!(err.to_string().contains(phase_str(phase)), "{err}");
    }
}

#[test]
fn off_a_terminal_one_line_per_phase_or_batch() {
    let mut w = Watch::new(false);
    let mut r = rollout(RolloutPhase::Running, 5);
    assert_eq!(w.update(&r), format!("{}\n", bar_line(&r)));
    // Progress within the batch: nothing.
    r.counts.updated = 10;
    assert_eq!(w.update(&r), "");
    r.current_batch = 2;
    assert_eq!(w.update(&r), format!("{}\n", bar_line(&r)));
    // Waiting: the line, and once what to do about it.
    r.phase = RolloutPhase::WaitingApproval;
    assert_eq!(
        w.update(&r),
        format!(
            "{}\nwaiting for approval to start batch 3/3: drover rollouts approve r-1\n",
            bar_line(&r)
        )
    );
    assert_eq!(w.update(&r), "");
    r.phase = RolloutPhase::Paused;
    r.reason = Some("paused by an operator".into());
    assert!(w.update(&r).ends_with(
        "paused by an operator; go on with: drover rollouts resume r-1 (or rollback, abort)\n"
    ));
    assert_eq!(w.finish(), "");
}

#[test]
fn on_a_terminal_one_line_redrawn() {
    let mut w = Watch::new(true);
    let mut r = rollout(RolloutPhase::Running, 5);
    assert_eq!(w.update(&r), format!("\r{}\x1b[K", bar_line(&r)));
    assert_eq!(w.update(&r), "", "nothing new, nothing drawn");
    r.counts.updated = 10;
    r.percent = 50;
    assert_eq!(w.update(&r), format!("\r{}\x1b[K", bar_line(&r)));
    // A note clears the bar, takes a line of its own, and the bar follows.
    r.phase = RolloutPhase::RollingBack;
    r.reason = Some("batch 2 of 3: 3 of 8 devices failed: rolling back".into());
    assert_eq!(
        w.update(&r),
        format!(
            "\r\x1b[Kbatch 2 of 3: 3 of 8 devices failed: rolling back\n\r{}\x1b[K",
            bar_line(&r)
        )
    );
    assert_eq!(w.finish(), "\n");
    assert_eq!(w.finish(), "", "the line is ended once");
}

// `--wait` against a stand-in for the API.

struct Fake {
    rollout: Mutex<Rollout>,
    stream: Mutex<Option<mpsc::Receiver<String>>>,
    reads: mpsc::UnboundedSender<()>,
    subscribed: mpsc::UnboundedSender<HashMap<String, String>>,
}

async fn read_rollout(State(f): State<Arc<Fake>>, Path(id): Path<String>) -> Response {
    let _ = f.reads.send(());
    let r = f.rollout.lock().expect("lock").clone();
    if r.id != id {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(r).into_response()
}

async fn changes(State(f): State<Arc<Fake>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let _ = f.subscribed.send(q);
    let Some(rx) = f.stream.lock().expect("lock").take() else {
        return StatusCode::CONFLICT.into_response();
    };
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Infallible>(Event::default().data(data)), rx))
    });
    Sse::new(events).into_response()
}

struct Harness {
    client: Client,
    fake: Arc<Fake>,
    events: mpsc::Sender<String>,
    reads: mpsc::UnboundedReceiver<()>,
    subscribed: mpsc::UnboundedReceiver<HashMap<String, String>>,
}

const LONG: Duration = Duration::from_secs(30);

async fn start(r: &Rollout) -> Harness {
    let (events, stream) = mpsc::channel(16);
    let (reads_tx, reads) = mpsc::unbounded_channel();
    let (sub_tx, subscribed) = mpsc::unbounded_channel();
    let fake = Arc::new(Fake {
        rollout: Mutex::new(r.clone()),
        stream: Mutex::new(Some(stream)),
        reads: reads_tx,
        subscribed: sub_tx,
    });
    let app = Router::new()
        .route("/api/v1/rollouts/{id}", get(read_rollout))
        .route("/api/v1/changes", get(changes))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = Client::new(&format!("http://{addr}"), Output::Json, None, None)
        .expect("a client for the stand-in");
    Harness {
        client,
        fake,
        events,
        reads,
        subscribed,
    }
}

impl Harness {
    async fn following(&mut self) {
        let q = tokio::time::timeout(LONG, self.subscribed.recv())
            .await
            .expect("the CLI subscribes")
            .expect("the stand-in runs");
        assert_eq!(q.get("rollout").map(String::as_str), Some("r-1"), "{q:?}");
        assert_eq!(q.len(), 1, "only the rollout's changes: {q:?}");
        tokio::time::timeout(LONG, self.reads.recv())
            .await
            .expect("and reads the rollout once")
            .expect("the stand-in runs");
    }

    fn reads_since(&mut self) -> usize {
        let mut n = 0;
        while self.reads.try_recv().is_ok() {
            n += 1;
        }
        n
    }
}

fn change(r: &Rollout) -> String {
    json!({ "kind": "rollout", "rollout": r }).to_string()
}

fn waiting() -> WaitArgs {
    WaitArgs {
        wait: true,
        timeout: 0,
    }
}

#[tokio::test]
async fn wait_follows_the_rollout_through_a_pause_to_its_end() {
    let r = rollout(RolloutPhase::Running, 10);
    let mut h = start(&r).await;
    let client = h.client.clone();
    let task = tokio::spawn(async move { client.wait_rollout(r, &waiting()).await });
    h.following().await;
    let mut other = rollout(RolloutPhase::Failed, 15);
    other.id = "r-2".into();
    let mut paused = rollout(RolloutPhase::Paused, 20);
    paused.reason = Some("paused by an operator".into());
    let mut done = rollout(RolloutPhase::Succeeded, 30);
    done.current_batch = 2;
    done.percent = 100;
    for c in [
        change(&other),
        change(&paused),
        r#"{"kind":"something_new"}"#.to_string(),
        change(&done),
    ] {
        h.events.send(c).await.expect("the CLI listens");
    }
    let got = task.await.expect("no panic").expect("followed");
    assert_eq!(
        got.phase,
        RolloutPhase::Succeeded,
        "a pause is waited through"
    );
    assert_eq!(got.updated_at_ms, 30);
    assert_eq!(h.reads_since(), 0, "the end came on the stream");
}

#[tokio::test]
async fn wait_reads_again_after_lagging_and_ignores_older_changes() {
    let r = rollout(RolloutPhase::Running, 10);
    let mut h = start(&r).await;
    // Newer than what the command answered: the read after subscribing
    // sees it, and an older change on the stream does not undo it.
    *h.fake.rollout.lock().expect("lock") = rollout(RolloutPhase::WaitingApproval, 20);
    let client = h.client.clone();
    let task = tokio::spawn(async move { client.wait_rollout(r, &waiting()).await });
    h.following().await;
    h.events
        .send(change(&rollout(RolloutPhase::Running, 15)))
        .await
        .expect("the CLI listens");
    let mut rolled_back = rollout(RolloutPhase::RolledBack, 40);
    rolled_back.reason = Some("rolled back by an operator".into());
    *h.fake.rollout.lock().expect("lock") = rolled_back;
    h.events
        .send(r#"{"kind":"lagged","missed":3}"#.into())
        .await
        .expect("the CLI listens");
    let got = task.await.expect("no panic").expect("followed");
    assert_eq!(got.phase, RolloutPhase::RolledBack);
    assert_eq!(h.reads_since(), 1, "one read after the lagged event");
    assert!(outcome(&got).is_err(), "a rollback is not a success");
}

#[tokio::test]
async fn wait_gives_up_after_its_timeout_naming_the_phase() {
    let r = rollout(RolloutPhase::Running, 10);
    let mut h = start(&r).await;
    let client = h.client.clone();
    let task = tokio::spawn(async move {
        client
            .wait_rollout(
                r,
                &WaitArgs {
                    wait: true,
                    timeout: 1,
                },
            )
            .await
    });
    h.following().await;
    h.events
        .send(change(&rollout(RolloutPhase::Paused, 20)))
        .await
        .expect("the CLI listens");
    let err = task.await.expect("no panic").expect_err("times out");
    assert_eq!(err.to_string(), "rollout r-1 still paused after 1s");
}

#[tokio::test]
async fn wait_on_an_ended_rollout_asks_nothing() {
    let r = rollout(RolloutPhase::Aborted, 10);
    let mut h = start(&r).await;
    let got = h
        .client
        .wait_rollout(r, &waiting())
        .await
        .expect("nothing to wait for");
    assert_eq!(got.phase, RolloutPhase::Aborted);
    assert!(h.subscribed.try_recv().is_err(), "no subscription");
    assert_eq!(h.reads_since(), 0);
}
