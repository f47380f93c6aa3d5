//! The automation scenario: what the JSON mirror and rules cost at fleet
//! scale, and how fast a rule acts. Two orchestrators, one after the other
//! in one run, each with the same simulated fleet connected and telemetry
//! flowing:
//!
//! 1. **without**: `drover serve --json-mirror=false`, no rule; the
//!    orchestrator's CPU and RSS;
//! 2. **with**: the JSON mirror on (the default) and `--rules` rules of
//!    every trigger kind (telemetry thresholds evaluated on every sample,
//!    offline timers, events, app states, an MQTT trigger), one MQTT
//!    client reading the mirror's telemetry; the orchestrator's CPU and RSS
//!    over the same length of time; then
//! 3. **rule latency**: the tool publishes numbered messages on
//!    `loadtest/ping`, which one rule's MQTT trigger answers with a publish
//!    action on `loadtest/pong`; the time from publish to the answer's
//!    arrival, beside the same broker round trip without a rule (the tool
//!    reading its own `loadtest/echo`), in the same phase.
//!
//! Nothing here asserts a timing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tracing::info;

use super::{prepare_fds, wait_online, Common, OrchSampler, ScenarioError};
use crate::procs::{Proc, Series};
use crate::report::{mib, ms, percentile, Table};
use crate::sim::Fleet;
use crate::target::Target;

/// What the automation scenario does, besides the fleet.
#[derive(Debug, Clone)]
pub struct AutomationArgs {
    /// Rules created in the "with" phase (at least 1: the latency rule).
    pub rules: usize,
    /// Length of each CPU phase.
    pub duration: Duration,
    /// Pings for the rule latency (and as many echoes).
    pub pings: usize,
    pub ping_interval: Duration,
}

const PING: &str = "loadtest/ping";
const PONG: &str = "loadtest/pong";
const ECHO: &str = "loadtest/echo";
const ALERTS: &str = "loadtest/alerts";

/// The rules of the "with" phase: the latency rule first, then a mix of
/// every other trigger whose conditions hold rarely or never, so that the
/// cost measured is evaluation, not acting.
pub fn rules(n: usize) -> Vec<serde_json::Value> {
    let publish = serde_json::json!([{ "type": "publish", "topic": ALERTS, "payload": {} }]);
    let mut out = vec![serde_json::json!({
        "name": "lt-ping",
        "trigger": { "type": "mqtt", "filter": PING },
        "condition": "has(message.json.seq)",
        "actions": [{ "type": "publish", "topic": PONG, "payload": {} }],
    })];
    let kinds = [
        serde_json::json!({ "type": "telemetry", "for_secs": 300 }),
        serde_json::json!({ "type": "device_offline", "for_secs": 300 }),
        serde_json::json!({ "type": "device_event" }),
        serde_json::json!({ "type": "app_state", "app": "lt-none" }),
        serde_json::json!({ "type": "telemetry", "for_secs": 0 }),
        serde_json::json!({ "type": "device_online" }),
    ];
    for i in 1..n.max(1) {
        let trigger = kinds[(i - 1) % kinds.len()].clone();
        let condition = match trigger["type"].as_str() {
            Some("telemetry") => format!("telemetry.host.cpu_percent > {}.5", 99 + i % 2),
            _ => "device.id.startsWith(\"no-such-device\")".to_string(),
        };
        out.push(serde_json::json!({
            "name": format!("lt-{i}"),
            "trigger": trigger,
            "condition": condition,
            "actions": publish,
            "cooldown_secs": 60,
        }));
    }
    out
}

/// One orchestrator phase: CPU and RSS over the window.
#[derive(Debug, Clone)]
pub struct Phase {
    pub wall: Duration,
    pub series: Option<Series>,
    /// Messages the reader of the mirror's device tree received (with only).
    pub mirrored: u64,
    /// Publishes the fleet made in the window.
    pub fleet_publishes: u64,
}

/// Round-trip times through the broker, with and without a rule between.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub rule: Vec<Duration>,
    pub echo: Vec<Duration>,
    pub sent: usize,
}

/// Connects the tool's own MQTT client (the loadtest broker is open).
async fn client(
    t: &Target,
    id: &str,
    filters: &[&str],
) -> Result<(AsyncClient, rumqttc::EventLoop), ScenarioError> {
    let mut opts = MqttOptions::new(id, t.mqtt_hosts[0].clone(), t.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut ev) = AsyncClient::new(opts, 1000);
    for f in filters {
        c.subscribe(*f, QoS::AtMostOnce)
            .await
            .map_err(|e| ScenarioError::Failed(format!("subscribe {f}: {e}")))?;
    }
    // Until the SUBACKs: no ping sent before the broker routes it back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acks = 0;
    while acks < filters.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ScenarioError::Failed(format!("mqtt client {id}: {e}"))),
            Err(_) => {
                return Err(ScenarioError::Failed(format!(
                    "mqtt client {id}: no SUBACK in 30 s"
                )))
            }
        }
    }
    Ok((c, ev))
}

async fn cpu_phase(
    t: &Target,
    fleet: &Fleet,
    wall: Duration,
    mirrored: Option<&AtomicU64>,
) -> Phase {
    let pid = t.orch.as_ref().map(Proc::pid);
    let m0 = mirrored.map_or(0, |m| m.load(Ordering::Relaxed));
    let s0 = fleet.stats().snapshot();
    let sampler = OrchSampler::start(pid);
    let t0 = Instant::now();
    tokio::time::sleep(wall).await;
    let series = sampler.stop().await;
    let s1 = fleet.stats().snapshot();
    Phase {
        wall: t0.elapsed(),
        series,
        mirrored: mirrored.map_or(0, |m| m.load(Ordering::Relaxed)) - m0,
        fleet_publishes: s1.published - s0.published,
    }
}

/// Starts an orchestrator with `extra` arguments, connects `n` agents and
/// lets the connect burst drain.
async fn fleet_on(
    c: &Common,
    n: usize,
    extra: &[&str],
    name: &str,
) -> Result<(Target, Fleet), ScenarioError> {
    let mut cfg = c.target.clone();
    cfg.extra_args = extra.iter().map(|s| (*s).to_string()).collect();
    let mut t = Target::start(cfg).await?;
    let mut fleet = Fleet::new(c.sim(&t), name)?;
    let started = Instant::now();
    fleet.grow_to(n, c.ramp_per_sec).await?;
    if let Err(why) = wait_online(&mut t, &fleet, n, Duration::from_secs(600), started).await {
        fleet.shutdown(Duration::from_secs(5)).await;
        t.stop(c.keep).await;
        return Err(ScenarioError::Failed(format!(
            "not every agent came online: {why}"
        )));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok((t, fleet))
}

async fn stop(mut t: Target, fleet: Fleet, keep: bool) -> Option<String> {
    let exited = t.orch_exit();
    fleet.shutdown(Duration::from_secs(10)).await;
    t.stop(keep).await;
    exited
}

/// Pings through the rule and echoes through the broker alone, one of
/// each every `interval`.
async fn latency(t: &Target, a: &AutomationArgs) -> Result<Latency, ScenarioError> {
    let (c, mut ev) = client(
        t,
        &format!("lt-pinger-{}", std::process::id()),
        &[PONG, ECHO],
    )
    .await?;
    let sent: Arc<Mutex<HashMap<(bool, u64), Instant>>> = Arc::default();
    let out: Arc<Mutex<Latency>> = Arc::default();
    let reader = {
        let (sent, out) = (sent.clone(), out.clone());
        tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                let Event::Incoming(Packet::Publish(p)) = e else {
                    continue;
                };
                let now = Instant::now();
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                    continue;
                };
                let is_rule = p.topic == PONG;
                // The rule's answer carries the firing, which carries the
                // message it saw.
                let seq = if is_rule {
                    v.pointer("/firing/value/message/json/seq")
                } else {
                    v.get("seq")
                }
                .and_then(serde_json::Value::as_u64);
                let Some(seq) = seq else { continue };
                if let Some(at) = sent.lock().expect("lock").remove(&(is_rule, seq)) {
                    let mut o = out.lock().expect("lock");
                    if is_rule {
                        o.rule.push(now - at)
                    } else {
                        o.echo.push(now - at)
                    }
                }
            }
        })
    };
    for seq in 0..a.pings as u64 {
        for (is_rule, topic) in [(true, PING), (false, ECHO)] {
            sent.lock()
                .expect("lock")
                .insert((is_rule, seq), Instant::now());
            let body = serde_json::json!({ "seq": seq }).to_string();
            c.publish(topic, QoS::AtMostOnce, false, body)
                .await
                .map_err(|e| ScenarioError::Failed(format!("publish {topic}: {e}")))?;
        }
        tokio::time::sleep(a.ping_interval).await;
    }
    // Stragglers: up to 5 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !sent.lock().expect("lock").is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.abort();
    let _ = c.disconnect().await;
    let mut l = out.lock().expect("lock").clone();
    l.sent = a.pings;
    Ok(l)
}

pub async fn automation(
    c: &Common,
    n: usize,
    a: &AutomationArgs,
) -> Result<Vec<Table>, ScenarioError> {
    if c.target.external.is_some() {
        return Err(ScenarioError::Failed(
            "automation starts its own orchestrators (one without the mirror, one with); it cannot be combined with --api".into(),
        ));
    }
    let fd_note = prepare_fds(n)?;

    info!(agents = n, "automation: without the JSON mirror and rules");
    let (t, fleet) = fleet_on(c, n, &["--json-mirror=false"], "auto-off").await?;
    let setup_without = t.orch_command();
    let without = cpu_phase(&t, &fleet, a.duration, None).await;
    if let Some(why) = stop(t, fleet, c.keep).await {
        return Err(ScenarioError::Failed(why));
    }

    info!(
        agents = n,
        rules = a.rules,
        "automation: with the JSON mirror and rules"
    );
    let (t, fleet) = fleet_on(c, n, &[], "auto-on").await?;
    let setup_with = t.orch_command();
    let defs = rules(a.rules);
    let made = async {
        for r in &defs {
            t.api.create_rule(r.clone()).await?;
        }
        Ok::<(), ScenarioError>(())
    }
    .await;
    let mirrored = Arc::new(AtomicU64::new(0));
    let measured = match made {
        Err(e) => Err(e),
        Ok(()) => {
            let filter = c.topics.json_devices();
            match client(
                &t,
                &format!("lt-mirror-{}", std::process::id()),
                &[filter.as_str()],
            )
            .await
            {
                Err(e) => Err(e),
                Ok((mc, mut mev)) => {
                    let m = mirrored.clone();
                    let reader = tokio::spawn(async move {
                        while let Ok(e) = mev.poll().await {
                            if let Event::Incoming(Packet::Publish(_)) = e {
                                m.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                    // The retained documents of every device arrive first
                    // (four per device): not the steady rate.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let with = cpu_phase(&t, &fleet, a.duration, Some(&mirrored)).await;
                    let lat = latency(&t, a).await;
                    reader.abort();
                    let _ = mc.disconnect().await;
                    lat.map(|l| (with, l))
                }
            }
        }
    };
    let firings = t.api.metrics().await.ok().map(|m| {
        m.iter()
            .filter(|(k, _)| k.starts_with("drover_rule_firings_total"))
            .map(|(_, v)| *v)
            .sum::<f64>()
    });
    let setup = c.setup_note(&t);
    let exited = stop(t, fleet, c.keep).await;
    let (with, lat) = match (measured, exited) {
        (Ok(r), None) => r,
        (_, Some(why)) => return Err(ScenarioError::Failed(why)),
        (Err(e), None) => return Err(e),
    };

    let cpu = |p: &Phase| p.series.as_ref().map(Series::cpu_percent);
    let mut cost = Table::new(
        format!(
            "automation: {n} devices, without vs with the JSON mirror and {} rules",
            a.rules
        ),
        &[
            "phase",
            "orchestrator",
            "orch CPU",
            "orch RSS start → end",
            "fleet publishes/s",
            "mirror messages received/s",
        ],
    );
    for (name, p, cmd) in [
        ("without", &without, &setup_without),
        ("with", &with, &setup_with),
    ] {
        let secs = p.wall.as_secs_f64().max(0.001);
        cost.row(vec![
            name.into(),
            format!("`{cmd}`"),
            cpu(p).map_or("—".into(), |v| format!("{v:.0} %")),
            p.series.as_ref().map_or("—".into(), |s| {
                format!("{} → {}", mib(s.first.rss_bytes), mib(s.last.rss_bytes))
            }),
            format!("{:.0}", p.fleet_publishes as f64 / secs),
            if name == "with" {
                format!("{:.0}", p.mirrored as f64 / secs)
            } else {
                "—".into()
            },
        ]);
    }
    if let (Some(off), Some(on)) = (cpu(&without), cpu(&with)) {
        cost.note(format!(
            "CPU with / without: {:.2}× ({:+.0} % of a core)",
            if off > 0.0 { on / off } else { f64::NAN },
            on - off
        ));
    }
    cost.note(format!(
        "two orchestrators one after the other in one run, each measured {} s after the fleet was online and 10 s of settling (with: and 5 s more after the mirror's reader subscribed, its retained documents delivered); CPU: percent of one core (200 % = both cores), sampled every 250 ms",
        a.duration.as_secs()
    ));
    cost.note(format!(
        "the {} rules: one MQTT-triggered (the latency rule, idle in this window), the rest cycling telemetry thresholds (held 0 s and 300 s), offline-for-300 s timers, device events, an app's state and device online, with conditions that rarely or never hold; rule firings counted by the orchestrator over the whole run: {}",
        a.rules,
        firings.map_or("unknown".into(), |f| format!("{f:.0}"))
    ));
    cost.note(setup);
    cost.note(fd_note);
    cost.note("the tool (agents, the mirror's reader, the pinger) runs on the same machine as the orchestrator and competes with it for CPU");

    let mut lt = Table::new(
        "automation: rule latency (MQTT trigger → publish action), beside the broker alone"
            .to_string(),
        &["path", "answered / sent", "p50", "p99", "max"],
    );
    for (name, v) in [
        (
            "rule: publish loadtest/ping → rule → loadtest/pong",
            &lat.rule,
        ),
        (
            "broker alone: publish loadtest/echo → the same client",
            &lat.echo,
        ),
    ] {
        let mut v: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        lt.row(vec![
            name.into(),
            format!("{} / {}", v.len(), lat.sent),
            percentile(&v, 50.0).map_or("—".into(), ms),
            percentile(&v, 99.0).map_or("—".into(), ms),
            v.last().copied().map_or("—".into(), ms),
        ]);
    }
    lt.note(format!(
        "{} pings, one every {} ms, during the \"with\" phase's fleet load (after its CPU window); QoS 0 both ways; the rule path is two broker hops and the orchestrator's link, rule evaluation and outbox, the echo path two broker hops",
        lat.sent,
        a.ping_interval.as_millis()
    ));
    Ok(vec![cost, lt])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_are_as_many_as_asked_with_unique_names_and_the_latency_rule_first() {
        let r = rules(20);
        assert_eq!(r.len(), 20);
        assert_eq!(r[0]["trigger"]["filter"], PING);
        let names: std::collections::BTreeSet<_> = r
            .iter()
            .map(|x| x["name"].as_str().expect("name").to_string())
            .collect();
        assert_eq!(names.len(), 20);
        assert_eq!(rules(0).len(), 1);
    }
}
