//! Which desired state the agent holds, and which commands wait on it.
//!
//! A pure state machine: it decides, the agent core does the I/O. The rules
//! follow the protocol: the highest generation wins, an older one is ignored,
//! an equal one is a duplicate that changes nothing — but a command with an id
//! always gets its acks, so a retried command is answered, not dropped.
//!
//! A command is about one app, and its outcome is that app's: another app
//! of the same desired state that cannot be deployed fails its own
//! commands, never this one.

use std::collections::BTreeMap;

use drover_shared::model::DesiredState;
use drover_shared::payload::{Ack, AckPhase, Progress};
use drover_shared::Name;

/// Per app, Docker's or the registry's text for why it failed.
pub type Failures = BTreeMap<Name, String>;

/// An ack to send: command id, phase, detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOut {
    pub command_id: String,
    pub phase: AckPhase,
    pub detail: String,
}

impl AckOut {
    fn new(command_id: &str, phase: AckPhase, detail: impl Into<String>) -> Self {
        AckOut {
            command_id: command_id.to_string(),
            phase,
            detail: detail.into(),
        }
    }
}

/// The result of offering a desired state.
#[derive(Debug, Default, PartialEq)]
pub struct Offer {
    /// `true`: the offered state is now held and must be persisted and reconciled.
    pub adopted: bool,
    pub acks: Vec<AckOut>,
}

#[derive(Debug, Default)]
pub struct Intake {
    held: Option<DesiredState>,
    /// The last generation a pass finished for, with its apps' failures.
    outcome: Option<(u64, Failures)>,
    /// Commands waiting for their generation's pass.
    pending: Vec<Pending>,
}

/// A command waiting for the pass of its generation; `app: None` for a
/// command about no app in particular, which any failure fails.
#[derive(Debug)]
struct Pending {
    id: String,
    generation: u64,
    app: Option<Name>,
}

impl Intake {
    /// Starts from the persisted state, which is adopted without any command.
    pub fn new(stored: Option<DesiredState>) -> Self {
        Intake {
            held: stored,
            ..Default::default()
        }
    }

    pub fn held(&self) -> Option<&DesiredState> {
        self.held.as_ref()
    }

    pub fn held_generation(&self) -> u64 {
        self.held.as_ref().map_or(0, |d| d.generation)
    }

    /// The generation whose pass last finished (0 before the first).
    pub fn applied_generation(&self) -> u64 {
        self.outcome.as_ref().map_or(0, |(g, _)| *g)
    }

    /// Every command waiting for a pass, whatever its generation.
    pub fn pending_ids(&self) -> impl Iterator<Item = &str> {
        self.pending.iter().map(|p| p.id.as_str())
    }

    pub fn pending_for(&self, generation: u64) -> impl Iterator<Item = &str> {
        self.pending
            .iter()
            .filter(move |p| p.generation == generation)
            .map(|p| p.id.as_str())
    }

    /// A progress ack for every command waiting on `generation`.
    pub fn progress_acks(
        &self,
        generation: u64,
        progress: &Progress,
        detail: &str,
        at_ms: u64,
    ) -> Vec<Ack> {
        self.pending_for(generation)
            .map(|id| Ack {
                command_id: id.to_string(),
                at_ms,
                phase: AckPhase::Progress,
                detail: detail.to_string(),
                progress: Some(progress.clone()),
            })
            .collect()
    }

    /// A desired state arrived, on the `desired` topic (`command: None`) or
    /// inside a command about `app`.
    pub fn offer(&mut self, state: DesiredState, command: Option<(&str, Option<&Name>)>) -> Offer {
        let generation = state.generation;
        let held = self.held.as_ref().map(|d| d.generation);
        let mut offer = Offer::default();
        if let Some((id, _)) = command {
            offer.acks.push(AckOut::new(id, AckPhase::Received, ""));
        }
        match held {
            Some(h) if generation < h => {
                if let Some((id, _)) = command {
                    offer.acks.push(AckOut::new(
                        id,
                        AckPhase::Superseded,
                        format!("device holds generation {h}, newer than {generation}"),
                    ));
                }
            }
            Some(h) if generation == h => {
                if let Some((id, app)) = command {
                    match &self.outcome {
                        Some((g, failures)) if *g == generation => {
                            offer.acks.push(final_ack(id, app, failures))
                        }
                        _ => self.add_pending(id, generation, app),
                    }
                }
            }
            _ => {
                for Pending { id, .. } in std::mem::take(&mut self.pending) {
                    offer.acks.push(AckOut::new(
                        &id,
                        AckPhase::Superseded,
                        format!("replaced by generation {generation}"),
                    ));
                }
                self.held = Some(state);
                offer.adopted = true;
                if let Some((id, app)) = command {
                    self.add_pending(id, generation, app);
                }
            }
        }
        offer
    }

    fn add_pending(&mut self, id: &str, generation: u64, app: Option<&Name>) {
        if !self.pending.iter().any(|p| p.id == id) {
            self.pending.push(Pending {
                id: id.to_string(),
                generation,
                app: app.cloned(),
            });
        }
    }

    /// A pass finished for `generation`; answers the commands waiting on
    /// it, each by the outcome of its own app. A report for a generation
    /// other than the held one is stale and ignored.
    pub fn finished(&mut self, generation: u64, failures: Failures) -> Vec<AckOut> {
        if generation != self.held_generation() {
            return Vec::new();
        }
        let acks = self
            .pending
            .iter()
            .filter(|p| p.generation == generation)
            .map(|p| final_ack(&p.id, p.app.as_ref(), &failures))
            .collect();
        self.pending.retain(|p| p.generation != generation);
        self.outcome = Some((generation, failures));
        acks
    }
}

/// Failed when the command's app failed (any app, for a command about none).
fn final_ack(id: &str, app: Option<&Name>, failures: &Failures) -> AckOut {
    let failure = match app {
        Some(app) => failures.get(app),
        None => failures.values().next(),
    };
    match failure {
        None => AckOut::new(id, AckPhase::Succeeded, ""),
        Some(text) => AckOut::new(id, AckPhase::Failed, text.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(g: u64) -> DesiredState {
        DesiredState {
            generation: g,
            apps: vec![],
            agent: None,
        }
    }

    fn fail(app: &str, text: &str) -> Failures {
        Failures::from([(name(app), text.to_string())])
    }

    fn name(s: &str) -> Name {
        Name::new(s).expect("valid name")
    }

    fn phases(acks: &[AckOut]) -> Vec<(&str, AckPhase)> {
        acks.iter()
            .map(|a| (a.command_id.as_str(), a.phase))
            .collect()
    }

    #[test]
    fn newer_generation_is_adopted_and_acked_on_finish() {
        let mut i = Intake::new(None);
        let o = i.offer(gen(1), Some(("c1", None)));
        assert!(o.adopted);
        assert_eq!(phases(&o.acks), vec![("c1", AckPhase::Received)]);
        assert_eq!(
            phases(&i.finished(1, Failures::new())),
            vec![("c1", AckPhase::Succeeded)]
        );
        assert_eq!(i.applied_generation(), 1);
    }

    #[test]
    fn older_generation_is_ignored_but_answered() {
        let mut i = Intake::new(Some(gen(5)));
        let o = i.offer(gen(4), Some(("old", None)));
        assert!(!o.adopted);
        assert_eq!(
            phases(&o.acks),
            vec![("old", AckPhase::Received), ("old", AckPhase::Superseded)]
        );
        assert!(!i.offer(gen(3), None).adopted);
        assert_eq!(i.held_generation(), 5);
    }

    #[test]
    fn duplicate_of_applied_generation_is_answered_at_once() {
        let mut i = Intake::new(None);
        i.offer(gen(2), Some(("a", None)));
        i.finished(2, fail("web", "manifest unknown"));
        let o = i.offer(gen(2), Some(("a-retry", None)));
        assert!(!o.adopted, "nothing is done twice");
        assert_eq!(
            o.acks[1],
            AckOut {
                command_id: "a-retry".into(),
                phase: AckPhase::Failed,
                detail: "manifest unknown".into()
            }
        );
    }

    #[test]
    fn duplicate_while_in_progress_waits_for_the_same_pass() {
        let mut i = Intake::new(None);
        i.offer(gen(2), Some(("a", None)));
        let o = i.offer(gen(2), Some(("b", None)));
        assert!(!o.adopted);
        assert_eq!(phases(&o.acks), vec![("b", AckPhase::Received)]);
        let again = i.offer(gen(2), Some(("a", None)));
        assert_eq!(phases(&again.acks), vec![("a", AckPhase::Received)]);
        assert_eq!(
            phases(&i.finished(2, Failures::new())),
            vec![("a", AckPhase::Succeeded), ("b", AckPhase::Succeeded)]
        );
    }

    #[test]
    fn newer_generation_supersedes_waiting_commands() {
        let mut i = Intake::new(None);
        i.offer(gen(1), Some(("one", None)));
        let o = i.offer(gen(2), Some(("two", None)));
        assert!(o.adopted);
        assert_eq!(
            phases(&o.acks),
            vec![("two", AckPhase::Received), ("one", AckPhase::Superseded)]
        );
        assert!(
            i.finished(1, Failures::new()).is_empty(),
            "a stale report answers nothing"
        );
        assert_eq!(i.applied_generation(), 0);
        assert_eq!(
            phases(&i.finished(2, Failures::new())),
            vec![("two", AckPhase::Succeeded)]
        );
    }

    #[test]
    fn desired_topic_without_command_sends_no_acks() {
        let mut i = Intake::new(None);
        let o = i.offer(gen(1), None);
        assert!(o.adopted && o.acks.is_empty());
        assert!(!i.offer(gen(1), None).adopted);
    }

    #[test]
    fn a_command_ends_with_its_own_apps_outcome() {
        let (good, bad) = (name("good"), name("bad"));
        let mut i = Intake::new(None);
        i.offer(gen(3), Some(("deploy-bad", Some(&bad))));
        i.offer(gen(3), Some(("deploy-good", Some(&good))));
        i.offer(gen(3), Some(("about-nothing", None)));
        let acks = i.finished(3, fail("bad", "invalid reference format"));
        assert_eq!(
            phases(&acks),
            vec![
                ("deploy-bad", AckPhase::Failed),
                ("deploy-good", AckPhase::Succeeded),
                ("about-nothing", AckPhase::Failed),
            ]
        );
        assert_eq!(acks[0].detail, "invalid reference format");
        // A retried command is answered from the same per-app outcome.
        let o = i.offer(gen(3), Some(("deploy-good-again", Some(&good))));
        assert_eq!(o.acks[1].phase, AckPhase::Succeeded);
        let o = i.offer(gen(3), Some(("deploy-bad-again", Some(&bad))));
        assert_eq!(o.acks[1].phase, AckPhase::Failed);
    }
}
