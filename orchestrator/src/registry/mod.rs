//! Which platforms an image provides, asked of its registry over the OCI
//! distribution API: `GET /v2/<name>/manifests/<reference>` (an image
//! index or manifest list names its platforms; a single manifest points at
//! its config blob, `GET /v2/<name>/blobs/<digest>`, which names its
//! os/architecture/variant). Basic and bearer-token authentication with
//! the credentials stored for the registry (`registries`).
//!
//! Cached per manifest digest, which is content: a digest's platforms
//! never change, so they are kept (bounded) and asked once, however many
//! devices and rollouts use the image. A tag is resolved to its digest
//! again after [`TAG_TTL`]: tags move.
//!
//! Written on reqwest (already Drover's HTTP client) rather than a
//! registry client crate: the check needs two GETs and the 401 dance,
//! and the pure parsing lives in `core::platforms`, unit-tested.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_shared::model::ImageRef;
use drover_shared::payload::RegistryCredential;
use drover_shared::Platform;
use sha2::{Digest, Sha256};

use crate::core::platforms::{parse_config, parse_manifest, Manifest, ACCEPT};
use crate::metrics::Metrics;

/// How long a tag's digest is trusted before the registry is asked again.
pub const TAG_TTL: Duration = Duration::from_secs(30);
/// One request's limit: a registry that does not answer delays a deploy
/// by this much at most per request, then the deploy goes ahead.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Digests (and tags) remembered at most.
const CACHE_ENTRIES: usize = 4096;
/// A manifest or config larger than this is refused (the spec's manifests
/// are a few KiB).
const MAX_DOCUMENT: usize = 4 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {host} could not be reached: {message}")]
    Unreachable { host: String, message: String },
    #[error("registry {host} has no manifest {reference} of {repository}")]
    NotFound {
        host: String,
        repository: String,
        reference: String,
    },
    #[error("registry {host} refused the credentials{}", if *.had_credentials { " stored for it" } else { " (none are stored for it)" })]
    Unauthorized { host: String, had_credentials: bool },
    #[error("registry {host} answered {message}")]
    Protocol { host: String, message: String },
}

/// An image's platforms and where the answer came from.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub digest: String,
    pub platforms: Arc<Vec<Platform>>,
    /// Answered from the cache without asking the registry.
    pub cached: bool,
}

#[derive(Default)]
struct Cache {
    /// `image reference` → (digest, when resolved).
    tags: HashMap<String, (String, Instant)>,
    /// manifest digest → platforms.
    digests: HashMap<String, Arc<Vec<Platform>>>,
    /// `image reference` → why it could not be looked up, and when: kept
    /// for [`TAG_TTL`] too, so ten thousand deploys of an image the
    /// registry does not have (or while it is down) ask it once, not ten
    /// thousand times, and never wait out a timeout each.
    failures: HashMap<String, (RegistryError, Instant)>,
}

impl Cache {
    fn digest_of(&self, key: &str) -> Option<String> {
        let (digest, at) = self.tags.get(key)?;
        (at.elapsed() < TAG_TTL).then(|| digest.clone())
    }

    fn failure(&self, key: &str) -> Option<RegistryError> {
        let (e, at) = self.failures.get(key)?;
        (at.elapsed() < TAG_TTL).then(|| e.clone())
    }

    fn put_failure(&mut self, key: String, e: RegistryError) {
        if self.failures.len() >= CACHE_ENTRIES {
            self.failures.retain(|_, (_, at)| at.elapsed() < TAG_TTL);
            if self.failures.len() >= CACHE_ENTRIES {
                self.failures.clear();
            }
        }
        self.failures.insert(key, (e, Instant::now()));
    }

    fn put(&mut self, key: String, digest: &str, platforms: Arc<Vec<Platform>>) {
        if self.tags.len() >= CACHE_ENTRIES {
            self.tags.retain(|_, (_, at)| at.elapsed() < TAG_TTL);
            if self.tags.len() >= CACHE_ENTRIES {
                self.tags.clear();
            }
        }
        if self.digests.len() >= CACHE_ENTRIES && !self.digests.contains_key(digest) {
            // Bounded, not clever: a fleet uses far fewer images.
            self.digests.clear();
        }
        self.failures.remove(&key);
        self.tags.insert(key, (digest.to_string(), Instant::now()));
        self.digests.insert(digest.to_string(), platforms);
    }
}

/// The registry client with its cache. Cheap to share (`Arc`).
pub struct Registries {
    http: reqwest::Client,
    cache: Mutex<Cache>,
    metrics: Arc<Metrics>,
    /// One lookup per image reference at a time: concurrent requests for
    /// the same image wait for the first and read its answer.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Registries {
    pub fn new(metrics: Arc<Metrics>) -> Registries {
        // Registries off this machine use https, checked against the
        // system's trusted roots.
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")));
        for cert in rustls_native_certs::load_native_certs().certs {
            if let Ok(c) = reqwest::Certificate::from_der(&cert) {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "registry client with system roots failed; plain client");
            reqwest::Client::new()
        });
        Registries {
            http,
            cache: Mutex::new(Cache::default()),
            metrics,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The platforms `image` provides, from the cache or its registry.
    pub async fn platforms(
        &self,
        image: &ImageRef,
        credential: Option<&RegistryCredential>,
    ) -> Result<Lookup, RegistryError> {
        let key = image.to_string();
        if let Some(hit) = self.cached(image, &key)? {
            return Ok(hit);
        }
        let gate = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let result = {
            let _turn = gate.lock().await;
            // Whoever went first may have answered meanwhile.
            match self.cached(image, &key) {
                Ok(Some(hit)) => Ok(hit),
                Err(e) => Err(e),
                Ok(None) => self.ask(image, key.clone(), credential).await,
            }
        };
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&gate) <= 2 {
            inflight.remove(&key);
        }
        result
    }

    /// A cached answer: platforms, a recent failure, or `None`.
    fn cached(&self, image: &ImageRef, key: &str) -> Result<Option<Lookup>, RegistryError> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.failure(key) {
            drop(cache);
            self.metrics.platform_cache_hits.inc();
            return Err(e);
        }
        let Some(digest) = image.digest.clone().or_else(|| cache.digest_of(key)) else {
            return Ok(None);
        };
        let Some(platforms) = cache.digests.get(&digest).cloned() else {
            return Ok(None);
        };
        drop(cache);
        self.metrics.platform_cache_hits.inc();
        Ok(Some(Lookup {
            digest,
            platforms,
            cached: true,
        }))
    }

    async fn ask(
        &self,
        image: &ImageRef,
        key: String,
        credential: Option<&RegistryCredential>,
    ) -> Result<Lookup, RegistryError> {
        let endpoint = Endpoint::of(image);
        let mut session = Session {
            http: &self.http,
            endpoint: &endpoint,
            credential,
            bearer: None,
            requests: 0,
        };
        let result = session.resolve(image.pull_tag()).await;
        self.metrics.registry_requests.inc_by(session.requests);
        let (digest, platforms) = match result {
            Ok(found) => found,
            Err(e) => {
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put_failure(key, e.clone());
                return Err(e);
            }
        };
        let platforms = Arc::new(platforms);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key, &digest, platforms.clone());
        Ok(Lookup {
            digest,
            platforms,
            cached: false,
        })
    }
}

/// Where an image's registry answers.
struct Endpoint {
    /// The registry as images name it (`docker.io`, `127.0.0.1:5000`).
    host: String,
    base: String,
    repository: String,
}

impl Endpoint {
    fn of(image: &ImageRef) -> Endpoint {
        let host = image.registry_host();
        let path = match image.repository.split_once('/') {
            Some((first, rest)) if first.to_ascii_lowercase() == host => rest.to_string(),
            _ => image.repository.clone(),
        };
        let (server, repository) = if host == "docker.io" {
            let repo = if path.contains('/') {
                path
            } else {
                format!("library/{path}")
            };
            ("registry-1.docker.io".to_string(), repo)
        } else {
            (host.clone(), path)
        };
        // Plain http only on this machine's loopback, as Docker allows
        // without configuration; every other registry speaks https.
        let name = server.rsplit_once(':').map_or(server.as_str(), |(h, _)| h);
        let loopback = name == "localhost"
            || name.starts_with("127.")
            || name == "[::1]"
            || name
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback());
        let scheme = if loopback { "http" } else { "https" };
        Endpoint {
            host,
            base: format!("{scheme}://{server}/v2/{repository}"),
            repository,
        }
    }
}

/// One lookup's requests, carrying a bearer token once it has one.
struct Session<'a> {
    http: &'a reqwest::Client,
    endpoint: &'a Endpoint,
    credential: Option<&'a RegistryCredential>,
    bearer: Option<String>,
    requests: u64,
}

impl Session<'_> {
    fn unreachable(&self, e: &reqwest::Error) -> RegistryError {
        RegistryError::Unreachable {
            host: self.endpoint.host.clone(),
            message: error_chain(e),
        }
    }

    fn protocol(&self, message: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            host: self.endpoint.host.clone(),
            message: message.into(),
        }
    }

    /// The manifest digest and platforms of `reference` (a tag or digest).
    async fn resolve(&mut self, reference: &str) -> Result<(String, Vec<Platform>), RegistryError> {
        let url = format!("{}/manifests/{reference}", self.endpoint.base);
        let (headers, body) = self.get(&url, Some(ACCEPT)).await.map_err(|e| match e {
            Fetch::NotFound => RegistryError::NotFound {
                host: self.endpoint.host.clone(),
                repository: self.endpoint.repository.clone(),
                reference: reference.to_string(),
            },
            Fetch::Failed(e) => e,
        })?;
        let digest = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:"))
            .map(str::to_string)
            .unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(&body)));
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let manifest =
            parse_manifest(content_type, &body).map_err(|e| self.protocol(e.to_string()))?;
        let platforms = match manifest {
            Manifest::Index(platforms) => platforms,
            Manifest::Image { config_digest } => {
                let url = format!("{}/blobs/{config_digest}", self.endpoint.base);
                let (_, body) = self.get(&url, None).await.map_err(|e| match e {
                    Fetch::NotFound => self.protocol(format!("no config blob {config_digest}")),
                    Fetch::Failed(e) => e,
                })?;
                vec![parse_config(&body).map_err(|e| self.protocol(e.to_string()))?]
            }
        };
        Ok((digest, platforms))
    }

    async fn send(
        &mut self,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut req = self.http.get(url);
        if let Some(a) = accept {
            req = req.header(reqwest::header::ACCEPT, a);
        }
        req = match (&self.bearer, self.credential) {
            (Some(token), _) => req.bearer_auth(token),
            (None, Some(c)) => req.basic_auth(&c.username, Some(&c.password)),
            (None, None) => req,
        };
        self.requests += 1;
        req.send().await.map_err(|e| self.unreachable(&e))
    }

    async fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), Fetch> {
        let mut resp = self.send(url, accept).await?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED && self.bearer.is_none() {
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if let Some(params) = bearer_challenge(&challenge) {
                self.bearer = Some(self.token(&params).await?);
                resp = self.send(url, accept).await?;
            }
        }
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(Fetch::Failed(RegistryError::Unauthorized {
                host: self.endpoint.host.clone(),
                had_credentials: self.credential.is_some(),
            }));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Fetch::NotFound);
        }
        if !status.is_success() {
            return Err(Fetch::Failed(self.protocol(format!("HTTP {status}"))));
        }
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_DOCUMENT as u64)
        {
            return Err(Fetch::Failed(self.protocol("a document over 4 MiB")));
        }
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| Fetch::Failed(self.unreachable(&e)))?;
        if body.len() > MAX_DOCUMENT {
            return Err(Fetch::Failed(self.protocol("a document over 4 MiB")));
        }
        Ok((headers, body.to_vec()))
    }

    /// A bearer token from the challenge's realm, for pulling.
    async fn token(&mut self, params: &HashMap<String, String>) -> Result<String, RegistryError> {
        let realm = params
            .get("realm")
            .ok_or_else(|| self.protocol("a bearer challenge without a realm"))?;
        let mut req = self.http.get(realm);
        if let Some(service) = params.get("service") {
            req = req.query(&[("service", service)]);
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.endpoint.repository));
        req = req.query(&[("scope", scope)]);
        if let Some(c) = self.credential {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        self.requests += 1;
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        if !resp.status().is_success() {
            return Err(RegistryError::Unauthorized {
                host: self.endpoint.host.clone(),
                had_credentials: self.credential.is_some(),
            });
        }
        #[derive(serde::Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let t: Token = resp
            .json()
            .await
            .map_err(|e| self.protocol(format!("a token that does not parse: {e}")))?;
        t.token
            .or(t.access_token)
            .ok_or_else(|| self.protocol("a token response without a token"))
    }
}

enum Fetch {
    NotFound,
    Failed(RegistryError),
}

impl From<RegistryError> for Fetch {
    fn from(e: RegistryError) -> Self {
        Fetch::Failed(e)
    }
}

/// The parameters of a `Bearer` challenge (`realm`, `service`, `scope`).
fn bearer_challenge(header: &str) -> Option<HashMap<String, String>> {
    let rest = header.trim();
    let (scheme, rest) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.insert(key, value.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry with bearer-token auth, on loopback: the token comes
    /// from its realm with the stored credentials, the index's platforms
    /// are read, and the second lookup is the cache's. A missing image is
    /// asked once and its failure remembered.
    #[tokio::test]
    async fn bearer_auth_index_and_the_cache() {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::get;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let realm = format!("http://{addr}/token");
        let index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[{"digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"arm","variant":"v7"}},
                         {"digest":"sha256:b","size":1,"platform":{"os":"linux","architecture":"arm64"}}]}"#;
        let app = axum::Router::new()
            .route(
                "/token",
                get(|headers: HeaderMap| async move {
                    // robot:pw
                    let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some("Basic cm9ib3Q6cHc=");
                    if ok {
                        (StatusCode::OK, r#"{"token":"t0k"}"#)
                    } else {
                        (StatusCode::UNAUTHORIZED, "{}")
                    }
                }),
            )
            .route(
                "/v2/team/app/manifests/{reference}",
                get(move |headers: HeaderMap| {
                    let realm = realm.clone();
                    async move {
                        if headers.get("authorization").and_then(|v| v.to_str().ok())
                            != Some("Bearer t0k")
                        {
                            return (
                                StatusCode::UNAUTHORIZED,
                                [
                                    (
                                        "www-authenticate",
                                        format!(r#"Bearer realm="{realm}",service="test""#),
                                    ),
                                    ("content-type", "application/json".into()),
                                ],
                                String::new(),
                            );
                        }
                        (
                            StatusCode::OK,
                            [
                                ("www-authenticate", String::new()),
                                (
                                    "content-type",
                                    "application/vnd.oci.image.index.v1+json".into(),
                                ),
                            ],
                            index.to_string(),
                        )
                    }
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let metrics = Arc::new(Metrics::default());
        let r = Registries::new(metrics.clone());
        let image = ImageRef::parse(&format!("{addr}/team/app:1")).expect("ref");
        let cred = RegistryCredential {
            host: addr.to_string(),
            username: "robot".into(),
            password: "pw".into(),
        };
        let found = r.platforms(&image, Some(&cred)).await.expect("platforms");
        assert!(!found.cached);
        assert_eq!(
            found.platforms.as_slice(),
            &[
                Platform::new("linux", "arm", Some("v7")),
                Platform::new("linux", "arm64", None)
            ]
        );
        // Manifest (401), token, manifest again.
        assert_eq!(metrics.registry_requests.get(), 3);
        let again = r.platforms(&image, Some(&cred)).await.expect("cached");
        assert!(again.cached);
        assert_eq!(again.digest, found.digest);
        assert_eq!(metrics.registry_requests.get(), 3);
        assert_eq!(metrics.platform_cache_hits.get(), 1);

        // Wrong credentials: refused, said so.
        let other = ImageRef::parse(&format!("{addr}/team/app:2")).expect("ref");
        let bad = RegistryCredential {
            password: "nope".into(),
            ..cred.clone()
        };
        let err = r.platforms(&other, Some(&bad)).await.expect_err("refused");
        assert!(
            matches!(
                err,
                RegistryError::Unauthorized {
                    had_credentials: true,
                    ..
                }
            ),
            "{err}"
        );

        // Not there: asked once, then remembered.
        let missing = ImageRef::parse(&format!("{addr}/team/none:1")).expect("ref");
        let before = metrics.registry_requests.get();
        let err = r.platforms(&missing, None).await.expect_err("missing");
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
        let err = r.platforms(&missing, None).await.expect_err("missing");
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
        assert_eq!(metrics.registry_requests.get(), before + 1);
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .expect("bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        assert!(bearer_challenge(r#"Basic realm="Registry""#).is_none());
    }

    #[test]
    fn endpoints_follow_docker_naming() {
        let e = |s: &str| Endpoint::of(&ImageRef::parse(s).expect("ref"));
        let hub = e("busybox:1");
        assert_eq!(hub.base, "https://registry-1.docker.io/v2/library/busybox");
        assert_eq!(hub.host, "docker.io");
        let local = e("127.0.0.1:5000/drover/busybox:2");
        assert_eq!(local.base, "http://127.0.0.1:5000/v2/drover/busybox");
        assert_eq!(local.repository, "drover/busybox");
        assert_eq!(
            e("registry.example.com/a/b:1").base,
            "https://registry.example.com/v2/a/b"
        );
        assert_eq!(e("localhost:5000/x:1").base, "http://localhost:5000/v2/x");
    }
}
