//! The client side of `pubgate health`: one GET of a node's `/readyz` over plain HTTP or HTTPS,
//! for container health checks (the image has no curl).
//!
//! **Decision**: over HTTPS the server certificate is not verified. The check runs next to the
//! node (same container or pod), sends nothing secret and only reads a status code; a node's
//! certificate names its public host, never `127.0.0.1`, so verifying would fail every check.
//! The TLS handshake itself still has to succeed, so a node whose TLS is broken is unhealthy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::config::Config;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The URL `pubgate health` checks by default: the internal listener when one is set (plain
/// HTTP, and it serves `/readyz` too), else the client listener, `https` when it serves TLS. An
/// unspecified bind address (`0.0.0.0`, `::`) is reached on loopback.
pub fn default_url(config: &Config) -> String {
    let (addr, scheme) = match config.internal_listen {
        Some(addr) => (addr, "http"),
        None if config.tls_cert.is_some() => (config.listen, "https"),
        None => (config.listen, "http"),
    };
    format!("{scheme}://{}/readyz", reachable(addr))
}

fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// GETs `url` (`http://` or `https://`) and returns the status code.
pub async fn status(url: &str) -> Result<u16, BoxError> {
    let uri: hyper::Uri = url.parse()?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("the url must start with http:// or https://".into()),
    };
    let host = uri.host().ok_or("url has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host, |a| a.as_str());
    if !tls {
        return get(stream, authority, path).await;
    }
    let provider = Arc::new(crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())?;
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await?;
    get(stream, authority, path).await
}

async fn get<I>(io: I, authority: &str, path: &str) -> Result<u16, BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    Ok(response.status().as_u16())
}

/// Accepts any certificate (see the module doc); handshake signatures are still checked, so the
/// peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_follows_the_listeners() {
        let plain = Config::default();
        assert_eq!(default_url(&plain), "http://127.0.0.1:8080/readyz");
        let tls = Config {
            listen: "[::]:8443".parse().unwrap(),
            tls_cert: Some("/c.pem".into()),
            tls_key: Some("/k.pem".into()),
            ..Config::default()
        };
        assert_eq!(default_url(&tls), "https://[::1]:8443/readyz");
        let internal = Config {
            internal_listen: Some("10.0.0.5:9090".parse().unwrap()),
            ..tls
        };
        assert_eq!(default_url(&internal), "http://10.0.0.5:9090/readyz");
    }
}
