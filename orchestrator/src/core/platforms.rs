//! Whether an app's images provide the platforms of the devices a deploy,
//! an assignment or a rollout sends them to. Pure: which devices and
//! images a request touches ([`targets`]), what a registry's manifest says
//! ([`parse_manifest`], [`parse_config`]) and the verdict ([`judge`]). The
//! registry I/O and its cache are `registry/`; the command path
//! (`engine::commands`) asks before the command reaches the engine.

use std::collections::BTreeSet;

use drover_shared::model::ImageRef;
use drover_shared::{DeviceId, Name, Platform};
use serde::Deserialize;

use crate::core::fleet::Fleet;
use crate::core::selector::Selector;

/// What a request would send where.
#[derive(Debug, Clone)]
pub enum Target {
    /// `deploy` of an app's latest release to one device.
    Deploy { device: DeviceId, app: Name },
    /// An assignment or a rollout of `release` (0: latest) over
    /// `selector`. A rollout's empty selector means its app's
    /// assignment's (`rollout`), else every device.
    Selector {
        app: Name,
        selector: String,
        release: u64,
        rollout: bool,
    },
}

/// The images a request sends and the devices it sends them to, each with
/// its platform (`None`: the device has not said, see
/// `Hello::effective_platform`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    pub images: Vec<ImageRef>,
    pub devices: Vec<(DeviceId, Option<Platform>)>,
}

/// The images and devices of `target`, or `None` when the request is
/// invalid in some other way (unknown app, device or release, a bad
/// selector): the engine refuses it then, with its own error.
pub fn targets(fleet: &Fleet, target: &Target) -> Option<Targets> {
    let app = match target {
        Target::Deploy { app, .. } | Target::Selector { app, .. } => app,
    };
    let rec = fleet.app(app)?;
    let (release, devices) = match target {
        Target::Deploy { device, .. } => {
            fleet.has_device(device).then_some(())?;
            (0, vec![device.clone()])
        }
        Target::Selector {
            selector,
            release,
            rollout,
            ..
        } => {
            let raw = match (*rollout && selector.trim().is_empty(), &rec.assignment) {
                (true, Some(a)) => a.selector.clone(),
                _ => selector.clone(),
            };
            let sel = Selector::parse(&raw).ok()?;
            let devices = fleet.rollout_targets(app, &sel).into_keys().collect();
            (*release, devices)
        }
    };
    let spec = if release == 0 {
        rec.spec.clone()
    } else {
        rec.release(release)?.spec.clone()
    };
    let mut seen = BTreeSet::new();
    let images = spec
        .containers
        .iter()
        .filter_map(|c| ImageRef::parse(&c.image).ok())
        .filter(|i| seen.insert(i.to_string()))
        .collect();
    let devices = devices
        .into_iter()
        .map(|d| {
            let p = fleet.inventory(&d).and_then(|h| h.effective_platform());
            (d, p)
        })
        .collect();
    Some(Targets { images, devices })
}

/// What a manifest request returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    /// A manifest list / image index: the platforms of its entries.
    Index(Vec<Platform>),
    /// One image: its platform is in the config blob.
    Image { config_digest: String },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct ManifestError(String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// The media types a manifest request accepts: both index kinds first.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Reads a manifest by its `Content-Type` (or, missing, its own
/// `mediaType`, or its shape). Index entries without a platform, or with
/// `unknown/unknown` (build attestations), are left out.
pub fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Manifest, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(body)
        .map_err(|e| ManifestError(format!("the manifest is not valid JSON: {e}")))?;
    let media = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| c.starts_with("application/vnd."))
        .or(raw.media_type.clone())
        .unwrap_or_default();
    let is_index = media.ends_with("image.index.v1+json")
        || media.ends_with("manifest.list.v2+json")
        || (media.is_empty() && raw.manifests.is_some());
    if is_index {
        let platforms = raw
            .manifests
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.platform)
            .filter(|p| !p.os.is_empty() && p.os != "unknown" && p.architecture != "unknown")
            .map(|p| Platform::new(&p.os, &p.architecture, p.variant.as_deref()))
            .collect();
        return Ok(Manifest::Index(platforms));
    }
    match raw.config {
        Some(c) if !c.digest.is_empty() => Ok(Manifest::Image {
            config_digest: c.digest,
        }),
        _ => Err(ManifestError(format!(
            "the manifest ({}) names neither platforms nor a config",
            if media.is_empty() {
                "no media type"
            } else {
                &media
            }
        ))),
    }
}

/// The platform in an image's config blob (`os`, `architecture`,
/// `variant`).
pub fn parse_config(body: &[u8]) -> Result<Platform, ManifestError> {
    let raw: RawPlatform = serde_json::from_slice(body)
        .map_err(|e| ManifestError(format!("the image config is not valid JSON: {e}")))?;
    if raw.os.is_empty() || raw.architecture.is_empty() {
        return Err(ManifestError(
            "the image config names no os or architecture".into(),
        ));
    }
    Ok(Platform::new(
        &raw.os,
        &raw.architecture,
        raw.variant.as_deref(),
    ))
}

/// Devices named in a refusal at most; the rest are counted.
const NAMED: usize = 10;

/// An image that does not provide some devices' platforms.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub image: String,
    pub provides: Vec<Platform>,
    /// Each refused device with its platform.
    pub devices: Vec<(DeviceId, Platform)>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let provides: Vec<String> = self.provides.iter().map(|p| p.to_string()).collect();
        write!(
            f,
            "image {} provides {} only; ",
            self.image,
            if provides.is_empty() {
                "no platform".to_string()
            } else {
                provides.join(", ")
            }
        )?;
        let named: Vec<String> = self
            .devices
            .iter()
            .take(NAMED)
            .map(|(d, p)| format!("device {d} is {p}"))
            .collect();
        f.write_str(&named.join(", "))?;
        if self.devices.len() > NAMED {
            write!(f, " and {} more device(s)", self.devices.len() - NAMED)?;
        }
        Ok(())
    }
}

/// The devices of `devices` whose platform `provides` lacks. Devices of
/// unknown platform pass: only the device can tell then.
pub fn judge(
    image: &str,
    provides: &[Platform],
    devices: &[(DeviceId, Option<Platform>)],
) -> Result<(), Mismatch> {
    let refused: Vec<(DeviceId, Platform)> = devices
        .iter()
        .filter_map(|(d, p)| {
            let p = p.as_ref()?;
            (!provides.iter().any(|i| p.runs(i))).then(|| (d.clone(), p.clone()))
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(Mismatch {
            image: image.to_string(),
            provides: provides.to_vec(),
            devices: refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::ImagePlatforms;

    fn p(s: &str) -> Platform {
        s.parse().expect("platform")
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }

    #[test]
    fn an_index_lists_its_platforms_without_attestations() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","size":1,
               "platform":{"architecture":"amd64","os":"linux"}},
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:b","size":1,
               "platform":{"architecture":"arm","os":"linux","variant":"v7"}},
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:c","size":1,
               "platform":{"architecture":"unknown","os":"unknown"}}]}"#;
        let m =
            parse_manifest(Some("application/vnd.oci.image.index.v1+json"), body).expect("index");
        assert_eq!(
            m,
            Manifest::Index(vec![p("linux/amd64"), p("linux/arm/v7")])
        );
        // Docker's manifest list, told by its own mediaType.
        let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests":[{"digest":"sha256:a","platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}"#;
        assert_eq!(
            parse_manifest(None, list).expect("list"),
            Manifest::Index(vec![p("linux/arm64/v8")])
        );
    }

    #[test]
    fn a_single_manifest_points_at_its_config() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:cfg","size":2},
            "layers":[]}"#;
        assert_eq!(
            parse_manifest(
                Some("application/vnd.docker.distribution.manifest.v2+json"),
                body
            )
            .expect("manifest"),
            Manifest::Image {
                config_digest: "sha256:cfg".into()
            }
        );
        assert_eq!(
            parse_config(br#"{"architecture":"arm64","os":"linux","rootfs":{}}"#).expect("config"),
            p("linux/arm64")
        );
        assert!(parse_config(b"{}").is_err());
        assert!(parse_manifest(None, b"[]").is_err());
        assert!(parse_manifest(None, br#"{"schemaVersion":2}"#).is_err());
    }

    #[test]
    fn the_verdict_names_the_image_its_platforms_and_the_devices() {
        let provides = [p("linux/arm64/v8")];
        // arm64/v8 runs on an arm64 device that reports no variant.
        assert!(judge("i:1", &provides, &[(dev("pi"), Some(p("linux/arm64")))]).is_ok());
        let err = judge(
            "reg/i:1",
            &provides,
            &[
                (dev("pi"), Some(p("linux/arm64"))),
                (dev("nuc"), Some(p("linux/amd64"))),
                (dev("old"), None),
            ],
        )
        .expect_err("nuc refused");
        assert_eq!(err.devices, vec![(dev("nuc"), p("linux/amd64"))]);
        assert_eq!(
            err.to_string(),
            "image reg/i:1 provides linux/arm64/v8 only; device nuc is linux/amd64"
        );
    }

    #[test]
    fn many_refused_devices_are_counted_past_ten() {
        let devices: Vec<_> = (0..15)
            .map(|i| (dev(&format!("d{i:02}")), Some(p("linux/arm/v6"))))
            .collect();
        let err = judge("i:1", &[p("linux/arm/v7")], &devices).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("device d09 is linux/arm/v6"), "{text}");
        assert!(!text.contains("d10"), "{text}");
        assert!(text.ends_with("and 5 more device(s)"), "{text}");
    }

    #[test]
    fn a_device_joining_later_must_run_every_image_read() {
        let known = vec![
            ImagePlatforms {
                image: "a".into(),
                platforms: vec![p("linux/amd64"), p("linux/arm/v7")],
            },
            ImagePlatforms {
                image: "b".into(),
                platforms: vec![p("linux/amd64"), p("linux/arm64")],
            },
        ];
        assert!(ImagePlatforms::all_run_on(&known, Some(&p("linux/amd64"))));
        // arm64 runs arm/v7 (containerd's rule) and has its own entry of b.
        assert!(ImagePlatforms::all_run_on(&known, Some(&p("linux/arm64"))));
        // arm/v7 has an entry of a but none of b.
        assert!(!ImagePlatforms::all_run_on(
            &known,
            Some(&p("linux/arm/v7"))
        ));
        assert!(!ImagePlatforms::all_run_on(
            &known,
            Some(&p("linux/riscv64"))
        ));
        // Unknown device, or nothing read: not held against it.
        assert!(ImagePlatforms::all_run_on(&known, None));
        assert!(ImagePlatforms::all_run_on(&[], Some(&p("linux/riscv64"))));
    }
}
