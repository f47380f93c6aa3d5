//! The OpenAPI document's frame: title, tags, the bearer scheme, and the
//! responses every `/api/` route shares. The paths themselves come from the
//! handlers' `#[utoipa::path]` attributes as the router collects them
//! (`routes::routes`); the schemas from the `contract` types.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::PartialSchema;

use super::auth::is_public;
use crate::contract::{ErrorBody, API_PREFIX};

/// The name of the bearer scheme in `components.securitySchemes`.
const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Drover",
        description = "The REST API of the Drover orchestrator: devices, apps, operations, \
                       registry credentials, enrollment, API tokens, automation identities \
                       and the audit log. Every `/api/v1` route needs `Authorization: Bearer \
                       <token>`; what a token may do depends on its role (viewer, operator, admin).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "meta", description = "Health, metrics and this document; no token needed"),
        (name = "devices", description = "Devices and what runs on them"),
        (name = "apps", description = "App definitions"),
        (name = "operations", description = "Changes to devices, followed to their outcome"),
        (name = "rollouts", description = "Releases rolled out to a fleet in batches, gated by health, rolled back on failure"),
        (name = "jobs", description = "Edge jobs: a container run to completion on the devices a selector matches, with each exit code and output tail"),
        (name = "rules", description = "Rules that act: a trigger, a device selector, a CEL condition, actions and a cooldown; every firing recorded"),
        (name = "changes", description = "The fleet's change stream"),
        (name = "registries", description = "Private registry credentials"),
        (name = "agent-releases", description = "Agent binaries by version and architecture, which rollouts put on devices"),
        (name = "security", description = "Enrollment, revocation, API tokens, automation identities, audit log"),
    ),
    components(schemas(ErrorBody))
)]
pub(super) struct ApiDoc;

/// The responses any authenticated route can give, whatever it does.
const SHARED: [(&str, &str); 4] = [
    (
        "401",
        "No API token, or one that is unknown, revoked or malformed",
    ),
    ("403", "The token's role may not do this"),
    ("500", "The change could not be stored; nothing was changed"),
    ("503", "The orchestrator is starting or stopping; try again"),
];

/// Completes the collected document: the version, the bearer scheme, and
/// on every authenticated operation its security requirement and the
/// shared error responses. Done here, once, rather than in every handler's
/// attribute, so no route can forget them.
pub(super) fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API token (`drover tokens create`, or the admin token file a new data directory gets)",
                ))
                .build(),
        ),
    );
    for (code, description) in SHARED {
        let mut response = ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        );
        if code == "401" {
            response = response.header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(String::schema())
                    .description(Some("`Bearer`"))
                    .build(),
            );
        }
        components
            .responses
            .insert(shared_name(code), RefOr::T(response.build()));
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with(API_PREFIX) || is_public(path) {
            continue;
        }
        if path == super::auth::SESSION_PATH {
            // Signing in takes a token in its body; the rest need a session.
            for op in [&mut item.get, &mut item.delete].into_iter().flatten() {
                authenticated(op);
            }
            continue;
        }
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            authenticated(op);
        }
    }
    doc
}

fn shared_name(code: &str) -> String {
    format!("Error{code}")
}

fn authenticated(op: &mut Operation) {
    op.security = Some(vec![SecurityRequirement::new::<_, _, &str>(BEARER, [])]);
    for (code, _) in SHARED {
        op.responses
            .responses
            .entry(code.to_string())
            .or_insert_with(|| {
                RefOr::Ref(Ref::new(format!(
                    "#/components/responses/{}",
                    shared_name(code)
                )))
            });
    }
}
