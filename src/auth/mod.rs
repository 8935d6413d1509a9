//! Who a connection is and what it may do.
//!
//! [`Auth`] holds the node's key (or none: anonymous mode) and turns an upgrade request into an
//! [`Identity`] before the WebSocket is accepted; [`permissions`] answers the per-request
//! questions; [`expiry`] closes a connection when its token runs out. Nothing here touches the
//! hub or the broker.

pub mod expiry;
pub mod permissions;
pub mod token;

use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;

pub use permissions::Permissions;
pub use token::{Claims, Required, TokenError, Verifier};

use crate::config::Config;
use crate::error::ConfigError;
use crate::wire::member::Info;

/// The authenticated side of one connection.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub`; `None` for anonymous connections.
    pub user: Option<String>,
    /// What the connection may subscribe and publish to.
    pub permissions: Permissions,
    /// The token's `exp` (unix seconds); `None` for anonymous connections.
    pub exp: Option<u64>,
    /// The token's `info`, shown with the connection in presence. Fixed for the connection's
    /// life: a refresh token's `info` is ignored (presence and the joins already sent keep
    /// describing the member the same way).
    pub info: Option<Info>,
    /// When the token was verified: a `__control` disconnect of this user issued after it also
    /// closes a connection that registers later (see `users`).
    pub verified_at: std::time::Instant,
}

impl Identity {
    /// An anonymous connection: no user, every channel open, no expiry.
    pub fn anonymous() -> Identity {
        Identity {
            user: None,
            permissions: Permissions::Open,
            exp: None,
            info: None,
            verified_at: std::time::Instant::now(),
        }
    }

    /// The identity a verified token grants.
    pub fn from_claims(claims: &Claims) -> Identity {
        Identity {
            user: Some(claims.sub.clone()),
            permissions: Permissions::granted(&claims.sub, &claims.subscribe, &claims.publish),
            exp: Some(claims.exp),
            info: claims.info.clone(),
            verified_at: std::time::Instant::now(),
        }
    }
}

/// The node's authentication mode.
#[derive(Debug)]
pub struct Auth {
    /// `None`: anonymous mode.
    verifier: Option<Verifier>,
}

impl Auth {
    /// From `PUBGATE_JWT_SECRET`, `PUBGATE_JWT_PUBLIC_KEY_FILE` or `PUBGATE_JWT_JWKS_FILE`
    /// (validated to be one at most), with the `aud` / `iss` the node requires.
    pub fn from_config(config: &Config) -> Result<Auth, ConfigError> {
        let required = Required {
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
        };
        let verifier = if let Some(secret) = &config.jwt_secret {
            Some(Verifier::hs256(secret.as_bytes(), &required))
        } else if let Some(path) = &config.jwt_public_key_file {
            Some(Verifier::from_public_key_file(path, &required)?)
        } else if let Some(path) = &config.jwt_jwks_file {
            Some(Verifier::from_jwks_file(path, &required)?)
        } else {
            None
        };
        Ok(Auth { verifier })
    }

    /// The verifier, or `None` in anonymous mode.
    pub fn verifier(&self) -> Option<&Verifier> {
        self.verifier.as_ref()
    }

    /// A short name of the mode for the start-up log: `anonymous`, `HS256`, `RS256`, `ES256`,
    /// `JWKS (n keys)`.
    pub fn mode(&self) -> String {
        match &self.verifier {
            None => "anonymous".into(),
            Some(v) => v.mode(),
        }
    }

    /// The identity of an upgrade request, or why it must be refused with 401.
    pub fn authenticate(&self, request: &Parts) -> Result<Identity, TokenError> {
        let Some(verifier) = &self.verifier else {
            return Ok(Identity::anonymous());
        };
        let token = request_token(request).ok_or(TokenError::Missing)?;
        let claims = verifier.verify(token)?;
        Ok(Identity::from_claims(&claims))
    }
}

/// The token of an upgrade: `Authorization: Bearer <jwt>` wins over the `token` query parameter.
pub fn request_token(request: &Parts) -> Option<&str> {
    let bearer = request
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    bearer.or_else(|| {
        request
            .uri
            .query()?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, auth: Option<&str>) -> Parts {
        let mut b = hyper::Request::get(uri);
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_wins_over_query() {
        assert_eq!(request_token(&parts("/ws?token=q", None)), Some("q"));
        assert_eq!(
            request_token(&parts("/ws?a=1&token=q&b=2", Some("Bearer h"))),
            Some("h")
        );
        assert_eq!(request_token(&parts("/ws", Some("bearer  h "))), Some("h"));
        // Another scheme is not a token: the query is used.
        assert_eq!(
            request_token(&parts("/ws?token=q", Some("Basic xyz"))),
            Some("q")
        );
        assert_eq!(request_token(&parts("/ws?tokens=q", None)), None);
        assert_eq!(request_token(&parts("/ws", None)), None);
    }
}
