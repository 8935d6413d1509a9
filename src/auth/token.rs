//! Token verification: one key, one pinned algorithm, a short leeway.
//!
//! The algorithm comes from the configured key (HS256 for a secret, RS256 for an RSA public key,
//! ES256 for a P-256 one), never from the token's header, so a token signed with another
//! algorithm (`none` included) is refused. Errors carry the short reason the client sees in the
//! body of its 401; nothing here logs.

use std::path::Path;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ConfigError;
use crate::presence::{Info, MAX_INFO_BYTES};

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
            TokenError::Invalid => "invalid token".into(),
        }
    }
}

/// Checks tokens against the node's key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for an HS256 secret.
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// A verifier for a PEM public key file: RS256 for RSA, ES256 for P-256; anything else is a
    /// configuration error naming `PUBGATE_JWT_PUBLIC_KEY_FILE`.
    pub fn from_public_key_file(path: &Path) -> Result<Verifier, ConfigError> {
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
        Ok(Verifier::new(key, algorithm))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Verifier {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // pubgate has no audience of its own; a token's `aud` is the issuer's business.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key,
            validation,
            algorithm,
        }
    }

    /// The pinned algorithm, for the start-up log.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Verifies a token: signature with the pinned algorithm, `exp` and `nbf` with the leeway,
    /// `sub` and `exp` present.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        // The header's `alg` is read only to give a precise reason; it never selects anything.
        match header_alg(token) {
            None => return Err(TokenError::Malformed),
            Some(alg) if alg != algorithm_name(self.algorithm) => {
                return Err(TokenError::WrongAlgorithm)
            }
            Some(_) => {}
        }
        let data = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|e| classify(e.kind()))?;
        data.claims.typed()
    }
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
        let rsa = Verifier::from_public_key_file(&fixture("rsa_public.pem")).unwrap();
        assert_eq!(rsa.algorithm(), Algorithm::RS256);
        let ec = Verifier::from_public_key_file(&fixture("ec_public.pem")).unwrap();
        assert_eq!(ec.algorithm(), Algorithm::ES256);
        // The same RSA key as PKCS#1 (`BEGIN RSA PUBLIC KEY`) verifies the same tokens.
        let pkcs1 = Verifier::from_public_key_file(&fixture("rsa_public_pkcs1.pem")).unwrap();
        assert_eq!(pkcs1.algorithm(), Algorithm::RS256);
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
            let err = Verifier::from_public_key_file(&fixture(file))
                .unwrap_err()
                .to_string();
            assert!(err.contains("PUBGATE_JWT_PUBLIC_KEY_FILE"), "{err}");
            assert!(err.contains(needle), "{file}: {err}");
        }
        let garbage =
            std::env::temp_dir().join(format!("pubgate-garbage-{}.pem", std::process::id()));
        std::fs::write(&garbage, "hello").unwrap();
        let err = Verifier::from_public_key_file(&garbage)
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&garbage).unwrap();
        assert!(err.contains("BEGIN PUBLIC KEY"), "{err}");
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
