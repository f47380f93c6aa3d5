//! The one redb writer of the orchestrator.
//!
//! redb allows one write transaction at a time and fsyncs every commit. One
//! task takes queued writes from everyone — the service (desired states,
//! operations, device records), the identity registry and the API's access
//! layer (tokens, the audit log) — and commits everything that queued up
//! while the previous commit ran in one transaction. Writers that each
//! opened their own transaction would queue on redb's lock instead and pay
//! one fsync each: the load test measured the REST rollout rate halved
//! (1,396 → 671 requests/s at 10,000 devices) once every request also wrote
//! an audit record that way.
//!
//! When a transaction fails (a full disk), redb refuses everything after it
//! until the file is opened again. The writer then reopens the file and
//! probes it with an empty transaction, at most every
//! [`RECOVERY_INTERVAL`], until a write commits; meanwhile jobs fail at
//! once (nothing is changed) and `Store::health` says why. Audit records of
//! the failed transactions are kept (up to [`AUDIT_RETRY`]) and committed
//! with the first transaction that works: the record of what was refused
//! during the outage is not lost.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::store::{Store, StoreError, Write};

/// How many queued jobs one redb transaction may take at most.
const MAX_JOBS_PER_TRANSACTION: usize = 512;

/// Jobs waiting for the writer; senders wait when it is full.
const QUEUE: usize = 10_000;

/// How often a failed store is reopened and probed.
pub const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);

/// Audit records of failed transactions kept for the next one that works.
pub const AUDIT_RETRY: usize = 10_000;

/// Writes handed to the writer; `done` is told the outcome when the caller
/// must not go on before the change is durable.
struct Job {
    writes: Vec<Write>,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
    /// Set on the last job: commit what came before, then end the task.
    stop: Option<oneshot::Sender<()>>,
}

/// A handle to the writer task. Jobs are committed in the order they were
/// queued, across all handles.
#[derive(Clone)]
pub struct StoreWriter {
    jobs: mpsc::Sender<Job>,
}

impl StoreWriter {
    /// Starts the writer task on the current runtime.
    pub fn spawn(store: Store, metrics: Arc<Metrics>) -> StoreWriter {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx, metrics));
        StoreWriter { jobs }
    }

    /// Stores writes and waits until they are durable.
    pub async fn persist(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.submit(writes).await.await
    }

    /// Queues writes and returns at once; the returned future resolves when
    /// they are durable. Jobs submitted one after the other are committed in
    /// that order, so a caller can hold a lock only while queueing (to keep
    /// an order) and wait for durability outside it.
    pub async fn submit(
        &self,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let queued = if writes.is_empty() {
            None
        } else {
            let (done, outcome) = oneshot::channel();
            match self
                .jobs
                .send(Job {
                    writes,
                    done: Some(done),
                    stop: None,
                })
                .await
            {
                Ok(()) => Some(Ok(outcome)),
                Err(_) => Some(Err(stopped())),
            }
        };
        async move {
            match queued {
                None => Ok(()),
                Some(Err(e)) => Err(e),
                Some(Ok(outcome)) => outcome.await.unwrap_or_else(|_| Err(stopped())),
            }
        }
    }

    /// Queues writes without waiting for them to be stored. For facts that
    /// are re-sent if lost (device reports): the caller must not stall on an
    /// fsync per message. Returns false if the writer has stopped.
    pub async fn record(&self, writes: Vec<Write>) -> bool {
        writes.is_empty()
            || self
                .jobs
                .send(Job {
                    writes,
                    done: None,
                    stop: None,
                })
                .await
                .is_ok()
    }

    /// Commits everything queued before this call, then stops the writer
    /// task (for shutdown). Returns once the task has ended; writes queued
    /// afterwards fail with "the store writer has stopped".
    pub async fn close(&self) {
        let (stop, stopped) = oneshot::channel();
        let job = Job {
            writes: Vec::new(),
            done: None,
            stop: Some(stop),
        };
        if self.jobs.send(job).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Db("the store writer has stopped".into())
}

async fn run(store: Store, mut jobs: mpsc::Receiver<Job>, metrics: Arc<Metrics>) {
    let mut failing = false;
    let mut audit_retry: VecDeque<Write> = VecDeque::new();
    loop {
        let first = if failing {
            // Probe on a timer too, so health recovers with no traffic.
            match tokio::time::timeout(RECOVERY_INTERVAL, jobs.recv()).await {
                Ok(Some(j)) => j,
                Ok(None) => return,
                Err(_) => {
                    failing = !recover(&store).await
                        || commit(&store, &metrics, &mut audit_retry, Vec::new())
                            .await
                            .is_err();
                    continue;
                }
            }
        } else {
            match jobs.recv().await {
                Some(j) => j,
                None => return,
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_JOBS_PER_TRANSACTION
            && batch.last().is_some_and(|j| j.stop.is_none())
        {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let stop = batch.last_mut().and_then(|j| j.stop.take());
        if failing {
            failing = !recover(&store).await;
        }
        let writes: Vec<Write> = batch
            .iter()
            .flat_map(|j| j.writes.iter().cloned())
            .collect();
        let res = if failing {
            keep_audit(&mut audit_retry, &writes, &metrics);
            Err(store
                .health()
                .err()
                .unwrap_or_else(|| "the store cannot be written".into()))
        } else {
            commit(&store, &metrics, &mut audit_retry, writes).await
        };
        failing = res.is_err();
        for job in batch {
            if let Some(done) = job.done {
                let _ = done.send(res.clone().map_err(StoreError::Db));
            }
        }
        if let Some(stop) = stop {
            // Dropping the receiver fails whatever was queued after the stop.
            drop(jobs);
            let _ = stop.send(());
            return;
        }
    }
}

/// Commits `writes` after any audit records kept from failed transactions
/// (older first: audit records are keyed by their sequence number).
async fn commit(
    store: &Store,
    metrics: &Metrics,
    audit_retry: &mut VecDeque<Write>,
    writes: Vec<Write>,
) -> Result<(), String> {
    let mut all: Vec<Write> = audit_retry.drain(..).collect();
    let retried = all.len();
    all.extend(writes);
    let s = store.clone();
    let attempt = all.clone();
    let res = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let res = s.write(&attempt);
        (res, started.elapsed())
    })
    .await
    .map(|(res, took)| {
        metrics.store_commit_seconds.observe(took.as_secs_f64());
        res
    })
    .unwrap_or_else(|e| Err(StoreError::Db(format!("writer task failed: {e}"))))
    .map_err(|e| e.to_string());
    match &res {
        Ok(()) => {
            if retried > 0 {
                info!(audit_records_recovered = retried, "store writable again");
            }
        }
        Err(e) => {
            metrics.store_write_failed.inc();
            warn!(error = %e, "store transaction failed");
            store.write_failed(format!("cannot write: {e}"));
            keep_audit(audit_retry, &all, metrics);
        }
    }
    res
}

/// Keeps the audit records of a failed transaction for the next one.
fn keep_audit(audit_retry: &mut VecDeque<Write>, writes: &[Write], metrics: &Metrics) {
    for w in writes {
        if matches!(w, Write::Audit { .. }) {
            if audit_retry.len() == AUDIT_RETRY {
                audit_retry.pop_front();
                metrics.audit_dropped.inc();
            }
            audit_retry.push_back(w.clone());
        }
    }
}

/// Reopens the database file (redb refuses everything after an I/O error
/// until then). `true` when it opened.
async fn recover(store: &Store) -> bool {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.reopen()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            store.write_failed(format!("cannot reopen the database: {e}"));
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::AuditRecord;

    fn audit(seq: u64) -> Write {
        Write::Audit {
            record: AuditRecord {
                seq,
                at_ms: seq,
                actor: "t".into(),
                role: None,
                action: "POST /x".into(),
                command: None,
                outcome: crate::contract::AuditOutcome::Ok,
                status: Some(200),
                detail: String::new(),
            },
            prune_to: None,
        }
    }

    #[tokio::test]
    async fn queued_jobs_are_durable_in_order_and_batched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("t.redb")).expect("store");
        let writer = StoreWriter::spawn(store.clone(), Arc::default());
        // Queued back to back, awaited afterwards: all durable, in order.
        let mut pending = Vec::new();
        for seq in 1..=200 {
            pending.push(writer.submit(vec![audit(seq)]).await);
        }
        for p in pending {
            p.await.expect("stored");
        }
        let seqs: Vec<u64> = store
            .audit(1000, |_| true)
            .expect("read")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=200).rev().collect::<Vec<_>>(),
            "newest first, none lost"
        );
        assert!(writer.persist(Vec::new()).await.is_ok(), "nothing to write");
        assert!(writer.record(vec![audit(201)]).await);
        // Closing commits what was queued first, then refuses more.
        writer.close().await;
        assert_eq!(store.audit(1, |_| true).expect("read")[0].seq, 201);
        assert!(writer.persist(vec![audit(202)]).await.is_err());
    }
}
