//! Token verification: one key or a JWKS key set, each key with its pinned algorithm, a short
//! leeway, and the optional `aud` / `iss` the node requires.
//!
//! The algorithm comes from the configured key (HS256 for a secret, RS256 for an RSA public key,
//! ES256 for a P-256 one), never from the token's header, so a token signed with another
//! algorithm (`none` included) is refused. With a JWKS file the token's `kid` picks the key; the
//! set sits behind an `RwLock<Arc<..>>` that a verification holds only to clone the `Arc`, and
//! [`Verifier::reload`] swaps in a re-read file (SIGHUP) without stopping anyone. Errors carry the
//! short reason the client sees in the body of its 401; nothing here logs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ConfigError;
use crate::wire::member::{Info, MAX_INFO_BYTES};

/// Clock skew tolerated on `exp` and `nbf` at the upgrade and on refresh (contract: at most 5 s).
pub const LEEWAY_SECS: u64 = 5;

/// The claims pubgate reads; other claims are ignored.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Channel patterns the user may subscribe to (absent = none).
    pub subscribe: Vec<String>,
    /// Channel patterns the user may publish to (absent = none).
    pub publish: Vec<String>,
    /// Who the user is to the others (`info`: a JSON object of at most 1 KiB, shown in presence).
    pub info: Option<Info>,
}

/// The claims as jsonwebtoken hands them over. It deserialises the claims before it checks the
/// required ones, so everything is loose here (a missing `sub` must read as missing, not as a
/// JSON error); the types are checked after validation.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Value,
    #[serde(default)]
    exp: Value,
    #[serde(default)]
    subscribe: Value,
    #[serde(default)]
    publish: Value,
    #[serde(default)]
    info: Value,
}

impl RawClaims {
    fn typed(self) -> Result<Claims, TokenError> {
        let invalid = |name: &str| TokenError::InvalidClaim(name.into());
        let patterns = |value: Value, name: &str| match value {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(invalid(name)),
                })
                .collect(),
            _ => Err(invalid(name)),
        };
        let sub = match self.sub {
            Value::String(s) if !s.is_empty() => s,
            _ => return Err(invalid("sub")),
        };
        let exp = self.exp.as_u64().ok_or_else(|| invalid("exp"))?;
        Ok(Claims {
            sub,
            exp,
            subscribe: patterns(self.subscribe, "subscribe")?,
            publish: patterns(self.publish, "publish")?,
            info: info(self.info)?,
        })
    }
}

/// The `info` claim: absent (or `null`), or a JSON object whose compact encoding fits
/// [`MAX_INFO_BYTES`].
fn info(value: Value) -> Result<Option<Info>, TokenError> {
    match value {
        Value::Null => Ok(None),
        Value::Object(_) => {
            let json = value.to_string();
            if json.len() > MAX_INFO_BYTES {
                return Err(TokenError::InfoTooLarge);
            }
            Info::from_json(json)
                .map(Some)
                .map_err(|_| TokenError::InfoNotObject)
        }
        _ => Err(TokenError::InfoNotObject),
    }
}

/// Why a token was refused; [`TokenError::reason`] is the client-facing text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    Malformed,
    WrongAlgorithm,
    BadSignature,
    Expired,
    NotYetValid,
    MissingClaim(String),
    InvalidClaim(String),
    /// `info` is not a JSON object.
    InfoNotObject,
    /// `info` encodes to more than [`MAX_INFO_BYTES`].
    InfoTooLarge,
    /// A JWKS is configured and the token's header names no `kid`.
    NoKeyId,
    /// A JWKS is configured and holds no key with the token's `kid`.
    UnknownKeyId,
    WrongAudience,
    WrongIssuer,
    Invalid,
}

impl TokenError {
    /// A short plain-text reason for the 401 body or the `forbidden` message.
    pub fn reason(&self) -> String {
        match self {
            TokenError::Missing => "missing token".into(),
            TokenError::Malformed => "malformed token".into(),
            TokenError::WrongAlgorithm => "token algorithm not accepted".into(),
            TokenError::BadSignature => "invalid token signature".into(),
            TokenError::Expired => "token expired".into(),
            TokenError::NotYetValid => "token not yet valid".into(),
            TokenError::MissingClaim(c) => format!("token has no `{c}` claim"),
            TokenError::InvalidClaim(c) => format!("token claim `{c}` is invalid"),
            TokenError::InfoNotObject => "token claim `info` must be a JSON object".into(),
            TokenError::InfoTooLarge => {
                format!("token claim `info` is larger than {MAX_INFO_BYTES} bytes")
            }
            TokenError::NoKeyId => "token has no `kid`".into(),
            TokenError::UnknownKeyId => "unknown token key id".into(),
            TokenError::WrongAudience => "token audience not accepted".into(),
            TokenError::WrongIssuer => "token issuer not accepted".into(),
            TokenError::Invalid => "invalid token".into(),
        }
    }
}

/// What a token must carry besides a good signature: `aud` and `iss` when configured.
#[derive(Debug, Clone, Default)]
pub struct Required {
    /// `PUBGATE_JWT_AUDIENCE`.
    pub audience: Option<String>,
    /// `PUBGATE_JWT_ISSUER`.
    pub issuer: Option<String>,
}

/// One key with the algorithm pinned to it and the validation rules for that algorithm.
struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

impl Key {
    fn new(key: DecodingKey, algorithm: Algorithm, required: &Required) -> Key {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut claims = vec!["exp", "sub"];
        match &required.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                claims.push("aud");
            }
            // Without a configured audience a token's `aud` is the issuer's business.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &required.issuer {
            validation.set_issuer(&[iss]);
            claims.push("iss");
        }
        validation.set_required_spec_claims(&claims);
        Key {
            key,
            algorithm,
            validation,
        }
    }
}

/// A JWKS file's keys by `kid`.
struct KeySet {
    keys: HashMap<String, Key>,
}

enum Keys {
    Single(Key),
    /// `PUBGATE_JWT_JWKS_FILE`: the file is kept to be re-read on SIGHUP.
    Set {
        path: PathBuf,
        required: Required,
        /// Swapped whole by [`Verifier::reload`]; a verification holds the read lock only to
        /// clone the `Arc` (no lock across the signature check).
        current: RwLock<Arc<KeySet>>,
    },
}

/// Checks tokens against the node's key or key set.
pub struct Verifier {
    keys: Keys,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

const JWKS_VAR: &str = "PUBGATE_JWT_JWKS_FILE";

impl Verifier {
    /// A verifier for an HS256 secret.
    pub fn hs256(secret: &[u8], required: &Required) -> Verifier {
        Verifier::single(DecodingKey::from_secret(secret), Algorithm::HS256, required)
    }

    /// A verifier for a PEM public key file: RS256 for RSA, ES256 for P-256; anything else is a
    /// configuration error naming `PUBGATE_JWT_PUBLIC_KEY_FILE`.
    pub fn from_public_key_file(path: &Path, required: &Required) -> Result<Verifier, ConfigError> {
        const VAR: &str = "PUBGATE_JWT_PUBLIC_KEY_FILE";
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::invalid(VAR, format!("cannot read {}: {e}", path.display()))
        })?;
        let invalid = |why: String| ConfigError::invalid(VAR, format!("{}: {why}", path.display()));
        let algorithm = key_algorithm(&pem).map_err(|why| invalid(why.into()))?;
        let key = match algorithm {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
            _ => DecodingKey::from_ec_pem(&pem),
        }
        .map_err(|e| invalid(format!("not a usable public key ({e})")))?;
        Ok(Verifier::single(key, algorithm, required))
    }

    /// A verifier for a JWKS file (see [`read_jwks`] for what a usable file holds).
    pub fn from_jwks_file(path: &Path, required: &Required) -> Result<Verifier, ConfigError> {
        let set = read_jwks(path, required)?;
        Ok(Verifier {
            keys: Keys::Set {
                path: path.to_owned(),
                required: required.clone(),
                current: RwLock::new(Arc::new(set)),
            },
        })
    }

    fn single(key: DecodingKey, algorithm: Algorithm, required: &Required) -> Verifier {
        Verifier {
            keys: Keys::Single(Key::new(key, algorithm, required)),
        }
    }

    /// Re-reads the JWKS file and swaps the key set in; returns the number of keys. On an error
    /// the previous keys stay in force. A verifier of a single key has nothing to reload: `Ok(1)`.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let Keys::Set {
            path,
            required,
            current,
        } = &self.keys
        else {
            return Ok(1);
        };
        let set = read_jwks(path, required)?;
        let count = set.keys.len();
        *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        Ok(count)
    }

    /// Whether keys come from a JWKS file (and [`Verifier::reload`] does something).
    pub fn is_key_set(&self) -> bool {
        matches!(self.keys, Keys::Set { .. })
    }

    /// The pinned algorithm of a single key; `None` for a key set (each key has its own).
    #[cfg(test)]
    pub fn algorithm(&self) -> Option<Algorithm> {
        match &self.keys {
            Keys::Single(key) => Some(key.algorithm),
            Keys::Set { .. } => None,
        }
    }

    /// A short description for the start-up log: `HS256`, `RS256`, `ES256` or `JWKS (n keys)`.
    pub fn mode(&self) -> String {
        match &self.keys {
            Keys::Single(key) => format!("{:?}", key.algorithm),
            Keys::Set { .. } => format!(
                "JWKS ({} keys)",
                self.current_set().map_or(0, |s| s.keys.len())
            ),
        }
    }

    fn current_set(&self) -> Option<Arc<KeySet>> {
        match &self.keys {
            Keys::Set { current, .. } => {
                Some(current.read().unwrap_or_else(|e| e.into_inner()).clone())
            }
            Keys::Single(_) => None,
        }
    }

    /// Verifies a token: the key (by `kid` with a key set), the signature with that key's pinned
    /// algorithm, `exp` and `nbf` with the leeway, `sub` and `exp` present, and `aud` / `iss`
    /// when the node requires them.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        // The header's `alg` is read only to give a precise reason; it never selects anything.
        let Some(alg) = header_alg(token) else {
            return Err(TokenError::Malformed);
        };
        let set;
        let key = match &self.keys {
            Keys::Single(key) => key,
            Keys::Set { .. } => {
                let kid = jsonwebtoken::decode_header(token)
                    .map_err(|_| TokenError::Malformed)?
                    .kid
                    .ok_or(TokenError::NoKeyId)?;
                set = self.current_set().expect("a key set");
                set.keys.get(&kid).ok_or(TokenError::UnknownKeyId)?
            }
        };
        if alg != algorithm_name(key.algorithm) {
            return Err(TokenError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &key.validation)
            .map_err(|e| classify(e.kind()))?;
        data.claims.typed()
    }
}

/// Reads a JWKS file: a JSON `{"keys":[...]}` of RSA (RS256) or P-256 (ES256) public keys, each
/// with a `kid` unique in the file; a key's `alg`, when given, must be its type's. Keys marked
/// `"use":"enc"` are skipped (they are not for signatures). Anything else is an error naming
/// `PUBGATE_JWT_JWKS_FILE`, so a typo never silently drops a key; at least one key must remain.
fn read_jwks(path: &Path, required: &Required) -> Result<KeySet, ConfigError> {
    let invalid =
        |why: String| ConfigError::invalid(JWKS_VAR, format!("{}: {why}", path.display()));
    let text = std::fs::read(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("not a JWKS ({e})")))?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let kid = match jwk.common.key_id.as_deref() {
            Some(kid) if !kid.is_empty() => kid,
            _ => return Err(invalid(format!("key #{i} has no `kid`"))),
        };
        let (algorithm, named) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                (Algorithm::ES256, KeyAlgorithm::ES256)
            }
            _ => {
                return Err(invalid(format!(
                    "key `{kid}`: unsupported key type (use RSA for RS256 or EC P-256 for ES256)"
                )))
            }
        };
        if jwk.common.key_algorithm.is_some_and(|a| a != named) {
            return Err(invalid(format!(
                "key `{kid}`: `alg` must be {named:?} for this key type"
            )));
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| invalid(format!("key `{kid}` is not usable ({e})")))?;
        if keys
            .insert(kid.to_owned(), Key::new(key, algorithm, required))
            .is_some()
        {
            return Err(invalid(format!("key id `{kid}` appears twice")));
        }
    }
    if keys.is_empty() {
        return Err(invalid("holds no signature key".into()));
    }
    Ok(KeySet { keys })
}

fn classify(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed
        }
        // The claims are not a JSON object.
        ErrorKind::Json(_) => TokenError::Malformed,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => TokenError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) => TokenError::InvalidClaim(c.clone()),
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        _ => TokenError::Invalid,
    }
}

fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        _ => "",
    }
}

/// The `alg` of a compact JWS header, if the header is readable.
fn header_alg(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let (head, _) = token.split_once('.')?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Header>(&json).ok().map(|h| h.alg)
}

/// RS256 for an RSA public key, ES256 for a P-256 one, from the PEM's label and key OIDs.
fn key_algorithm(pem: &[u8]) -> Result<Algorithm, &'static str> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM text file")?;
    if text.contains("-----BEGIN RSA PUBLIC KEY-----") {
        return Ok(Algorithm::RS256);
    }
    if text.contains("PRIVATE KEY-----") {
        return Err("holds a private key: give the node the public key only");
    }
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
        .map_err(|_| "no `-----BEGIN PUBLIC KEY-----` block")?;
    // The AlgorithmIdentifier opens the SubjectPublicKeyInfo: look only there.
    let head = &spki.as_ref()[..spki.as_ref().len().min(40)];
    let has = |oid: &[u8]| head.windows(oid.len()).any(|w| w == oid);
    if has(RSA_ENCRYPTION) {
        Ok(Algorithm::RS256)
    } else if has(EC_PUBLIC_KEY) && has(PRIME256V1) {
        Ok(Algorithm::ES256)
    } else if has(EC_PUBLIC_KEY) {
        Err("an EC key on a curve other than P-256 (ES256 needs P-256)")
    } else {
        Err("unsupported key type: use an RSA (RS256) or P-256 (ES256) public key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_an_object_of_at_most_1_kib() {
        assert_eq!(info(Value::Null), Ok(None));
        let small = serde_json::json!({"b": 1, "a": {"x": [true]}});
        assert_eq!(
            info(small).unwrap().unwrap().get(),
            r#"{"a":{"x":[true]},"b":1}"#,
            "compact re-encoding"
        );
        let pad = |n: usize| serde_json::json!({"p": "x".repeat(n - r#"{"p":""}"#.len())});
        assert_eq!(info(pad(1024)).unwrap().unwrap().get().len(), 1024);
        assert_eq!(info(pad(1025)), Err(TokenError::InfoTooLarge));
        for bad in [
            serde_json::json!("x"),
            serde_json::json!([]),
            serde_json::json!(1),
        ] {
            assert_eq!(info(bad), Err(TokenError::InfoNotObject));
        }
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn key_files_pick_their_algorithm() {
        let none = Required::default();
        let rsa = Verifier::from_public_key_file(&fixture("rsa_public.pem"), &none).unwrap();
        assert_eq!(rsa.algorithm(), Some(Algorithm::RS256));
        let ec = Verifier::from_public_key_file(&fixture("ec_public.pem"), &none).unwrap();
        assert_eq!(ec.algorithm(), Some(Algorithm::ES256));
        // The same RSA key as PKCS#1 (`BEGIN RSA PUBLIC KEY`) verifies the same tokens.
        let pkcs1 =
            Verifier::from_public_key_file(&fixture("rsa_public_pkcs1.pem"), &none).unwrap();
        assert_eq!(pkcs1.algorithm(), Some(Algorithm::RS256));
        let private = std::fs::read(fixture("rsa_private.pem")).unwrap();
        let claims = serde_json::json!({"sub": "a", "exp": u64::MAX / 2, "subscribe": ["x"]});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::RS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap(),
        )
        .unwrap();
        for verifier in [&rsa, &pkcs1] {
            let got = verifier.verify(&token).unwrap();
            assert_eq!((got.sub.as_str(), got.subscribe.len()), ("a", 1));
        }
        assert_eq!(ec.verify(&token).unwrap_err(), TokenError::WrongAlgorithm);
    }

    #[test]
    fn bad_key_files_are_config_errors() {
        for (file, needle) in [
            ("ec_p384_public.pem", "P-256"),
            ("rsa_private.pem", "private key"),
            ("does-not-exist.pem", "cannot read"),
        ] {
            let err = Verifier::from_public_key_file(&fixture(file), &Required::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("PUBGATE_JWT_PUBLIC_KEY_FILE"), "{err}");
            assert!(err.contains(needle), "{file}: {err}");
        }
        let garbage =
            std::env::temp_dir().join(format!("pubgate-garbage-{}.pem", std::process::id()));
        std::fs::write(&garbage, "hello").unwrap();
        let err = Verifier::from_public_key_file(&garbage, &Required::default())
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&garbage).unwrap();
        assert!(err.contains("BEGIN PUBLIC KEY"), "{err}");
    }

    fn temp(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "pubgate-{name}-{}-{:x}.json",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn bad_jwks_files_are_config_errors_naming_the_key() {
        let rsa = r#"{"kty":"RSA","n":"sXch","e":"AQAB""#;
        for (text, needle) in [
            ("not json".to_string(), "not a JWKS"),
            (r#"{"keys":[]}"#.into(), "no signature key"),
            (format!(r#"{{"keys":[{rsa}}}]}}"#), "no `kid`"),
            (
                format!(r#"{{"keys":[{rsa},"kid":"a"}},{rsa},"kid":"a"}}]}}"#),
                "twice",
            ),
            (
                format!(r#"{{"keys":[{rsa},"kid":"a","alg":"RS512"}}]}}"#),
                "`alg` must be RS256",
            ),
            (
                r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#.into(),
                "unsupported key type",
            ),
            (
                r#"{"keys":[{"kty":"EC","crv":"P-384","x":"AA","y":"AA","kid":"e"}]}"#.into(),
                "unsupported key type",
            ),
            (
                format!(r#"{{"keys":[{rsa},"kid":"a","use":"enc"}}]}}"#),
                "no signature key",
            ),
        ] {
            let path = temp("jwks-bad", &text);
            let err = Verifier::from_jwks_file(&path, &Required::default())
                .unwrap_err()
                .to_string();
            std::fs::remove_file(&path).unwrap();
            assert!(err.contains("PUBGATE_JWT_JWKS_FILE"), "{err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn a_key_set_picks_the_key_by_kid_and_reloads_keeping_old_keys_on_error() {
        let path = temp(
            "jwks",
            &std::fs::read_to_string(fixture("jwks.json")).unwrap(),
        );
        let verifier = Verifier::from_jwks_file(&path, &Required::default()).unwrap();
        assert_eq!(verifier.mode(), "JWKS (2 keys)");
        let claims = serde_json::json!({"sub": "a", "exp": u64::MAX / 2});
        let sign = |kid: Option<&str>, alg: Algorithm, pem: &str| {
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = kid.map(str::to_owned);
            let pem = std::fs::read(fixture(pem)).unwrap();
            let key = match alg {
                Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
                _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
            };
            jsonwebtoken::encode(&header, &claims, &key.unwrap()).unwrap()
        };
        let rsa1 = sign(Some("rsa-1"), Algorithm::RS256, "rsa_private.pem");
        let ec1 = sign(Some("ec-1"), Algorithm::ES256, "ec_private.pem");
        let rsa2 = sign(Some("rsa-2"), Algorithm::RS256, "rsa_other_private.pem");
        assert_eq!(verifier.verify(&rsa1).unwrap().sub, "a");
        assert_eq!(verifier.verify(&ec1).unwrap().sub, "a");
        assert_eq!(
            verifier.verify(&rsa2).unwrap_err(),
            TokenError::UnknownKeyId
        );
        let no_kid = sign(None, Algorithm::RS256, "rsa_private.pem");
        assert_eq!(verifier.verify(&no_kid).unwrap_err(), TokenError::NoKeyId);
        // The kid of one key with the signature of another, or another key's algorithm: refused.
        let wrong_key = sign(Some("rsa-1"), Algorithm::RS256, "rsa_other_private.pem");
        assert_eq!(
            verifier.verify(&wrong_key).unwrap_err(),
            TokenError::BadSignature
        );
        let wrong_alg = sign(Some("rsa-1"), Algorithm::ES256, "ec_private.pem");
        assert_eq!(
            verifier.verify(&wrong_alg).unwrap_err(),
            TokenError::WrongAlgorithm
        );

        std::fs::write(&path, std::fs::read(fixture("jwks_rotated.json")).unwrap()).unwrap();
        assert_eq!(verifier.reload().unwrap(), 2);
        assert_eq!(verifier.verify(&rsa2).unwrap().sub, "a");
        assert_eq!(verifier.verify(&ec1).unwrap_err(), TokenError::UnknownKeyId);
        std::fs::write(&path, "{\"keys\":").unwrap();
        assert!(verifier.reload().is_err());
        assert_eq!(verifier.verify(&rsa2).unwrap().sub, "a", "old keys kept");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let required = Required {
            audience: Some("pubgate".into()),
            issuer: Some("https://idp.example".into()),
        };
        let verifier = Verifier::hs256(b"k", &required);
        let token = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"k"),
            )
            .unwrap()
        };
        let exp = u64::MAX / 2;
        let iss = "https://idp.example";
        let good = token(serde_json::json!({"sub":"a","exp":exp,"aud":"pubgate","iss":iss}));
        assert!(verifier.verify(&good).is_ok());
        let in_list =
            token(serde_json::json!({"sub":"a","exp":exp,"aud":["x","pubgate"],"iss":iss}));
        assert!(verifier.verify(&in_list).is_ok());
        for (claims, want) in [
            (
                serde_json::json!({"sub":"a","exp":exp,"iss":iss}),
                TokenError::MissingClaim("aud".into()),
            ),
            (
                serde_json::json!({"sub":"a","exp":exp,"aud":"other","iss":iss}),
                TokenError::WrongAudience,
            ),
            (
                serde_json::json!({"sub":"a","exp":exp,"aud":"pubgate"}),
                TokenError::MissingClaim("iss".into()),
            ),
            (
                serde_json::json!({"sub":"a","exp":exp,"aud":"pubgate","iss":"https://evil"}),
                TokenError::WrongIssuer,
            ),
        ] {
            assert_eq!(
                verifier.verify(&token(claims.clone())).unwrap_err(),
                want,
                "{claims}"
            );
        }
        // Without the settings, `aud` and `iss` are not looked at.
        let open = Verifier::hs256(b"k", &Required::default());
        assert!(open
            .verify(&token(
                serde_json::json!({"sub":"a","exp":exp,"aud":"other"})
            ))
            .is_ok());
    }

    #[test]
    fn header_alg_is_read_without_trusting_it() {
        // {"alg":"none","typ":"JWT"}
        assert_eq!(
            header_alg("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.e30.").as_deref(),
            Some("none")
        );
        assert_eq!(header_alg("garbage"), None);
        assert_eq!(header_alg("!!.x.y"), None);
    }
}
