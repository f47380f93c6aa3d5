//! The rollout scenario's other path: one `POST /api/v1/rollouts` for the
//! whole fleet instead of one deploy per device, followed on the change
//! stream (`GET /api/v1/changes?rollout=ID`) to its end, with the time of
//! every batch.

use std::pin::pin;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::api::{Api, RolloutChange, RolloutView};

/// The batch plans measured: one batch of every device, and ten equal
/// batches (nine of 10 %, the last takes the rest).
pub fn plans() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![("1 batch", vec![]), ("10 batches", vec!["10%"; 9])]
}

/// When a rollout's batches ended and half its devices were updated, from
/// the states seen of it (the answer to the request, reads, the change
/// stream) and when each was seen, counted from the request.
#[derive(Debug, Clone, Default)]
pub struct BatchClock {
    /// When each batch began (the first at the request).
    pub started: Vec<Option<Duration>>,
    /// When each batch was seen to end.
    pub ended: Vec<Option<Duration>>,
    /// When half the devices (of those not skipped) were updated.
    pub half_updated: Option<Duration>,
    /// When it was seen in a final phase.
    pub finished: Option<Duration>,
    /// The newest state seen.
    pub last: Option<RolloutView>,
}

impl BatchClock {
    /// Takes a state seen at `at`. A state older than the newest seen (a
    /// change the read after subscribing already covered) is ignored.
    pub fn see(&mut self, at: Duration, r: RolloutView) {
        if self
            .last
            .as_ref()
            .is_some_and(|l| r.updated_at_ms < l.updated_at_ms)
        {
            return;
        }
        let n = r.batches.len();
        if self.started.len() < n {
            self.started.resize(n, None);
            self.ended.resize(n, None);
            self.started[0] = Some(Duration::ZERO);
        }
        let from = self.last.as_ref().map_or(0, |l| l.current_batch);
        // Without approval a batch's end is the next one's start; several
        // may pass between two states seen.
        for b in from..r.current_batch.min(n) {
            self.ended[b].get_or_insert(at);
            if b + 1 < n {
                self.started[b + 1].get_or_insert(at);
            }
        }
        if r.is_final() {
            if let Some(e) = self.ended.get_mut(r.current_batch) {
                e.get_or_insert(at);
            }
            self.finished.get_or_insert(at);
        }
        let eligible = r.counts.total.saturating_sub(r.counts.skipped);
        if eligible > 0 && r.counts.updated * 2 >= eligible {
            self.half_updated.get_or_insert(at);
        }
        self.last = Some(r);
    }

    /// How long each batch took, where its start and end were seen.
    pub fn batch_times(&self) -> Vec<Option<Duration>> {
        self.started
            .iter()
            .zip(&self.ended)
            .map(|(s, e)| Some(e.as_ref()?.saturating_sub(*s.as_ref()?)))
            .collect()
    }
}

/// How one rollout request went.
#[derive(Debug, Default)]
pub struct RequestResult {
    /// How long the request took to be answered.
    pub request_time: Option<Duration>,
    pub clock: BatchClock,
    /// `lagged` events (each followed by a read).
    pub lagged: usize,
    /// Subscriptions made again after the stream broke or ended.
    pub resubscribed: usize,
    /// Why it was not followed to a final phase, or the first trouble.
    pub error: Option<String>,
}

/// Creates one rollout of `app`'s latest release to the devices `selector`
/// matches, in `batches`, and follows it on the change stream until it is
/// final or `timeout` passes: subscribe, read it once (so nothing before
/// the subscription is missed), then take every change; a `lagged` event
/// means read it again. Never polls.
pub async fn run_rollout_request(
    api: &Api,
    app: &str,
    selector: &str,
    batches: &[&str],
    timeout: Duration,
) -> RequestResult {
    let mut res = RequestResult::default();
    // A simulated pull failure must not roll the whole fleet back in the
    // middle of a measurement: go on, and the final phase says `failed`.
    let body = serde_json::json!({
        "app": app,
        "selector": selector,
        "release": 0,
        "batches": batches,
        "on_failure": "continue",
    });
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let created = match api.create_rollout(body).await {
        Ok(r) => r,
        Err(e) => {
            res.error = Some(format!("POST /api/v1/rollouts: {e}"));
            return res;
        }
    };
    res.request_time = Some(t0.elapsed());
    let id = created.id.clone();
    res.clock.see(t0.elapsed(), created);
    let mut first = true;
    while res.clock.finished.is_none() {
        if Instant::now() >= deadline {
            break;
        }
        if !first {
            res.resubscribed += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        first = false;
        let limit = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let stream = match api.rollout_changes(&id, limit).await {
            Ok(s) => s,
            Err(e) => {
                res.error.get_or_insert(e.to_string());
                continue;
            }
        };
        let mut stream = pin!(stream);
        match api.rollout(&id).await {
            Ok(r) => res.clock.see(t0.elapsed(), r),
            Err(e) => {
                res.error.get_or_insert(e.to_string());
                continue;
            }
        }
        while res.clock.finished.is_none() {
            let next = tokio::time::timeout_at(deadline.into(), stream.next()).await;
            match next {
                Err(_) | Ok(None) => break,
                Ok(Some(Err(e))) => {
                    res.error.get_or_insert(e.to_string());
                    break;
                }
                Ok(Some(Ok(RolloutChange::Now(r)))) => res.clock.see(t0.elapsed(), *r),
                Ok(Some(Ok(RolloutChange::Lagged))) => {
                    res.lagged += 1;
                    match api.rollout(&id).await {
                        Ok(r) => res.clock.see(t0.elapsed(), r),
                        Err(e) => {
                            res.error.get_or_insert(e.to_string());
                            break;
                        }
                    }
                }
                Ok(Some(Ok(RolloutChange::Other))) => {}
            }
        }
    }
    if res.clock.finished.is_none() {
        let phase = res
            .clock
            .last
            .as_ref()
            .map_or("unknown", |r| r.phase.as_str());
        res.error = Some(format!(
            "rollout {id} not final after {} s (last seen {phase}){}",
            timeout.as_secs(),
            res.error
                .as_deref()
                .map(|e| format!("; {e}"))
                .unwrap_or_default()
        ));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RolloutCountsView;

    fn view(phase: &str, current: usize, updated: usize, at_ms: u64) -> RolloutView {
        RolloutView {
            id: "r-1".into(),
            phase: phase.into(),
            current_batch: current,
            batches: vec![RolloutCountsView::default(); 3],
            counts: RolloutCountsView {
                total: 30,
                updated,
                failed: 0,
                skipped: 0,
            },
            updated_at_ms: at_ms,
            reason: None,
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_batch_ends_when_the_next_begins_and_the_last_at_the_end() {
        let mut c = BatchClock::default();
        c.see(s(0), view("running", 0, 0, 1));
        c.see(s(2), view("running", 0, 5, 2));
        c.see(s(4), view("running", 1, 10, 3));
        assert_eq!(c.half_updated, None);
        c.see(s(7), view("running", 1, 15, 4));
        assert_eq!(c.half_updated, Some(s(7)));
        c.see(s(9), view("running", 2, 20, 5));
        assert_eq!(c.finished, None);
        c.see(s(12), view("succeeded", 2, 30, 6));
        assert_eq!(c.finished, Some(s(12)));
        assert_eq!(c.batch_times(), vec![Some(s(4)), Some(s(5)), Some(s(3))]);
    }

    #[test]
    fn batches_passed_between_two_states_end_together() {
        let mut c = BatchClock::default();
        c.see(s(0), view("running", 0, 0, 1));
        c.see(s(6), view("succeeded", 2, 30, 9));
        assert_eq!(c.batch_times(), vec![Some(s(6)), Some(s(0)), Some(s(0))]);
        assert_eq!(c.half_updated, Some(s(6)));
    }

    #[test]
    fn an_older_state_changes_nothing() {
        let mut c = BatchClock::default();
        c.see(s(0), view("running", 1, 10, 5));
        c.see(s(1), view("running", 0, 3, 4));
        assert_eq!(c.last.as_ref().map(|r| r.current_batch), Some(1));
        assert_eq!(c.ended[0], Some(s(0)));
    }

    #[test]
    fn a_rollout_that_stops_early_has_batches_never_run() {
        let mut c = BatchClock::default();
        c.see(s(0), view("running", 0, 0, 1));
        c.see(s(3), view("failed", 0, 8, 2));
        assert_eq!(c.finished, Some(s(3)));
        assert_eq!(c.batch_times(), vec![Some(s(3)), None, None]);
    }

    #[test]
    fn ten_batches_are_nine_tenths_and_the_rest() {
        let plans = plans();
        assert_eq!(plans[0].1.len(), 0, "one batch of every device");
        assert_eq!(plans[1].1, vec!["10%"; 9]);
    }
}
