//! HTTPS: loading the certificate and building the rustls server config.
//!
//! The ring provider is named explicitly so that no process-wide default provider has to be
//! installed (which would race between tests, and between veer and an embedding program).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing or not PEM.
    #[error("certificate {path}: {source}")]
    Cert {
        /// File name.
        path: String,
        /// Parse or I/O error.
        source: rustls_pki_types::pem::Error,
    },
    /// The file holds no certificate.
    #[error("certificate {0}: no CERTIFICATE block found")]
    NoCert(String),
    /// The key file is missing or not a PEM private key.
    #[error("private key {path}: {source}")]
    Key {
        /// File name.
        path: String,
        /// Parse or I/O error.
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Loads a PEM chain and key into a server config offering h2 and http/1.1 via ALPN.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|source| TlsError::Cert { path: cert.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|source| TlsError::Key { path: key.display().to_string(), source })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The acceptor the HTTPS listener hands its connections to, for a PEM chain and key. Built
/// off the hot path, once per configuration generation.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    load_server_config(cert, key).map(TlsAcceptor::from)
}
