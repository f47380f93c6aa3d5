//! `--wait` against a stand-in for the API that the test drives event by
//! event: what the CLI reads, how often it asks, and how it fails. The real
//! server is exercised end to end in `tests/tests/cli.rs`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use drover_shared::payload::{Op, Progress};
use drover_shared::{DeviceId, Name};
use tokio::sync::mpsc;

use super::*;
use crate::contract::{ErrorDetail, OpStatus};

fn operation(id: &str, status: OpStatus, step: Option<&str>, updated_at_ms: u64) -> Operation {
    Operation {
        id: id.into(),
        device: DeviceId::new("dev1").expect("valid id"),
        app: Name::new("web").expect("valid name"),
        op: Op::Deploy,
        generation: 3,
        status,
        detail: String::new(),
        progress: step.map(|s| Progress {
            step: s.into(),
            container: Name::new("main").expect("valid name"),
            current_bytes: None,
            total_bytes: None,
        }),
        created_at_ms: 1,
        updated_at_ms,
    }
}

fn change(op: &Operation) -> String {
    serde_json::json!({ "kind": "operation", "operation": op }).to_string()
}

/// What the stand-in serves and what it saw.
struct Fake {
    /// What `GET /api/v1/operations/{id}` answers.
    op: Mutex<Operation>,
    /// The change stream's events, handed to the first subscriber.
    stream: Mutex<Option<mpsc::Receiver<String>>>,
    /// One message per `GET /api/v1/operations/{id}`.
    reads: mpsc::UnboundedSender<()>,
    /// The `operation` filter of each subscription.
    subscribed: mpsc::UnboundedSender<Option<String>>,
}

fn not_found(what: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            status: 404,
            message: what,
            field: Some("operation".into()),
        },
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn read_op(State(f): State<Arc<Fake>>, Path(id): Path<String>) -> Response {
    let _ = f.reads.send(());
    let op = f.op.lock().expect("lock").clone();
    if op.id != id {
        return not_found(format!("operation {id:?} does not exist"));
    }
    Json(op).into_response()
}

async fn changes(State(f): State<Arc<Fake>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let wanted = q.get("operation").cloned();
    let _ = f.subscribed.send(wanted.clone());
    if wanted.as_deref() != Some(f.op.lock().expect("lock").id.as_str()) {
        let id = wanted.unwrap_or_default();
        return not_found(format!("operation {id:?} does not exist"));
    }
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
    subscribed: mpsc::UnboundedReceiver<Option<String>>,
}

impl Harness {
    async fn start(op: &Operation) -> Harness {
        let (events, stream) = mpsc::channel(16);
        let (reads_tx, reads) = mpsc::unbounded_channel();
        let (sub_tx, subscribed) = mpsc::unbounded_channel();
        let fake = Arc::new(Fake {
            op: Mutex::new(op.clone()),
            stream: Mutex::new(Some(stream)),
            reads: reads_tx,
            subscribed: sub_tx,
        });
        let app = Router::new()
            .route("/api/v1/operations/{id}", get(read_op))
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

    /// Waits until the CLI has subscribed and read the operation once.
    async fn following(&mut self, id: &str) {
        let filter = tokio::time::timeout(LONG, self.subscribed.recv())
            .await
            .expect("the CLI subscribes to the change stream")
            .expect("the stand-in runs");
        assert_eq!(filter.as_deref(), Some(id), "subscribed to the operation");
        tokio::time::timeout(LONG, self.reads.recv())
            .await
            .expect("and reads the operation once")
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

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn follows_the_stream_to_the_outcome_and_reads_the_operation_once() {
    let sent = operation("op-1", OpStatus::Sent, None, 10);
    let mut h = Harness::start(&sent).await;
    let client = h.client.clone();
    let waiting = tokio::spawn(async move { client.wait_final(sent, LONG).await });
    h.following("op-1").await;

    let steps = [
        operation("op-1", OpStatus::InProgress, Some("creating"), 20),
        // Another operation's outcome is none of this wait's business.
        operation("op-2", OpStatus::Failed, None, 25),
        operation("op-1", OpStatus::InProgress, Some("starting"), 30),
        operation("op-1", OpStatus::Succeeded, None, 40),
    ];
    for s in &steps {
        h.events.send(change(s)).await.expect("the CLI listens");
    }
    let done = waiting.await.expect("no panic").expect("succeeds");
    assert_eq!(done.status, OpStatus::Succeeded);
    assert_eq!(done.updated_at_ms, 40);
    assert_eq!(
        h.reads_since(),
        0,
        "the outcome came on the stream; the operation was not asked for again"
    );
}

#[tokio::test]
async fn a_lagged_stream_makes_it_read_the_operation_again() {
    let sent = operation("op-1", OpStatus::Sent, None, 10);
    let mut h = Harness::start(&sent).await;
    let client = h.client.clone();
    let waiting = tokio::spawn(async move { client.wait_final(sent, LONG).await });
    h.following("op-1").await;

    // The outcome happened while the server dropped this subscriber's
    // changes: only a read can tell.
    *h.fake.op.lock().expect("lock") = operation("op-1", OpStatus::Succeeded, None, 50);
    h.events
        .send(r#"{"kind":"lagged","missed":12}"#.into())
        .await
        .expect("the CLI listens");
    let done = waiting.await.expect("no panic").expect("succeeds");
    assert_eq!(done.status, OpStatus::Succeeded);
    assert_eq!(h.reads_since(), 1, "one read after the lagged event");
}

#[tokio::test]
async fn a_change_older_than_the_read_does_not_move_it_back() {
    let sent = operation("op-1", OpStatus::Sent, None, 10);
    let mut h = Harness::start(&sent).await;
    // By the time the CLI reads it, the operation has moved on.
    *h.fake.op.lock().expect("lock") =
        operation("op-1", OpStatus::InProgress, Some("starting"), 30);
    let client = h.client.clone();
    let waiting =
        tokio::spawn(async move { client.wait_final(sent, Duration::from_secs(1)).await });
    h.following("op-1").await;
    h.events
        .send(change(&operation("op-1", OpStatus::Received, None, 20)))
        .await
        .expect("the CLI listens");
    let err = waiting
        .await
        .expect("no panic")
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("operation op-1 still in_progress after 1s"),
        "the last state seen is the newest one"
    );
}

#[tokio::test]
async fn the_server_going_away_is_a_clear_error() {
    let sent = operation("op-1", OpStatus::Sent, None, 10);
    let mut h = Harness::start(&sent).await;
    let client = h.client.clone();
    let waiting = tokio::spawn(async move { client.wait_final(sent, LONG).await });
    h.following("op-1").await;
    h.events
        .send(change(&operation("op-1", OpStatus::Received, None, 20)))
        .await
        .expect("the CLI listens");
    // The stream ends, as it does when the server shuts down.
    drop(h.events);
    let err = waiting
        .await
        .expect("no panic")
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("closed the change stream before operation op-1 ended (last seen: received)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_stream_is_a_clear_error() {
    let sent = operation("op-1", OpStatus::Sent, None, 10);
    let h = Harness::start(&operation("op-other", OpStatus::Sent, None, 10)).await;
    let err = h
        .client
        .wait_final(sent, LONG)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with(
            "cannot follow operation op-1: operation \"op-1\" does not exist (404 Not Found)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_final_operation_needs_no_request() {
    let done = operation("op-1", OpStatus::Failed, None, 10);
    let mut h = Harness::start(&done).await;
    let out = h
        .client
        .wait_final(done, LONG)
        .await
        .expect("nothing to wait for");
    assert_eq!(out.status, OpStatus::Failed);
    assert!(h.subscribed.try_recv().is_err(), "no subscription");
    assert_eq!(h.reads_since(), 0);
}

#[test]
fn events_are_read_by_kind_and_operation() {
    let op = r#"{"kind":"operation","operation":{"id":"a","device":"d1","app":"web","op":"deploy","generation":2,"status":"in_progress","created_at_ms":1,"updated_at_ms":2}}"#;
    assert!(matches!(parse_event::<Operation>(op, "a"), Ok(Seen::Now(o)) if o.generation == 2));
    assert!(matches!(parse_event::<Operation>(op, "b"), Ok(Seen::Other)));
    assert!(matches!(
        parse_event::<Operation>(r#"{"kind":"lagged","missed":7}"#, "a"),
        Ok(Seen::Lagged)
    ));
    // A kind added to the server after this CLI was built is not an error.
    assert!(matches!(
        parse_event::<Operation>(r#"{"kind":"something_new"}"#, "a"),
        Ok(Seen::Other)
    ));
    let err = parse_event::<Operation>("not json", "a")
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("not JSON")),
        "{err:?}"
    );
}
