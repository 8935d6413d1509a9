//! JWT settings of v1.2 over real sockets: a required `aud` / `iss`, a JWKS file whose keys are
//! chosen by `kid` and re-read on SIGHUP (the release binary as a child process, so the signal
//! goes to a real node), one key source only, and `user:` channels of identity-provider subjects
//! such as `auth0|42`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pubgate::{Config, Server};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use common::raw::{http_exchange, Response, KEY};
use common::tokens::{fixture, hs256, now, SECRET};
use common::{http_get, start_node, test_config, Client, WAIT};

async fn upgrade(addr: SocketAddr, token: &str) -> Response {
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    http_exchange(addr, request.as_bytes(), WAIT).await
}

fn sign(kid: Option<&str>, alg: Algorithm, private_pem: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let pem = std::fs::read(fixture(private_pem)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        _ => EncodingKey::from_ec_pem(&pem),
    };
    encode(&header, claims, &key.unwrap()).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 120, "subscribe": ["*"], "publish": ["*"]})
}

/// A private copy of a JWKS fixture, so a test can rewrite it.
fn jwks_copy(fixture_name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "pubgate-jwks-{}-{:x}.json",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::copy(fixture(fixture_name), &path).unwrap();
    path
}

#[tokio::test]
async fn audience_and_issuer_are_required_when_set() {
    let node = start_node(Config {
        jwt_secret: Some(SECRET.into()),
        jwt_audience: Some("pubgate".into()),
        jwt_issuer: Some("https://idp.example/".into()),
        ..test_config()
    })
    .await;
    let with = |extra: Value| {
        let mut c = claims("alice");
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        hs256(&c)
    };
    let iss = "https://idp.example/";
    let good = with(json!({"aud": "pubgate", "iss": iss}));
    assert_eq!(upgrade(node.addr, &good).await.status, 101);
    let listed = with(json!({"aud": ["web", "pubgate"], "iss": iss}));
    assert_eq!(upgrade(node.addr, &listed).await.status, 101);
    for (extra, body) in [
        (json!({"iss": iss}), "token has no `aud` claim\n"),
        (
            json!({"aud": "web", "iss": iss}),
            "token audience not accepted\n",
        ),
        (json!({"aud": "pubgate"}), "token has no `iss` claim\n"),
        (
            json!({"aud": "pubgate", "iss": "https://evil.example/"}),
            "token issuer not accepted\n",
        ),
    ] {
        let resp = upgrade(node.addr, &with(extra.clone())).await;
        assert_eq!((resp.status, resp.body.as_str()), (401, body), "{extra}");
    }
    // A refresh is held to the same rules.
    let mut alice = Client::connect(&format!("{}?token={good}", node.ws_url())).await;
    let reply = alice
        .request(json!({"type":"refresh","token":with(json!({"aud":"web","iss":iss})),"id":1}))
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
}

#[tokio::test]
async fn a_jwks_key_is_chosen_by_kid() {
    let node = start_node(Config {
        jwt_jwks_file: Some(fixture("jwks.json")),
        ..test_config()
    })
    .await;
    let rsa = sign(
        Some("rsa-1"),
        Algorithm::RS256,
        "rsa_private.pem",
        &claims("a"),
    );
    let ec = sign(
        Some("ec-1"),
        Algorithm::ES256,
        "ec_private.pem",
        &claims("b"),
    );
    let mut client = Client::connect(&format!("{}?token={rsa}", node.ws_url())).await;
    client.subscribe("user:a").await;
    assert_eq!(upgrade(node.addr, &ec).await.status, 101);
    for (token, body) in [
        (
            sign(None, Algorithm::RS256, "rsa_private.pem", &claims("a")),
            "token has no `kid`\n",
        ),
        (
            sign(
                Some("rsa-2"),
                Algorithm::RS256,
                "rsa_other_private.pem",
                &claims("a"),
            ),
            "unknown token key id\n",
        ),
        (
            sign(
                Some("ec-1"),
                Algorithm::RS256,
                "rsa_private.pem",
                &claims("a"),
            ),
            "token algorithm not accepted\n",
        ),
        (
            sign(
                Some("rsa-1"),
                Algorithm::RS256,
                "rsa_other_private.pem",
                &claims("a"),
            ),
            "invalid token signature\n",
        ),
    ] {
        let resp = upgrade(node.addr, &token).await;
        assert_eq!((resp.status, resp.body.as_str()), (401, body));
    }
}

#[tokio::test]
async fn only_one_key_source_may_be_set_and_a_bad_jwks_stops_the_start() {
    let bind_error = |config: Config| async move {
        match Server::bind(config).await {
            Ok(_) => panic!("the node started"),
            Err(e) => e.to_string(),
        }
    };
    let two = bind_error(Config {
        jwt_secret: Some(SECRET.into()),
        jwt_jwks_file: Some(fixture("jwks.json")),
        ..test_config()
    })
    .await;
    assert!(two.contains("PUBGATE_JWT_JWKS_FILE"), "{two}");
    let bad = bind_error(Config {
        jwt_jwks_file: Some(fixture("rsa_public.pem")),
        ..test_config()
    })
    .await;
    assert!(
        bad.contains("PUBGATE_JWT_JWKS_FILE") && bad.contains("not a JWKS"),
        "{bad}"
    );
}

/// `user:<sub>` of a subject with `|` (Auth0 style) is a valid own channel.
#[tokio::test]
async fn identity_provider_subjects_get_their_own_channel() {
    let node = start_node(Config {
        jwt_secret: Some(SECRET.into()),
        ..test_config()
    })
    .await;
    let token = hs256(&json!({"sub": "auth0|42", "exp": now() + 60}));
    let mut user = Client::connect_bearer(&node.ws_url(), &token).await;
    user.subscribe("user:auth0|42").await;
    let backend = hs256(&json!({"sub": "svc", "exp": now() + 60, "publish": ["user:*"]}));
    let mut backend = Client::connect_bearer(&node.ws_url(), &backend).await;
    backend.publish("user:auth0|42", json!("hi")).await;
    let got = user.recv().await;
    assert_eq!(
        got,
        json!({"type":"message","channel":"user:auth0|42","data":"hi"})
    );
    for name in ["a+b=c~d", "x|y"] {
        let reply = backend
            .request(json!({"type":"publish","channel":name,"data":1,"id":2}))
            .await;
        assert_eq!(
            reply["code"], "forbidden",
            "{name}: valid name, no permission: {reply}"
        );
    }
}

/// A node started from the release binary with a JWKS file.
struct Gateway {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Gateway {
    async fn start(jwks: &Path) -> Gateway {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let log = jwks.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pubgate"))
            .env_clear()
            .env("PUBGATE_LISTEN", addr.to_string())
            .env("PUBGATE_JWT_JWKS_FILE", jwks)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start target/release/pubgate");
        let deadline = Instant::now() + WAIT;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/readyz").await.0 == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "node did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Gateway { addr, child, log }
    }

    fn hangup(&self) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until the log has `needle` `n` times.
    async fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.matches(needle).count() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Keys rotate without a restart: SIGHUP re-reads the file; a bad file keeps the old keys and
/// logs an error; the node lives through both.
#[tokio::test]
async fn sighup_rereads_the_jwks_and_a_bad_file_keeps_the_old_keys() {
    let jwks = jwks_copy("jwks.json");
    let mut node = Gateway::start(&jwks).await;
    let old = sign(
        Some("ec-1"),
        Algorithm::ES256,
        "ec_private.pem",
        &claims("a"),
    );
    let new = sign(
        Some("rsa-2"),
        Algorithm::RS256,
        "rsa_other_private.pem",
        &claims("a"),
    );
    assert_eq!(upgrade(node.addr, &old).await.status, 101);
    assert_eq!(upgrade(node.addr, &new).await.status, 401);

    std::fs::copy(fixture("jwks_rotated.json"), &jwks).unwrap();
    node.hangup();
    node.wait_log("SIGHUP: JWKS reloaded", 1).await;
    assert_eq!(upgrade(node.addr, &new).await.status, 101);
    let resp = upgrade(node.addr, &old).await;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (401, "unknown token key id\n")
    );

    std::fs::write(&jwks, "{\"keys\": [").unwrap();
    node.hangup();
    node.wait_log("SIGHUP: JWKS reload failed", 1).await;
    assert_eq!(upgrade(node.addr, &new).await.status, 101, "old keys kept");
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "node still running"
    );

    node.child.kill().await.unwrap();
    let _ = std::fs::remove_file(&jwks);
    let _ = std::fs::remove_file(&node.log);
}
