//! The Autobahn TestSuite's endpoint: a pubgate node whose `/echo` route serves each WebSocket
//! with the gateway's own connection code (same upgrade, frame parsing, reassembly, limits,
//! UTF-8 checks, close handling, writer) in echo mode. Run by `.ci/autobahn.sh`:
//!
//! ```text
//! cargo run --release --features autobahn --example autobahn_echo -- 127.0.0.1:0
//! ```
//!
//! Prints `listening on ws://ADDR/echo` once bound (port 0: the OS picks one), then serves until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;

/// Autobahn's section 9 sends messages of up to 16 MiB; this server only takes up to 64 MiB.
const MAX_MESSAGE_SIZE: usize = 64 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()?;
    let config = pubgate::Config {
        listen,
        max_message_size: MAX_MESSAGE_SIZE,
        // Autobahn sends its cases' messages as fast as it can.
        rate_limit: 0,
        ..pubgate::Config::default()
    };
    let server = pubgate::Server::bind(config).await?;
    println!("listening on ws://{}/echo", server.local_addr());
    server.run(stop()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn stop() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
