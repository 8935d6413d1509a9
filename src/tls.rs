//! HTTPS/WSS on the listen address when `PUBGATE_TLS_CERT` and `PUBGATE_TLS_KEY` are set.
//!
//! rustls with the `ring` provider (no C toolchain needed). The handshake runs on the
//! connection's own task under the handshake timeout, so a client that stalls mid-handshake
//! costs one timer and is dropped; it can never hold up the accept loop.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::error::ConfigError;

/// Builds the acceptor from PEM files; a bad file is a configuration error naming its variable.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ConfigError> {
    let read = |var: &'static str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| ConfigError::invalid(var, format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read("PUBGATE_TLS_CERT", cert)?;
    let key_pem = read("PUBGATE_TLS_KEY", key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ConfigError::invalid("PUBGATE_TLS_CERT", format!("{}: {e}", cert.display()))
        })?;
    if chain.is_empty() {
        return Err(ConfigError::invalid(
            "PUBGATE_TLS_CERT",
            format!("{}: no `-----BEGIN CERTIFICATE-----` block", cert.display()),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        ConfigError::invalid(
            "PUBGATE_TLS_KEY",
            format!("{}: no usable PEM private key ({e})", key.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("PUBGATE_TLS_CERT", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            ConfigError::invalid(
                "PUBGATE_TLS_KEY",
                format!("does not match the certificate or is unsupported: {e}"),
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
