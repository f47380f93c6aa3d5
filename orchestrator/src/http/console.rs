//! The web console: plain HTML, CSS and JavaScript modules from
//! `orchestrator/console/`, compiled into the binary, served at `/` and
//! `/console/<file>`. The files hold no data and need no token; everything
//! they show comes from the REST API, which checks the caller as always.
//!
//! `include_bytes!` rather than an embedding crate: a dozen files in one
//! folder, listed once below, and a unit test fails when a file in the
//! folder is missing from the list (or the list names one that is gone).
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles
//! and connections from this origin only, no inline script or style, no
//! framing), `nosniff` and `X-Frame-Options: DENY`. Files are revalidated
//! on every load (`no-cache` with an ETag), so a new binary's console is
//! never mixed with an old one's cached modules.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;

use super::{ApiError, ApiState};

/// What the console's pages may load and do.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The query of the console's fleet-wide feed on `/api/v1/changes`, as
/// `app.js` opens it (a unit test holds the two together; the load test
/// subscribes with it). No `logs` and no `telemetry`: at 10,000 devices
/// those are ~1,000 changes a second that no page needs fleet-wide; the
/// device page follows its own device's on `?device=ID&kinds=logs,telemetry`.
pub const FEED: &str =
    "?coalesce=true&kinds=device,inventory,state,operation,event,app,rollout,rule_firing,job";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../console/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console. `index.html` is also served at `/`.
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("ui.js", JS),
    asset!("chart.js", JS),
    asset!("overview.js", JS),
    asset!("devices.js", JS),
    asset!("device.js", JS),
    asset!("apps.js", JS),
    asset!("rollouts.js", JS),
    asset!("rules.js", JS),
    asset!("jobs.js", JS),
    asset!("operations.js", JS),
    asset!("audit.js", JS),
    asset!("access.js", JS),
];

/// Each asset's ETag, in `ASSETS` order: a digest of its bytes, made on
/// first use.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(a.body);
                let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// The console's routes, to merge into the API router. Not in the OpenAPI
/// document: they are not API.
pub(super) fn routes(router: OpenApiRouter<ApiState>) -> OpenApiRouter<ApiState> {
    router
        .route("/", get(index))
        .route("/console/{file}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    serve(&name, &headers)
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        return ApiError::not_found(format!("the console has no file {name:?}")).into_response();
    };
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
    }

    #[test]
    fn every_file_of_the_console_folder_is_embedded_and_nothing_else() {
        let on_disk: BTreeSet<String> = std::fs::read_dir(dir())
            .expect("console folder")
            .map(|e| e.expect("entry"))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let embedded: BTreeSet<String> = ASSETS.iter().map(|a| a.name.to_string()).collect();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn the_console_opens_the_feed_the_load_test_measures() {
        let app = ASSETS.iter().find(|a| a.name == "app.js").expect("app.js");
        let text = std::str::from_utf8(app.body).expect("utf-8");
        assert!(
            text.contains(&format!("'/api/v1/changes{FEED}'")),
            "app.js does not open /api/v1/changes{FEED}"
        );
        for kind in FEED.split("kinds=").nth(1).expect("kinds").split(',') {
            assert!(
                crate::contract::Change::parse_kinds(kind).is_ok(),
                "{kind} is not a change kind"
            );
        }
    }

    /// A module that imports a file the binary does not serve would fail
    /// in the browser only.
    #[test]
    fn every_module_import_names_an_embedded_module() {
        for a in ASSETS.iter().filter(|a| a.content_type == JS) {
            let text = std::str::from_utf8(a.body).expect("utf-8");
            for line in text.lines().map(str::trim_start) {
                if !line.starts_with("import ") && !line.starts_with("} from ") {
                    continue;
                }
                let Some(spec) = line.split(['\'', '"']).nth(1) else {
                    continue;
                };
                let target = spec
                    .strip_prefix("./")
                    .unwrap_or_else(|| panic!("{}: import {spec:?} is not ./name.js", a.name));
                assert!(
                    ASSETS
                        .iter()
                        .any(|b| b.name == target && b.content_type == JS),
                    "{} imports {spec:?}, which is not embedded",
                    a.name
                );
            }
        }
    }

    /// The policy forbids inline script and style: markup must not need them.
    #[test]
    fn the_markup_has_no_inline_script_or_style() {
        for a in ASSETS {
            let text = String::from_utf8_lossy(a.body).to_lowercase();
            if a.name.ends_with(".html") {
                assert!(!text.contains("<style"), "{}: <style>", a.name);
                assert!(!text.contains(" style="), "{}: style=", a.name);
                assert!(!has_handler_attribute(&text), "{}: an on…= handler", a.name);
                for script in text.split("<script").skip(1) {
                    assert!(
                        script.split('>').next().is_some_and(|t| t.contains("src=")),
                        "{}: an inline <script>",
                        a.name
                    );
                }
            }
            if a.content_type == JS {
                assert!(!text.contains("innerhtml"), "{}: innerHTML", a.name);
                assert!(
                    !text.contains("setattribute('style'"),
                    "{}: style attribute",
                    a.name
                );
                assert!(!text.contains("eval("), "{}: eval", a.name);
            }
        }
    }

    /// ` onclick=`, ` onload=`, …
    fn has_handler_attribute(text: &str) -> bool {
        text.match_indices(" on").any(|(i, _)| {
            let rest = &text[i + 3..];
            let n = rest.chars().take_while(char::is_ascii_lowercase).count();
            n > 0 && rest[n..].starts_with('=')
        })
    }

    #[test]
    fn etags_differ_per_file_and_are_quoted() {
        let tags: BTreeSet<&String> = etags().iter().collect();
        assert_eq!(tags.len(), ASSETS.len());
        assert!(etags()
            .iter()
            .all(|t| t.starts_with('"') && t.ends_with('"')));
    }
}
