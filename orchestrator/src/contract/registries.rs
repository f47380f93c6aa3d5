use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the API shows of stored registry credentials: never the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Registry {
    pub host: String,
    pub username: String,
    pub password_set: bool,
    pub updated_at_ms: u64,
}

/// The body of `PUT /api/v1/registries/{host}`. `Debug` leaves the
/// password out.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    /// No `:` and no control characters (it becomes HTTP basic auth);
    /// at most 1024 bytes.
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = r"^[^:\u0000-\u001F\u007F-\u009F]+$"
    )]
    pub username: String,
    /// At most 1024 bytes.
    #[schema(min_length = 1, max_length = 1024)]
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}
