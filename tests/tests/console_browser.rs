//! The web console in a real headless Chromium (tests/src/browser.rs)
//! against a real orchestrator, a real agent and the real Docker Engine:
//! sign in; the agent's device shows online; deploy, stop and remove an app
//! from the console (checked through Docker, never through Drover); a line
//! the container prints appears in the live log tail without a reload; the
//! telemetry chart has points; a viewer sees no controls and a request
//! forged with the viewer's session is refused; an operator defines a rule
//! from JSON, sees it fire live and disables it, a bad rule shows the
//! server's reason; an operator runs a job from the form and sees its
//! output, a viewer sees it without the controls; the browser logged no
//! errors. Screenshots of the main
//! pages go to docs/screenshots/ with
//! `DROVER_UPDATE_SCREENSHOTS=1` (a temporary directory otherwise).

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::browser::Browser;
use drover_tests::*;
use fantoccini::Locator;
use serde_json::json;

const UI: Duration = Duration::from_secs(30);
const DOCKER: Duration = Duration::from_secs(90);

async fn running(docker: &bollard::Docker, name: &str) -> Option<bool> {
    docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .ok()
        .map(|c| c.state.and_then(|s| s.running).unwrap_or(false))
}

/// Sets a form control's value as a person choosing it would (input and
/// change events), whatever kind of control it is.
async fn choose(b: &Browser, css: &str, value: &str) {
    b.wait_for(css, UI).await;
    let script = format!(
        "const e = document.querySelector({css:?}); e.value = {value:?};\
         e.dispatchEvent(new Event('input', {{bubbles: true}}));\
         e.dispatchEvent(new Event('change', {{bubbles: true}})); return e.value;"
    );
    assert_eq!(
        b.eval(&script).await,
        json!(value),
        "{css} has no option {value}"
    );
}

/// Clicks what `css` finds. The console re-renders lists as changes
/// arrive, so an element found a moment ago may have been replaced by the
/// time it is clicked: then it is found again (a person would simply
/// click the new one).
async fn click(b: &Browser, css: &str) {
    for attempt in 1..=5 {
        match b.wait_for(css, UI).await.click().await {
            Ok(()) => return,
            Err(e) if e.is_stale_element_reference() && attempt < 5 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("click {css}: {e:?}"),
        }
    }
}

async fn sign_in(b: &Browser, base: &str, token: &str) {
    b.client
        .goto(&format!("{base}/"))
        .await
        .expect("open console");
    let input = b.wait_for("#signin-token", UI).await;
    input.send_keys(token).await.expect("type token");
    click(b, "#signin-submit").await;
    b.wait_for("[data-test=whoami]", UI).await;
}

/// How many elements `css` matches that are displayed.
async fn visible_count(b: &Browser, css: &str) -> usize {
    let mut visible = 0;
    for c in b.client.find_all(Locator::Css(css)).await.expect("query") {
        if c.is_displayed().await.unwrap_or(false) {
            visible += 1;
        }
    }
    visible
}

/// An operator (signed in anew in `b`) creates an MQTT-triggered rule from
/// the JSON form; a message on its topic fires it and the firing appears
/// live; the operator disables it (REST agrees); a rule with a bad
/// condition is refused with the server's reason naming the field.
/// Returns the rule's name.
async fn operator_defines_a_rule(b: &Browser, orch: &Orch) -> String {
    let base = &orch.api.base;
    click(b, "#sign-out").await;
    b.wait_for("#signin-token", UI).await;
    let operator = orch.api.as_role(&unique("operator"), "operator").await;
    sign_in(b, base, operator.token.as_deref().expect("operator token")).await;
    b.wait_text("[data-test=whoami]", "operator", UI).await;
    click(b, "#nav a[data-nav=rules]").await;
    b.wait_for("main[data-page=rules]", UI).await;
    click(b, "#rule-new").await;
    // The form starts from a valid example.
    let example = b
        .eval("return JSON.parse(document.querySelector('#rule-form-json').value).name")
        .await;
    assert_eq!(example, json!("revive-web"));

    let rule = unique("hot");
    let topic = format!("{}/temp", unique("sensors"));
    let spec = json!({
        "name": rule,
        "trigger": {"type": "mqtt", "filter": topic},
        "condition": "message.json.hot == true",
        "actions": [{"type": "publish", "topic": format!("{topic}/alert"), "payload": {"severity": "warning"}}],
    });
    choose(
        b,
        "#rule-form-json",
        &serde_json::to_string_pretty(&spec).expect("json"),
    )
    .await;
    click(b, "#rule-form button[type=submit]").await;
    b.wait_text("[data-test=rule-state]", "enabled", UI).await;
    b.wait_text("[data-test=rule-spec]", &topic, UI).await;

    // A message on the rule's topic: the firing arrives on the open page.
    let login = automation(&orch.api, &[], std::slice::from_ref(&topic)).await;
    let firing = format!("[data-test=firings] tr[data-test=firing-row][data-rule='{rule}']");
    wait_for(UI, "the firing shows on the rule's page", || async {
        publish_as(orch.mqtt_port, &login, &topic, r#"{"hot": true}"#).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.client.find(Locator::Css(&firing)).await.ok()
    })
    .await;
    b.wait_text(&format!("{firing} [data-test=outcome]"), "ok", UI)
        .await;
    b.wait_text(&firing, "publish", UI).await;

    // Listed; disabled from the list, and the server agrees.
    click(b, "#nav a[data-nav=rules]").await;
    let row = format!("tr[data-test=rule-row][data-rule='{rule}']");
    b.wait_text(&format!("{row} [data-test=enabled]"), "enabled", UI)
        .await;
    b.wait_text(&row, "mqtt", UI).await;
    b.wait_for(&firing, UI).await;
    b.screenshot("rules").await;
    click(b, &format!("{row} button[data-action=disable]")).await;
    b.wait_text(&format!("{row} [data-test=enabled]"), "disabled", UI)
        .await;
    let (s, v) = operator.get(&format!("/api/v1/rules/{rule}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["enabled"], json!(false), "{v}");
    assert_eq!(v["trigger"]["filter"], json!(topic), "{v}");

    // A bad condition: the server's reason, naming the field, beside the text.
    click(b, "#rule-new").await;
    let mut bad = spec.clone();
    bad["name"] = json!(unique("bad"));
    bad["condition"] = json!("1 + 1");
    choose(b, "#rule-form-json", &bad.to_string()).await;
    click(b, "#rule-form button[type=submit]").await;
    b.wait_text("[data-test=rule-error]", "condition", UI).await;
    b.wait_text("[data-test=rule-error]", "boolean", UI).await;
    b.wait_text("[data-test=msg-error]", "[condition]", UI)
        .await;
    assert_eq!(
        b.eval("return document.querySelector('#rule-form-json').getAttribute('aria-invalid')")
            .await,
        json!("true")
    );
    let (s, _) = operator
        .get(&format!(
            "/api/v1/rules/{}",
            bad["name"].as_str().expect("name")
        ))
        .await;
    assert_eq!(s, 404, "the bad rule was not created");
    let errors = b.console_errors().await;
    // The refused POST is the test's own doing; nothing else may be logged.
    let others: Vec<&String> = errors.iter().filter(|e| !e.contains("400")).collect();
    assert!(others.is_empty(), "the browser logged errors: {others:#?}");
    rule
}

/// The operator signed in in `b` runs a job from the form on the test's
/// agent: a bad image is refused with the server's reason beside the
/// field; a good one reaches `succeeded` live, with the command's output
/// in the device's tail (REST agrees). Returns the job's id.
async fn operator_runs_a_job(b: &Browser, orch: &Orch, device: &str) -> String {
    click(b, "#nav a[data-nav=jobs]").await;
    b.wait_for("main[data-page=jobs]", UI).await;
    click(b, "#job-new").await;
    choose(b, "#job-image", "Not An Image").await;
    choose(b, "#job-command", "echo hello-from-console").await;
    choose(b, "#job-timeout", "60").await;
    click(b, "#job-submit").await;
    b.wait_for("[data-test=job-error][data-field=image]", UI)
        .await;
    assert_eq!(
        b.eval("return document.querySelector('#job-image').getAttribute('aria-invalid')")
            .await,
        json!("true")
    );
    choose(
        b,
        "#job-image",
        &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"),
    )
    .await;
    click(b, "#job-submit").await;
    b.wait_for("#job-cancel, [data-test=job-phase] .badge.good", UI)
        .await;
    let hash = b.eval("return location.hash").await;
    let id = hash
        .as_str()
        .and_then(|h| h.strip_prefix("#/jobs/"))
        .expect("on the job's page")
        .to_string();
    b.wait_text("[data-test=job-phase]", "succeeded", DOCKER)
        .await;
    let row = format!("tr[data-test=job-device][data-device='{device}']");
    b.wait_text(
        &format!("{row} pre[data-test=output-tail]"),
        "hello-from-console",
        UI,
    )
    .await;
    b.wait_text(&format!("{row} [data-test=exit-code]"), "0", UI)
        .await;
    assert_eq!(
        visible_count(b, "#job-cancel").await,
        0,
        "a finished job has no Cancel"
    );
    b.eval(
        "for (const m of document.querySelectorAll('#messages .msg')) m.remove();\
         document.querySelector('[data-test=job-phase]').scrollIntoView(); return 0",
    )
    .await;
    b.screenshot("job").await;
    let (s, v) = orch.api.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["phase"], json!("succeeded"), "{v}");
    assert_eq!(v["command"], json!(["echo", "hello-from-console"]), "{v}");
    // Listed, with its phase.
    click(b, "#nav a[data-nav=jobs]").await;
    b.wait_text(
        &format!("tr[data-test=job-row][data-job='{id}'] [data-test=job-phase]"),
        "succeeded",
        UI,
    )
    .await;
    b.screenshot("jobs").await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_fleet_from_the_console() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let base = api.base.clone();
    // The harness's agents send telemetry every second.
    let agent = Agent::spawn(&orch.broker_url(), &unique("ui"));
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let app = unique("web");
    let line = format!("hello-from-{app}");
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &json!({"name": app, "containers": [{
                "name": "main", "image": format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"),
                "command": ["sh", "-c", format!("while true; do echo {line}; sleep 1; done")]
            }]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let container = agent.container_name(&app, "main");

    let b = Browser::start(1280, 800).await;
    sign_in(&b, &base, api.token.as_deref().expect("admin token")).await;
    b.wait_text("[data-test=whoami]", "admin", UI).await;
    b.screenshot("overview").await;

    // The device list shows the agent online.
    b.client
        .goto(&format!("{base}/#/devices"))
        .await
        .expect("devices");
    let row = format!("tr[data-test=device-row][data-device='{}']", agent.id);
    b.wait_text(&format!("{row} [data-test=status]"), "online", UI)
        .await;
    b.screenshot("devices").await;

    // Deploy from the device page; Docker runs it.
    click(&b, &format!("{row} a")).await;
    b.wait_text("[data-test=device-status]", "online", UI).await;
    choose(&b, "#deploy-app", &app).await;
    click(&b, "#deploy-submit").await;
    wait_for(DOCKER, "the container runs", || async {
        running(&docker, &container).await.filter(|r| *r)
    })
    .await;
    let app_row = format!("tr[data-test=app-row][data-app='{app}']");
    b.wait_text(&app_row, "running", DOCKER).await;

    // A line the container prints reaches the live tail, no reload.
    choose(&b, "#log-app", &app).await;
    b.wait_text("pre#log-tail", &line, UI).await;
    let before = b
        .eval("return performance.getEntriesByType('navigation').length")
        .await;

    // The telemetry chart has points.
    wait_for(UI, "the CPU chart draws a line", || async {
        let d = b
            .eval("const p = document.querySelector('[data-test=chart-cpu] svg path'); return p ? p.getAttribute('d') : null")
            .await;
        d.as_str()
            .filter(|d| d.matches(['L', 'l']).count() >= 1)
            .map(String::from)
    })
    .await;
    b.screenshot("device").await;

    // Restart from the app's row: the same container, a new process.
    let started =
        |c: bollard::models::ContainerInspectResponse| (c.id, c.state.and_then(|s| s.started_at));
    let (id, at) = started(
        docker
            .inspect_container(&container, None::<InspectContainerOptions>)
            .await
            .expect("inspect"),
    );
    click(&b, &format!("{app_row} button[data-action=restart]")).await;
    let restarted = wait_for(DOCKER, "the container is restarted", || async {
        let c = docker
            .inspect_container(&container, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let runs = c.state.as_ref().and_then(|s| s.running) == Some(true);
        let (id2, at2) = started(c);
        (runs && at2 != at).then_some(id2)
    })
    .await;
    assert_eq!(restarted, id, "the same container");

    // Stop, then remove, from the app's row.
    click(&b, &format!("{app_row} button[data-action=stop]")).await;
    wait_for(DOCKER, "the container stops", || async {
        running(&docker, &container).await.filter(|r| !*r)
    })
    .await;
    click(&b, &format!("{app_row} button[data-action=remove]")).await;
    // A confirmation, if the console asks for one.
    if let Ok(alert) = b.client.get_alert_text().await {
        assert!(!alert.is_empty());
        b.client.accept_alert().await.expect("confirm");
    }
    wait_for(DOCKER, "the container is removed", || async {
        running(&docker, &container).await.is_none().then_some(())
    })
    .await;
    let after = b
        .eval("return performance.getEntriesByType('navigation').length")
        .await;
    assert_eq!(before, after, "the page was never reloaded");

    for (page, name) in [
        ("#/apps", "apps"),
        ("#/rollouts", "rollouts"),
        ("#/operations", "operations"),
    ] {
        b.client
            .goto(&format!("{base}/{page}"))
            .await
            .expect("page");
        b.wait_for(&format!("main[data-page={name}]"), UI).await;
        b.screenshot(name).await;
    }
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:#?}");

    let rule = operator_defines_a_rule(&b, &orch).await;
    let job = operator_runs_a_job(&b, &orch, &agent.id).await;

    // A viewer: no controls, and a forged change with its session is refused.
    let viewer = api.as_role(&unique("viewer"), "viewer").await;
    let v = Browser::start(390, 844).await;
    sign_in(&v, &base, viewer.token.as_deref().expect("viewer token")).await;
    v.wait_text("[data-test=whoami]", "viewer", UI).await;
    v.client
        .goto(&format!("{base}/#/devices/{}", agent.id))
        .await
        .expect("device page");
    v.wait_text("[data-test=device-status]", "online", UI).await;
    let visible = visible_count(
        &v,
        "#deploy-form, button[data-action], #label-form, #revoke-device",
    )
    .await;
    assert_eq!(visible, 0, "a viewer sees controls the server would refuse");
    v.screenshot("device-viewer-phone").await;
    // The rules, their firings, and again no controls.
    v.client
        .goto(&format!("{base}/#/rules"))
        .await
        .expect("rules page");
    let rule_row = format!("tr[data-test=rule-row][data-rule='{rule}']");
    v.wait_text(&format!("{rule_row} [data-test=enabled]"), "disabled", UI)
        .await;
    v.wait_for(
        &format!("[data-test=firings] tr[data-test=firing-row][data-rule='{rule}']"),
        UI,
    )
    .await;
    click(&v, &format!("{rule_row} a")).await;
    v.wait_text("[data-test=rule-spec]", &rule, UI).await;
    assert_eq!(
        visible_count(
            &v,
            "#rule-new, #rule-form, #rule-edit-form, button[data-action]"
        )
        .await,
        0,
        "a viewer sees rule controls the server would refuse"
    );
    // Jobs: listed and followed, but no new-job link, form or Cancel.
    v.client
        .goto(&format!("{base}/#/jobs"))
        .await
        .expect("jobs page");
    let job_row = format!("tr[data-test=job-row][data-job='{job}']");
    v.wait_text(&format!("{job_row} [data-test=job-phase]"), "succeeded", UI)
        .await;
    assert_eq!(
        visible_count(&v, "#job-new").await,
        0,
        "a viewer sees New job"
    );
    click(&v, &format!("{job_row} a")).await;
    v.wait_text("[data-test=job-devices]", "hello-from-console", UI)
        .await;
    assert_eq!(
        visible_count(&v, "#job-cancel").await,
        0,
        "a viewer sees Cancel"
    );
    v.client
        .goto(&format!("{base}/#/jobs/_new"))
        .await
        .expect("new job page");
    v.wait_text("main[data-page=jobs] h1", "New job", UI).await;
    assert_eq!(
        visible_count(&v, "#job-form").await,
        0,
        "a viewer sees the job form"
    );
    let forged = v
        .client
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];\
                 fetch('/api/v1/session').then(r => r.json()).then(s =>\
                   fetch('/api/v1/devices/{}/apps', {{method: 'POST',\
                     headers: {{'content-type': 'application/json', 'X-Drover-CSRF': s.csrf}},\
                     body: JSON.stringify({{app: '{app}'}})}}))\
                 .then(r => done(r.status), e => done(String(e)));",
                agent.id
            ),
            Vec::new(),
        )
        .await
        .expect("fetch runs");
    assert_eq!(forged, json!(403), "a viewer's forged deploy");
    assert!(
        running(&docker, &container).await.is_none(),
        "nothing was deployed"
    );
    let errors = v.console_errors().await;
    // The refused fetch is the test's own doing; nothing else may be logged.
    let others: Vec<&String> = errors.iter().filter(|e| !e.contains("403")).collect();
    assert!(
        others.is_empty(),
        "the viewer's browser logged errors: {others:#?}"
    );
}

/// The console's live feed comes back by itself after the orchestrator is
/// killed and restarted, and catches up: an app created after the restart
/// shows up on the open page without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_reconnects_after_an_orchestrator_restart() {
    let mut orch = OrchProc::start().await;
    let base = orch.api.base.clone();
    let b = Browser::start(1280, 800).await;
    sign_in(&b, &base, orch.api.token.as_deref().expect("admin token")).await;
    b.client
        .goto(&format!("{base}/#/apps"))
        .await
        .expect("apps page");
    b.wait_for("main[data-page=apps]", UI).await;
    b.wait_for("[data-test=live-status][data-state=live]", UI)
        .await;
    orch.kill().await;
    b.wait_for("[data-test=live-status]:not([data-state=live])", UI)
        .await;
    orch.restart().await;
    b.wait_for(
        "[data-test=live-status][data-state=live]",
        Duration::from_secs(60),
    )
    .await;
    let app = unique("back");
    let (s, v) = orch
        .api
        .post(
            "/api/v1/apps",
            &json!({"name": app, "containers": [{"name": "main", "image": format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}")}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    b.wait_for(&format!("tr[data-test=app-row][data-app='{app}']"), UI)
        .await;
    let navigations = b
        .eval("return performance.getEntriesByType('navigation').length")
        .await;
    assert_eq!(navigations, json!(1), "the page was never reloaded");
}
