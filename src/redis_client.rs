//! How a node reaches Redis: clients built from `PUBGATE_REDIS_URL` or the cluster seeds, with
//! the private CA of `PUBGATE_REDIS_CA_FILE` for `rediss://` and ACL credentials from the URL.
//!
//! Every Redis connection of a node (the command connection, the pub/sub connection, the per-shard
//! pub/sub connections in cluster mode) is made from a client built here, so TLS and ACL settings
//! apply to all of them alike. This module opens no connection itself.

pub mod slots;

use std::path::Path;

use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};

use crate::error::Error;

/// Reads the CA bundle of `PUBGATE_REDIS_CA_FILE`, if set.
pub fn read_ca(path: Option<&Path>) -> Result<Option<Vec<u8>>, Error> {
    path.map(|p| {
        std::fs::read(p)
            .map_err(|e| Error::Redis(format!("PUBGATE_REDIS_CA_FILE {}: {e}", p.display())))
    })
    .transpose()
}

/// A client for `url`; with `ca`, TLS connections trust that CA instead of the system store.
/// `user:password@` in the URL authenticates as that ACL user on every connection.
pub fn open(url: impl IntoConnectionInfo, ca: Option<&[u8]>) -> redis::RedisResult<Client> {
    match ca {
        Some(pem) => Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => Client::open(url),
    }
}

/// The connection settings of `template` (scheme, TLS trust, user, password) aimed at another
/// `host:port`, speaking RESP3 (needed for push messages): how a cluster node named by the slot
/// map is reached with the seed's settings.
pub fn for_node(template: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    let settings = template
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    template.clone().set_addr(addr).set_redis_settings(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_settings_keep_the_seed_credentials_and_scheme() {
        let seed = open("rediss://app:secret@seed:7000/", None).unwrap();
        let info = for_node(seed.get_connection_info(), "10.0.0.2", 7001);
        match info.addr() {
            ConnectionAddr::TcpTls { host, port, .. } => {
                assert_eq!((host.as_str(), *port), ("10.0.0.2", 7001))
            }
            other => panic!("expected TLS, got {other:?}"),
        }
        assert_eq!(info.redis_settings().username(), Some("app"));
        assert_eq!(info.redis_settings().password(), Some("secret"));
        let plain = open("redis://seed:7000/", None).unwrap();
        let info = for_node(plain.get_connection_info(), "h", 1);
        assert!(matches!(info.addr(), ConnectionAddr::Tcp(h, 1) if h == "h"));
    }
}
