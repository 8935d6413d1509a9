//! The `Origin` allowlist of upgrades (`PUBGATE_ALLOWED_ORIGINS`).
//!
//! Browsers send `Origin` on every WebSocket upgrade, so the list stops other sites' pages from
//! opening connections with a user's cookies or tokens. Non-browser clients send none and pass.
//! Comparison is exact on `scheme://host[:port]`, with scheme and host case-insensitive.

use crate::error::ConfigError;

/// Allowed origins; an empty list is never built (unset means any origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigins {
    origins: Vec<String>,
}

impl AllowedOrigins {
    /// Parses the comma list; `None` for unset (any origin allowed).
    pub fn parse(list: Option<&str>) -> Result<Option<AllowedOrigins>, ConfigError> {
        let Some(list) = list else { return Ok(None) };
        let mut origins = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((scheme, host)) = entry.split_once("://") else {
                return Err(ConfigError::invalid(
                    "PUBGATE_ALLOWED_ORIGINS",
                    format!("`{entry}` is not scheme://host[:port]"),
                ));
            };
            if scheme.is_empty() || host.is_empty() || host.contains('/') {
                return Err(ConfigError::invalid(
                    "PUBGATE_ALLOWED_ORIGINS",
                    format!("`{entry}` is not scheme://host[:port] (no path, no trailing /)"),
                ));
            }
            origins.push(entry.to_ascii_lowercase());
        }
        if origins.is_empty() {
            return Err(ConfigError::invalid(
                "PUBGATE_ALLOWED_ORIGINS",
                "lists no origin (unset it to allow any origin)",
            ));
        }
        Ok(Some(AllowedOrigins { origins }))
    }

    /// Whether an `Origin` header value is one of the listed origins.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim();
        self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_with_case_insensitive_scheme_and_host() {
        let list = AllowedOrigins::parse(Some(" https://App.example.com , http://localhost:3000"))
            .unwrap()
            .unwrap();
        assert!(list.allows("https://app.example.com"));
        assert!(list.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(list.allows("http://localhost:3000"));
        assert!(!list.allows("http://localhost:3001"));
        assert!(!list.allows("http://localhost"));
        assert!(!list.allows("http://app.example.com"));
        assert!(!list.allows("https://app.example.com.evil.org"));
        assert!(!list.allows("https://evil.org"));
        assert!(!list.allows("null"));
    }

    #[test]
    fn bad_lists_are_config_errors() {
        assert_eq!(AllowedOrigins::parse(None).unwrap(), None);
        for bad in ["example.com", "https://a.com/path", ",", "://x"] {
            let err = AllowedOrigins::parse(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("PUBGATE_ALLOWED_ORIGINS"), "{bad}: {err}");
        }
    }
}
