//! The listeners, the accept loops and the graceful shutdown of one node.
//!
//! One client listener (plain or TLS) and, with `PUBGATE_INTERNAL_LISTEN`, one internal listener
//! for metrics and the server API. The internal one is always plain HTTP (**Decision**: it is
//! meant for a private network or a pod's own address; TLS there is the network's job) and
//! stops with the client one: it answers health and metrics through the drain delay, then both
//! stop accepting.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::Error;
use crate::http;
use crate::node::Node;
use crate::tls;

/// Connections the kernel may queue before `accept`.
const LISTEN_BACKLOG: u32 = 4096;
/// Time a plain HTTP connection gets to finish its request once the node stops.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A bound, not yet running node.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// `PUBGATE_INTERNAL_LISTEN`, bound.
    internal: Option<(TcpListener, SocketAddr)>,
    node: Arc<Node>,
    config: Config,
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// Validates the configuration, binds the listen address and builds the node.
    ///
    /// With `listen` on port 0 the OS picks a free port: read it with [`Server::local_addr`].
    pub async fn bind(config: Config) -> Result<Server, Error> {
        config.validate()?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let bind_error = |source| Error::Bind {
            addr: config.listen,
            source,
        };
        let listener = listen(config.listen).map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let internal = match config.internal_listen {
            Some(addr) => {
                let bind_error = |source| Error::Bind { addr, source };
                let listener = listen(addr).map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                Some((listener, bound))
            }
            None => None,
        };
        let node = Node::start(&config, config.resolved_node_id()).await?;
        Ok(Server {
            listener,
            local_addr,
            internal,
            node,
            config,
            tls,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The internal address actually bound (`PUBGATE_INTERNAL_LISTEN`), if one is set.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().map(|(_, addr)| *addr)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        self.node.id()
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` 503 and upgrades refused at once,
    /// clients served for the drain delay, then closed with 1001; returns within the shutdown
    /// timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let Server {
            listener,
            local_addr,
            internal,
            node,
            config,
            tls,
        } = self;
        tracing::info!(
            addr = %local_addr,
            node = %node.id(),
            broker = if config.redis_cluster_urls.is_some() {
                "redis-cluster"
            } else if config.redis_url.is_some() {
                "redis"
            } else {
                "memory"
            },
            auth = %node.auth().mode(),
            tls = tls.is_some(),
            internal = ?internal.as_ref().map(|(_, addr)| *addr),
            "listening on {local_addr}"
        );
        if config.jwt_secret.as_ref().is_some_and(|s| s.len() < 32) {
            tracing::warn!(
                "PUBGATE_JWT_SECRET is shorter than 32 bytes: HS256 secrets that short can be \
                 brute-forced from one token"
            );
        }
        if node.auth().verifier().is_none() {
            tracing::warn!(
                "no PUBGATE_JWT_SECRET, PUBGATE_JWT_PUBLIC_KEY_FILE or PUBGATE_JWT_JWKS_FILE: \
                 connections are anonymous and every channel is open to everyone"
            );
        }
        // Registered before serving, so a SIGHUP right after start-up is not lost (nor fatal).
        let _reload_keys = match node.auth().verifier().filter(|v| v.is_key_set()) {
            Some(_) => reload_keys_on_sighup(node.clone()).map(AbortOnDrop),
            None => None,
        };
        let sessions = TaskTracker::new();
        let http_stop = CancellationToken::new();
        let (client_surface, internal_accept) = match internal {
            Some((listener, _)) => {
                let accept = accept_loop(
                    listener,
                    node.clone(),
                    sessions.clone(),
                    http_stop.clone(),
                    None,
                    http::Surface::Internal,
                );
                // Stops accepting when the node stops serving HTTP, like the client listener.
                let stop = http_stop.clone();
                let task = tokio::spawn(async move {
                    tokio::select! {
                        _ = accept => {}
                        _ = stop.cancelled() => {}
                    }
                });
                (http::Surface::Client, Some(task))
            }
            None => (http::Surface::All, None),
        };
        // Aborted when `run` returns, however it returns.
        let _internal_accept = internal_accept.map(AbortOnDrop);
        let accept = accept_loop(
            listener,
            node.clone(),
            sessions.clone(),
            http_stop.clone(),
            tls,
            client_surface,
        );
        tokio::pin!(accept);

        tokio::select! {
            _ = shutdown => {}
            _ = &mut accept => {}
        }
        let deadline = Instant::now() + config.shutdown_timeout;
        node.drain().start_draining();
        tracing::info!(
            drain_delay_ms = config.drain_delay.as_millis() as u64,
            connections = node.metrics().connections.get(),
            "draining: readiness off, new upgrades refused"
        );
        // Health checks and metrics keep being answered while the load balancer notices.
        tokio::select! {
            _ = tokio::time::sleep(config.drain_delay) => {}
            _ = &mut accept => {}
        }
        // This node's members leave presence in one batch, alongside the closing connections,
        // within half of what is left of the shutdown budget.
        let release = node.release_presence(deadline.saturating_duration_since(Instant::now()) / 2);
        node.drain().close_clients();
        http_stop.cancel();
        sessions.close();
        let (_, waited) = tokio::join!(release, tokio::time::timeout_at(deadline, sessions.wait()));
        if waited.is_err() {
            tracing::warn!(
                open = sessions.len(),
                "shutdown timeout reached with connections still open; dropping them"
            );
        }
        let _ = tokio::time::timeout_at(deadline, node.shutdown()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Binds with a deep accept queue: `TcpListener::bind` listens with a backlog of 128, which a
/// burst of reconnects (a node restart behind a load balancer) overflows into 1 s SYN
/// retransmissions. The kernel caps the value at `net.core.somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// With `PUBGATE_JWT_JWKS_FILE`: re-reads the key set on every SIGHUP, so keys rotate without a
/// restart. A file that cannot be read or used keeps the previous keys and logs an error.
fn reload_keys_on_sighup(node: Arc<Node>) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: JWKS reload disabled");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let Some(verifier) = node.auth().verifier() else {
                    return;
                };
                match verifier.reload() {
                    Ok(keys) => tracing::info!(keys, "SIGHUP: JWKS reloaded"),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: JWKS reload failed; the previous keys stay in force"
                    ),
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = node;
        None
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections until `http_stop`, serving each with hyper on its own task.
async fn accept_loop(
    listener: TcpListener,
    node: Arc<Node>,
    sessions: TaskTracker,
    http_stop: CancellationToken,
    tls: Option<TlsAcceptor>,
    surface: http::Surface,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) => {
                // Typically out of file descriptors: wait for some to be released.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
        let node = node.clone();
        let sessions = sessions.clone();
        let http_stop = http_stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_http(stream, peer, node, sessions, http_stop, surface).await;
            };
            let handshake =
                tokio::time::timeout(node.limits().handshake_timeout, tls.accept(stream));
            let stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(error = %e, "tls handshake failed"),
                    Err(_) => return tracing::debug!("tls handshake timed out"),
                },
                _ = http_stop.cancelled() => return,
            };
            serve_http(stream, peer, node, sessions, http_stop, surface).await
        });
    }
}

/// Turns on TCP keepalive: a peer that vanished without a FIN or RST (a dropped route, a powered
/// off device) is found by the kernel after about 30 s + 3 x 10 s of silence in both directions,
/// even where no WebSocket ping is due (the HTTP request phase, a connection closing).
fn keepalive(stream: &tokio::net::TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    #[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
    let params = params.with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "cannot enable tcp keepalive");
    }
}

/// Serves HTTP/1.1 (with upgrades) on one accepted connection, plain or TLS.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    node: Arc<Node>,
    sessions: TaskTracker,
    http_stop: CancellationToken,
    surface: http::Surface,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = node.limits().handshake_timeout;
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        // For the one log line of a refused upgrade.
        req.extensions_mut().insert(http::Peer(peer));
        http::handle(req, node.clone(), sessions.clone(), surface)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection error");
            }
        }
        _ = http_stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HTTP_CLOSE_GRACE, conn).await;
        }
    }
}
