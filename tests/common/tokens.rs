//! Tokens minted the way a backend would (jsonwebtoken), plus ones no honest backend mints.
//!
//! RSA and P-256 key pairs are small PEM fixtures under tests/fixtures (generated with openssl;
//! `*_other_*` is a second pair for "signed with the wrong key").

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

pub const SECRET: &str = "test-secret-of-a-decent-length-0123456789";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

pub fn hs256_with(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn hs256(claims: &Value) -> String {
    hs256_with(SECRET, claims)
}

pub fn rs256_with(private_pem: &str, claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&pem(private_pem)).unwrap();
    encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

pub fn es256_with(private_pem: &str, claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&pem(private_pem)).unwrap();
    encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
}

/// An unsigned token (`alg: none`), which must never be accepted.
pub fn alg_none(claims: &Value) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg":"none","typ":"JWT"})),
        b64(claims)
    )
}
