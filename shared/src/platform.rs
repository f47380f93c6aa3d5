//! Platforms in the OCI image spec's terms (`os`, `architecture`,
//! `variant`): what a device runs (reported in `hello`) and what an image
//! provides (its manifest list / image index, or its config). Matching
//! follows containerd's `platforms` package, the matcher Docker itself
//! applies when it pulls for a platform: names are normalised first
//! (`aarch64` → `arm64`, `x86_64` → `amd64`, `arm64/v8` → `arm64`, `arm` →
//! `arm/v7`, …) and a device also runs the older variants of its
//! architecture (an `arm/v7` device runs `arm/v6` images, an `arm64` one
//! runs `arm/v8` to `arm/v5`, an `amd64` one runs `386`). Pure.

use serde::{Deserialize, Serialize};

/// An OCI platform, e.g. `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Platform {
    /// `linux`, as in GOOS.
    pub os: String,
    /// `amd64`, `arm64`, `arm`, `386`, `riscv64`, … as in GOARCH.
    pub architecture: String,
    /// `v6`, `v7` for `arm`; absent where the architecture has one kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.filter(|v| !v.is_empty()).map(str::to_string),
        }
    }

    /// The platform a binary built for `os` and Rust's `arch`
    /// (`std::env::consts`) runs on, with the ARM variant its build
    /// targets (`arm_variant`: `v7` for `armv7-*`, `v6` for `arm-*`).
    /// `None` for an architecture OCI has no name for.
    pub fn from_rust(os: &str, arch: &str, arm_variant: Option<&str>) -> Option<Platform> {
        let (architecture, variant) = match arch {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some(arm_variant.unwrap_or("v7"))),
            "x86" => ("386", None),
            "riscv64" => ("riscv64", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            "mips64" => ("mips64", None),
            _ => return None,
        };
        Some(Platform::new(os, architecture, variant))
    }

    /// The platform of the running binary.
    pub fn of_this_build() -> Option<Platform> {
        let arm_variant = if cfg!(target_feature = "v7") {
            Some("v7")
        } else if cfg!(target_feature = "v6") {
            Some("v6")
        } else {
            None
        };
        Platform::from_rust(std::env::consts::OS, std::env::consts::ARCH, arm_variant)
    }

    /// containerd's `Normalize`: one spelling per platform.
    pub fn normalize(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().map(str::to_ascii_lowercase);
        let variant = variant.as_deref().unwrap_or("");
        let (arch, variant) = match arch.as_str() {
            "i386" | "386" => ("386".to_string(), String::new()),
            "x86_64" | "x86-64" | "amd64" => (
                "amd64".to_string(),
                if variant == "v1" {
                    String::new()
                } else {
                    variant.to_string()
                },
            ),
            "aarch64" | "arm64" => (
                "arm64".to_string(),
                match variant {
                    "8" | "v8" | "v8.0" => String::new(),
                    "9" | "9.0" | "v9.0" => "v9".to_string(),
                    v => v.to_string(),
                },
            ),
            "armhf" => ("arm".to_string(), "v7".to_string()),
            "armel" => ("arm".to_string(), "v6".to_string()),
            "arm" => (
                "arm".to_string(),
                match variant {
                    "" | "7" => "v7".to_string(),
                    "5" | "6" | "8" => format!("v{variant}"),
                    v => v.to_string(),
                },
            ),
            other => (other.to_string(), variant.to_string()),
        };
        Platform {
            os,
            architecture: arch,
            variant: (!variant.is_empty()).then_some(variant),
        }
    }

    /// Whether a device of this platform runs an image built for `image`
    /// (containerd's `Only` matcher).
    pub fn runs(&self, image: &Platform) -> bool {
        let device = self.normalize();
        let image = image.normalize();
        if device.os != image.os {
            return false;
        }
        let arm_up_to = |max: u32| {
            image.architecture == "arm"
                && arm_level(image.variant.as_deref()).is_some_and(|l| l <= max)
        };
        match device.architecture.as_str() {
            "arm" => arm_level(device.variant.as_deref()).is_some_and(arm_up_to),
            "arm64" => {
                image.architecture == "arm64"
                    && arm64_level(image.variant.as_deref())
                        <= arm64_level(device.variant.as_deref())
                    || arm_up_to(8)
            }
            "amd64" => {
                image.architecture == "amd64"
                    && amd64_level(image.variant.as_deref())
                        <= amd64_level(device.variant.as_deref())
                    || image.architecture == "386"
            }
            _ => device == image,
        }
    }
}

/// `v5`…`v8` of 32-bit ARM.
fn arm_level(variant: Option<&str>) -> Option<u32> {
    variant?
        .strip_prefix('v')?
        .parse()
        .ok()
        .filter(|l| (5..=8).contains(l))
}

/// arm64 variants as a sortable number: none (v8) = 80, `v8.2` = 82, `v9` = 90.
fn arm64_level(variant: Option<&str>) -> u32 {
    let Some(v) = variant.and_then(|v| v.strip_prefix('v')) else {
        return 80;
    };
    let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
    major.parse::<u32>().unwrap_or(8) * 10 + minor.parse::<u32>().unwrap_or(0)
}

/// amd64 micro-architecture levels: none = v1.
fn amd64_level(variant: Option<&str>) -> u32 {
    variant
        .and_then(|v| v.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    /// `os/architecture[/variant]`, as `docker pull --platform` takes it.
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform::new(os, arch, Some(variant)))
            }
            _ => Err(format!(
                "{s:?} is not a platform: expected os/architecture[/variant], e.g. linux/arm64"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().expect("platform")
    }

    #[test]
    fn rust_arches_map_to_oci_names() {
        let of = |arch, v| Platform::from_rust("linux", arch, v).map(|p| p.to_string());
        assert_eq!(of("x86_64", None).as_deref(), Some("linux/amd64"));
        assert_eq!(of("aarch64", None).as_deref(), Some("linux/arm64"));
        assert_eq!(of("arm", Some("v7")).as_deref(), Some("linux/arm/v7"));
        assert_eq!(of("arm", Some("v6")).as_deref(), Some("linux/arm/v6"));
        assert_eq!(of("x86", None).as_deref(), Some("linux/386"));
        assert_eq!(of("riscv64", None).as_deref(), Some("linux/riscv64"));
        assert_eq!(of("avr", None), None);
        let here = Platform::of_this_build().expect("a known architecture");
        assert_eq!(here.os, std::env::consts::OS);
    }

    #[test]
    fn normalisation_follows_containerd() {
        assert_eq!(p("linux/aarch64").normalize(), p("linux/arm64"));
        assert_eq!(p("linux/arm64/v8").normalize(), p("linux/arm64"));
        assert_eq!(p("linux/x86_64").normalize(), p("linux/amd64"));
        assert_eq!(p("linux/amd64/v1").normalize(), p("linux/amd64"));
        assert_eq!(p("linux/arm").normalize(), p("linux/arm/v7"));
        assert_eq!(p("linux/armhf").normalize(), p("linux/arm/v7"));
        assert_eq!(p("linux/armel").normalize(), p("linux/arm/v6"));
        assert_eq!(p("Linux/ARM64").normalize(), p("linux/arm64"));
    }

    #[test]
    fn variants_match_as_containerd_does() {
        // arm64 images with variant v8 run on a device that reports none.
        assert!(p("linux/arm64").runs(&p("linux/arm64/v8")));
        assert!(p("linux/arm64/v8").runs(&p("linux/arm64")));
        assert!(!p("linux/arm64").runs(&p("linux/arm64/v9")));
        assert!(p("linux/arm64/v9").runs(&p("linux/arm64")));
        // 32-bit ARM: a device runs its variant and older ones.
        assert!(p("linux/arm/v7").runs(&p("linux/arm/v7")));
        assert!(p("linux/arm/v7").runs(&p("linux/arm/v6")));
        assert!(p("linux/arm/v7").runs(&p("linux/arm")));
        assert!(!p("linux/arm/v6").runs(&p("linux/arm/v7")));
        assert!(!p("linux/arm/v6").runs(&p("linux/arm")));
        // arm64 devices run 32-bit ARM images, not the reverse.
        assert!(p("linux/arm64").runs(&p("linux/arm/v7")));
        assert!(!p("linux/arm/v7").runs(&p("linux/arm64")));
        // amd64 runs 386, and levels up to its own.
        assert!(p("linux/amd64").runs(&p("linux/386")));
        assert!(!p("linux/amd64").runs(&p("linux/amd64/v3")));
        assert!(p("linux/amd64/v3").runs(&p("linux/amd64/v2")));
        // Across architectures and systems: never.
        assert!(!p("linux/amd64").runs(&p("linux/arm64")));
        assert!(!p("linux/arm64").runs(&p("linux/amd64")));
        assert!(!p("linux/amd64").runs(&p("windows/amd64")));
        assert!(p("linux/riscv64").runs(&p("linux/riscv64")));
        assert!(!p("linux/riscv64").runs(&p("linux/ppc64le")));
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
        assert_eq!(p("linux/amd64").variant, None);
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
    }
}
