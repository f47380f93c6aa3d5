//! Which servers the CLI's HTTP client trusts: exactly the CA file it is
//! given, never the system's roots.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CaCertError {
    #[error("cannot read CA certificate {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA certificate file {path} is not usable: {source}")]
    Parse {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("CA certificate file {path} holds no PEM certificate")]
    Empty { path: PathBuf },
}

/// An HTTP client builder that trusts the CA certificates in `ca` (PEM)
/// for https:// URLs. No built-in roots are compiled in, so without `ca`
/// an https:// server is not trusted.
pub fn http_client(ca: Option<&Path>) -> Result<reqwest::ClientBuilder, CaCertError> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|source| CaCertError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| CaCertError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        if certs.is_empty() {
            return Err(CaCertError::Empty {
                path: path.to_path_buf(),
            });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}
