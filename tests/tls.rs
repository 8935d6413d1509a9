//! HTTPS/WSS on the listen address with a self-signed certificate generated in the test: a WSS
//! session, `/healthz` and `/metrics` over TLS, plain HTTP and a stalled handshake refused, and
//! bad certificate files stopping the node at start.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pubgate::{Config, Server};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::Connector;

use common::{rand_u32, raw, start_node, test_config, Client, WAIT};

/// A self-signed certificate for 127.0.0.1 and localhost, written to temporary PEM files.
struct SelfSigned {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl SelfSigned {
    fn new() -> SelfSigned {
        let generated =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .unwrap();
        let dir = std::env::temp_dir().join(format!("pubgate-tls-{:08x}", rand_u32()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        SelfSigned {
            dir,
            cert,
            key,
            der: generated.cert.der().to_vec(),
        }
    }

    fn config(&self) -> Config {
        Config {
            tls_cert: Some(self.cert.clone()),
            tls_key: Some(self.key.clone()),
            ..test_config()
        }
    }

    /// A client configuration that trusts only this certificate.
    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone().into()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTPS GET; returns the raw response text.
async fn https_get(cert: &SelfSigned, addr: std::net::SocketAddr, path: &str) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio::time::timeout(WAIT, TlsConnector::from(cert.client()).connect(name, tcp))
        .await
        .expect("handshake within the wait")
        .expect("handshake succeeds");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // A server may end TLS without close_notify; what was read until then is the response.
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn wss_and_https_are_served_with_the_configured_certificate() {
    let cert = SelfSigned::new();
    let node = start_node(cert.config()).await;
    let url = format!("wss://127.0.0.1:{}/ws", node.addr.port());
    let connect = |url: String| {
        let connector = Connector::Rustls(cert.client());
        async move {
            let (ws, _) = tokio::time::timeout(
                WAIT,
                tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)),
            )
            .await
            .expect("connect within the wait")
            .expect("wss upgrade succeeds");
            Client::welcomed(ws).await
        }
    };
    let mut sub = connect(url.clone()).await;
    let mut publisher = connect(url).await;
    sub.subscribe("secure").await;
    publisher.publish("secure", json!({"over":"tls"})).await;
    assert_eq!(
        sub.recv().await,
        json!({"type":"message","channel":"secure","data":{"over":"tls"}})
    );

    let health = https_get(&cert, node.addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok\n"), "{health}");
    let metrics = https_get(&cert, node.addr, "/metrics").await;
    assert!(metrics.contains("\npubgate_connections 2\n"), "{metrics}");
    assert!(https_get(&cert, node.addr, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_over_tls_are_served() {
    let cert = SelfSigned::new();
    let node = start_node(cert.config()).await;
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio::time::timeout(WAIT, TlsConnector::from(cert.client()).connect(name, tcp))
        .await
        .expect("handshake within the wait")
        .expect("handshake succeeds");
    // Requests in the upgrade request's write: the server reads them with the request.
    let mut request = raw::upgrade_request(node.addr).into_bytes();
    request.extend(raw::masked(
        true,
        raw::OP_TEXT,
        br#"{"type":"ping","id":"early"}"#,
    ));
    let padded = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(20_000));
    request.extend(raw::masked(true, raw::OP_TEXT, padded.as_bytes()));
    tls.write_all(&request).await.unwrap();
    // Server frames are unmasked: the replies appear in the stream as they are.
    let mut seen = Vec::new();
    let want_last = format!(r#"{{"type":"pong","id":"{}"}}"#, "x".repeat(20_000));
    let read_all = async {
        while !contains(&seen, want_last.as_bytes()) {
            let mut chunk = [0u8; 4096];
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "the server closed: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("both replies within the wait");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let early = text
        .find(r#"{"type":"pong","id":"early"}"#)
        .expect("the first reply");
    assert!(early < text.find(&want_last).unwrap(), "in order");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn plain_http_and_stalled_handshakes_are_dropped() {
    let cert = SelfSigned::new();
    let timeout = Duration::from_millis(600);
    let node = start_node(Config {
        handshake_timeout: timeout,
        ..cert.config()
    })
    .await;
    // Plain HTTP on the TLS port: no HTTP answer, the connection ends.
    let mut plain = TcpStream::connect(node.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
        .await
        .expect("the server ends a plain-HTTP connection");
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "served over plain HTTP: {buf:?}"
    );

    // A client that connects and never starts the handshake is dropped at the timeout.
    let mut stalled = TcpStream::connect(node.addr).await.unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut byte))
        .await
        .expect("the stalled handshake is cut off");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let after = started.elapsed();
    assert!(
        after >= timeout.saturating_sub(Duration::from_millis(100)) && after < timeout * 3,
        "dropped after {after:?} with a {timeout:?} timeout"
    );
    // And the node still serves TLS clients.
    assert!(https_get(&cert, node.addr, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn bad_certificate_files_stop_the_node_at_start() {
    let cert = SelfSigned::new();
    let bind_error = |config: Config| async move {
        match Server::bind(config).await {
            Ok(_) => panic!("the node started"),
            Err(e) => e.to_string(),
        }
    };
    let missing = bind_error(Config {
        tls_cert: Some(cert.dir.join("missing.pem")),
        ..cert.config()
    })
    .await;
    assert!(
        missing.contains("PUBGATE_TLS_CERT") && missing.contains("cannot read"),
        "{missing}"
    );
    let garbage = cert.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let bad_key = bind_error(Config {
        tls_key: Some(garbage.clone()),
        ..cert.config()
    })
    .await;
    assert!(bad_key.contains("PUBGATE_TLS_KEY"), "{bad_key}");
    let bad_cert = bind_error(Config {
        tls_cert: Some(garbage),
        ..cert.config()
    })
    .await;
    assert!(bad_cert.contains("PUBGATE_TLS_CERT"), "{bad_cert}");
    // A key that is not the certificate's.
    let other = SelfSigned::new();
    let mismatch = bind_error(Config {
        tls_key: Some(other.key.clone()),
        ..cert.config()
    })
    .await;
    assert!(mismatch.contains("PUBGATE_TLS_KEY"), "{mismatch}");
    let half = bind_error(Config {
        tls_key: None,
        ..cert.config()
    })
    .await;
    assert!(half.contains("PUBGATE_TLS_KEY"), "{half}");
}

/// Runs `pubgate health` (the release binary) with the node's own settings in its environment.
async fn health(envs: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pubgate"));
    cmd.env_clear().arg("health").args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("health answers within the wait")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `pubgate health` reaches a node that serves TLS, with the node's environment only (the
/// container health check's situation), and also through an explicit https URL.
#[tokio::test]
async fn pubgate_health_checks_a_node_serving_tls() {
    let cert = SelfSigned::new();
    let node = start_node(cert.config()).await;
    let envs = [
        ("PUBGATE_LISTEN", format!("0.0.0.0:{}", node.addr.port())),
        ("PUBGATE_TLS_CERT", cert.cert.display().to_string()),
        ("PUBGATE_TLS_KEY", cert.key.display().to_string()),
    ];
    let (ok, out) = health(&envs, &[]).await;
    assert!(ok, "health over TLS failed: {out}");
    assert_eq!(out, "ready\n");
    let url = format!("https://localhost:{}/readyz", node.addr.port());
    let (ok, out) = health(&[], &["--url", &url]).await;
    assert!(ok, "{out}");
    // Plain HTTP against the TLS port is not an answer.
    let url = format!("http://127.0.0.1:{}/readyz", node.addr.port());
    let (ok, out) = health(&[], &["--url", &url]).await;
    assert!(!ok, "{out}");
}

/// With an internal listener, `pubgate health` checks it (plain HTTP) by default.
#[tokio::test]
async fn pubgate_health_prefers_the_internal_listener() {
    let cert = SelfSigned::new();
    let node = start_node(Config {
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..cert.config()
    })
    .await;
    let internal = node.internal.unwrap();
    let envs = [
        ("PUBGATE_LISTEN", format!("127.0.0.1:{}", node.addr.port())),
        ("PUBGATE_INTERNAL_LISTEN", internal.to_string()),
        ("PUBGATE_TLS_CERT", cert.cert.display().to_string()),
        ("PUBGATE_TLS_KEY", cert.key.display().to_string()),
    ];
    let (ok, out) = health(&envs, &[]).await;
    assert!(ok, "{out}");
    drop(node);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out) = health(&envs, &[]).await;
    assert!(!ok, "a stopped node is not healthy: {out}");
}
