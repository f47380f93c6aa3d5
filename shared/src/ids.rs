//! Identifiers that end up inside MQTT topics, Docker container names and
//! URLs. They are validated once, at the edge, so everything downstream can
//! embed them without escaping.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {max} characters, got {len}")]
    TooLong { max: usize, len: usize },
    #[error("must start with a letter or digit")]
    BadStart,
    #[error("may only contain letters, digits, '-', '_' and '.', found {0:?}")]
    BadChar(char),
}

fn validate(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong { max, len: s.len() });
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(IdError::BadStart);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar(c));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate(&s, $max)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A device's stable identity: its MQTT client id and its topic segment.
    /// Letters, digits, `-`, `_`, `.`; no MQTT wildcards or separators.
    DeviceId,
    64
);

id_type!(
    /// The name of an app or of a container inside an app. Same alphabet as
    /// [`DeviceId`], short enough that `drover-<device>-<app>-<container>`
    /// stays a valid Docker container name.
    Name,
    48
);

/// The alphabet of [`validate`] as a regular expression, for the OpenAPI
/// document.
#[cfg(feature = "openapi")]
const PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]*$";

/// Written by hand rather than derived: a derived schema would say "any
/// string", and clients (and schemathesis) should learn the alphabet and
/// the length limit that the constructor enforces.
#[cfg(feature = "openapi")]
macro_rules! id_schema {
    ($name:ident, $what:expr) => {
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .min_length(Some(1))
                    .max_length(Some($name::MAX_LEN))
                    .pattern(Some(PATTERN))
                    .description(Some(concat!(
                        $what,
                        ": letters, digits, '-', '_' and '.', starting with a letter or digit"
                    )))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }
    };
}

#[cfg(feature = "openapi")]
id_schema!(DeviceId, "A device id");
#[cfg(feature = "openapi")]
id_schema!(Name, "The name of an app, a container or an identity");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids_and_rejects_topic_metacharacters() {
        assert!(DeviceId::new("pi-kitchen_01.local").is_ok());
        assert_eq!(DeviceId::new(""), Err(IdError::Empty));
        assert_eq!(DeviceId::new("a/b"), Err(IdError::BadChar('/')));
        assert_eq!(DeviceId::new("a+"), Err(IdError::BadChar('+')));
        assert_eq!(DeviceId::new("#"), Err(IdError::BadStart));
        assert_eq!(DeviceId::new("-x"), Err(IdError::BadStart));
        assert!(matches!(
            Name::new("x".repeat(49)),
            Err(IdError::TooLong { max: 48, len: 49 })
        ));
    }

    #[test]
    fn deserializing_validates() {
        let ok: Result<Name, _> = serde_json::from_str("\"web\"");
        assert!(ok.is_ok());
        let bad: Result<Name, _> = serde_json::from_str("\"we b\"");
        assert!(bad.is_err());
    }
}
