//! Managed-Redis settings on one real Redis: `rediss://` with a private CA
//! (`PUBGATE_REDIS_CA_FILE`) and an ACL user limited to exactly the line documented in the README.
//!
//! The test generates a CA and a server certificate (rcgen), starts `redis-server` with TLS only
//! (`--port 0`) and the README's ACL line, and runs two nodes through it: delivery across nodes,
//! presence, and the control channel. A node that does not trust the CA, or uses a wrong password,
//! never becomes ready.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pubgate::Config;
use serde_json::json;

use common::{close_code, http_get, rand_u32, start_node, test_config, Client, WAIT};

const PASSWORD: &str = "acl-test-password-0123";

/// The ACL line of the README, with the test password.
fn readme_acl_line() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("user pubgate on >CHANGE-ME "))
        .expect("the README documents the ACL line");
    line.replace(">CHANGE-ME", &format!(">{PASSWORD}"))
}

struct TlsRedis {
    port: u16,
    dir: PathBuf,
    ca: PathBuf,
    child: Child,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsRedis {
    async fn start() -> TlsRedis {
        let dir = std::env::temp_dir().join(format!(
            "pubgate-redis-tls-{:08x}",
            rand_u32() ^ rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // A private CA and a server certificate it signs.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pubgate test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {d}/server.pem\n\
             tls-key-file {d}/server.key\ntls-ca-cert-file {d}/ca.pem\ntls-auth-clients no\n\
             save \"\"\nappendonly no\ndir {d}\nlogfile {d}/redis.log\n\
             user default off\n{acl}\n",
            d = dir.display(),
            acl = readme_acl_line(),
        );
        std::fs::write(dir.join("redis.conf"), conf).unwrap();
        let child = Command::new("redis-server")
            .arg(dir.join("redis.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let redis = TlsRedis {
            port,
            dir,
            ca,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS did not start: {}",
                std::fs::read_to_string(redis.dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis
    }

    fn url(&self, password: &str) -> String {
        format!("rediss://pubgate:{password}@127.0.0.1:{}/", self.port)
    }
}

fn config(url: String, ca: Option<&Path>) -> Config {
    Config {
        redis_url: Some(url),
        redis_ca_file: ca.map(Path::to_path_buf),
        // The ACL line covers the default prefix only.
        channel_prefix: "pubgate:".into(),
        jwt_secret: Some(common::tokens::SECRET.into()),
        // History on, so the ACL line is exercised by the function library too.
        history_size: 10,
        ..test_config()
    }
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = http_get(addr, "/readyz").await;
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn login(url: &str, user: &str) -> Client {
    let token = common::tokens::hs256(
        &json!({"sub": user, "exp": common::tokens::now() + 300, "subscribe": ["*"], "publish": ["*"]}),
    );
    Client::connect_bearer(url, &token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_the_documented_acl_user() {
    let redis = TlsRedis::start().await;
    let a = start_node(config(redis.url(PASSWORD), Some(&redis.ca))).await;
    let b = start_node(config(redis.url(PASSWORD), Some(&redis.ca))).await;
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;

    let mut alice = login(&a.ws_url(), "alice").await;
    let mut bob = login(&b.ws_url(), "bob").await;
    let reply = alice
        .request(json!({"type":"subscribe","channel":"news","id":"s"}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let reply = bob
        .request(json!({"type":"publish","channel":"news","data":{"n":1},"id":"p"}))
        .await;
    assert_eq!(reply["offset"], 1, "{reply}");
    let msg = alice.recv().await;
    assert_eq!(msg["data"], json!({"n": 1}), "{msg}");
    assert_eq!(msg["offset"], 1, "through the history function: {msg}");
    let reply = bob
        .request(json!({"type":"history","channel":"news","limit":5,"id":"h"}))
        .await;
    assert_eq!(reply["messages"][0]["offset"], 1, "{reply}");
    // Presence scripts run under the ACL user.
    let reply = bob
        .request(json!({"type":"presence","channel":"news","id":"q"}))
        .await;
    assert_eq!(reply["members"][0]["conn_id"], alice.conn_id(), "{reply}");
    let reply = bob
        .request(json!({"type":"subscribe","channel":"news","id":"s"}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    bob.send(json!({"type":"unsubscribe","channel":"news","id":"u"}))
        .await;
    assert_eq!(bob.recv().await["type"], "unsubscribed");

    // The backend publishes on the control channel as the same user.
    let client = pubgate::redis_client::open(
        redis.url(PASSWORD).as_str(),
        Some(&std::fs::read(&redis.ca).unwrap()),
    )
    .unwrap();
    let mut backend = tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
        .await
        .unwrap()
        .unwrap();
    let n: i64 = ::redis::cmd("PUBLISH")
        .arg("pubgate:__control")
        .arg(r#"{"type":"disconnect","user":"alice"}"#)
        .query_async(&mut backend)
        .await
        .unwrap();
    assert_eq!(n, 2, "both nodes listen on the control channel");
    assert_eq!(close_code(&alice.expect_close().await), Some(1008));
    // The ACL really restricts: other keys and dangerous commands are refused.
    let denied = ::redis::cmd("GET")
        .arg("other:key")
        .query_async::<Option<String>>(&mut backend)
        .await
        .unwrap_err();
    assert!(
        denied.to_string().to_uppercase().contains("NOPERM"),
        "{denied}"
    );
    let denied = ::redis::cmd("FLUSHALL")
        .query_async::<()>(&mut backend)
        .await
        .unwrap_err();
    assert!(
        denied.to_string().to_uppercase().contains("NOPERM"),
        "{denied}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_ca_or_wrong_password_never_gets_ready() {
    let redis = TlsRedis::start().await;
    let untrusted = start_node(config(redis.url(PASSWORD), None)).await;
    let wrong_password = start_node(config(redis.url("wrong"), Some(&redis.ca))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (what, node) in [
        ("untrusted CA", &untrusted),
        ("wrong password", &wrong_password),
    ] {
        let (status, body) = http_get(node.addr, "/readyz").await;
        assert_eq!(status, 503, "{what}: {body}");
    }
    // The control node with the right settings is ready at the same time.
    let good = start_node(config(redis.url(PASSWORD), Some(&redis.ca))).await;
    wait_ready(good.addr).await;
}
