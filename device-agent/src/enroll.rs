//! The device's broker credential, and how it gets one.
//!
//! An enrolled device connects with its id as username and client id and
//! the password it was issued, stored in `<state-dir>/credential` (mode
//! 0600, written atomically). A device without one presents an enrollment
//! token once: it connects as [`ENROLL_USERNAME`] with the token as
//! password — the broker then lets it publish only its `enroll` topic and
//! read only its `enrolled` topic — sends the token, and waits for the
//! answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_shared::identity::ENROLL_USERNAME;
use drover_shared::payload::{EnrollOutcome, EnrollRequest, Enrolled, Secret};
use drover_shared::topic::TopicKind;
use drover_shared::DeviceId;
use rand::Rng;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, Packet, QoS};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::AgentConfig;

pub const CREDENTIAL_FILE: &str = "credential";

/// How long one enrollment attempt waits for its answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// `Debug` shows the password redacted ([`Secret`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub device: DeviceId,
    pub password: Secret,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read credential file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credential file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("credential file {path} is for device {found}, but this agent is {expected}")]
    OtherDevice {
        path: PathBuf,
        found: DeviceId,
        expected: DeviceId,
    },
    #[error("cannot write credential file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The orchestrator or the broker said no: retrying the same token
    /// cannot help.
    #[error("enrollment refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// Loads the stored credential, if any. A credential for another device id
/// is an error, not silently used.
pub fn load(state_dir: &Path, device: &DeviceId) -> Result<Option<Credential>, CredentialError> {
    let path = state_dir.join(CREDENTIAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CredentialError::Read { path, source }),
    };
    let cred: Credential =
        serde_json::from_slice(&bytes).map_err(|e| CredentialError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if &cred.device != device {
        return Err(CredentialError::OtherDevice {
            path,
            found: cred.device,
            expected: device.clone(),
        });
    }
    Ok(Some(cred))
}

/// Stores a credential readable by its owner only, atomically.
pub fn save(state_dir: &Path, device: &DeviceId, password: &str) -> Result<(), CredentialError> {
    let path = state_dir.join(CREDENTIAL_FILE);
    let cred = Credential {
        device: device.clone(),
        password: Secret::new(password),
    };
    let bytes = serde_json::to_vec(&cred).unwrap_or_default();
    crate::store::write_file(&path, &bytes, Some(0o600)).map_err(|source| CredentialError::Write {
        path: path.clone(),
        source,
    })
}

/// Enrolls with `token` and stores the credential it gets. Network trouble
/// is retried with jittered backoff; a refusal is returned at once.
pub async fn enroll(
    config: &AgentConfig,
    device: &DeviceId,
    token: &Secret,
) -> Result<Credential, EnrollError> {
    let mut backoff = BACKOFF_START;
    loop {
        match attempt(config, device, token).await {
            Ok(password) => {
                save(&config.state_dir, device, &password)?;
                info!("enrolled; credential stored");
                return Ok(Credential {
                    device: device.clone(),
                    password: Secret::new(password),
                });
            }
            Err(Attempt::Refused(reason)) => return Err(EnrollError::Refused(reason)),
            Err(Attempt::Retry(why)) => {
                let max = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
                let delay = Duration::from_millis(rand::rng().random_range(max / 2..=max));
                warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "enrollment attempt failed");
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

enum Attempt {
    Refused(String),
    Retry(String),
}

async fn attempt(
    config: &AgentConfig,
    device: &DeviceId,
    token: &Secret,
) -> Result<String, Attempt> {
    let mut opts = crate::mqtt::options(config, device);
    opts.set_clean_session(true);
    opts.set_credentials(ENROLL_USERNAME, token.expose());
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let request_id = format!("{:016x}", rand::rng().random::<u64>());
    let answer_topic = config.topics.device(device, TopicKind::Enrolled);
    let ask_topic = config.topics.device(device, TopicKind::Enroll);
    let request = drover_shared::encode(&EnrollRequest {
        request_id: request_id.clone(),
        token: token.clone(),
    });
    let exchange = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe(answer_topic.clone(), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| Attempt::Retry(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client
                        .publish(ask_topic.clone(), QoS::AtLeastOnce, false, request.clone())
                        .await
                        .map_err(|e| Attempt::Retry(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == answer_topic => {
                    match drover_shared::decode::<Enrolled>(&p.payload) {
                        Ok(a) if a.request_id == request_id => {
                            return match a.outcome {
                                EnrollOutcome::Accepted { password } => {
                                    Ok(password.expose().to_string())
                                }
                                EnrollOutcome::Refused { reason } => Err(Attempt::Refused(reason)),
                            };
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "ignoring malformed enrollment answer"),
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
                )) => {
                    return Err(Attempt::Refused(
                        "the broker refused the enrollment token (unknown, expired, used up, not for this device, or the device is enrolled and not revoked)".into(),
                    ))
                }
                Err(e) => return Err(Attempt::Retry(e.to_string())),
            }
        }
    };
    let out = match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Attempt::Retry("no answer in time".into())),
    };
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out; the result is already decided.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_round_trips_with_tight_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = DeviceId::new("pi").expect("id");
        assert!(load(dir.path(), &d).expect("none").is_none());
        save(dir.path(), &d, "pw").expect("saved");
        let c = load(dir.path(), &d).expect("loaded").expect("some");
        assert_eq!(c.password.expose(), "pw");
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CREDENTIAL_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = DeviceId::new("other").expect("id");
        assert!(matches!(
            load(dir.path(), &other),
            Err(CredentialError::OtherDevice { .. })
        ));
        std::fs::write(dir.path().join(CREDENTIAL_FILE), b"{").expect("write");
        assert!(matches!(
            load(dir.path(), &d),
            Err(CredentialError::Corrupt { .. })
        ));
    }
}
