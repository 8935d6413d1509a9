//! The `pubgate` binary: parses flags and environment, sets up logging, runs one node until
//! SIGTERM or SIGINT. `pubgate health` checks a node's readiness for container health checks.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pubgate::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "pubgate", version, about = "WebSocket pub/sub gateway")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if a node's /readyz answers 200, else 1 (for container health checks; no curl
    /// needed). Default URL: the internal address when PUBGATE_INTERNAL_LISTEN is set, else
    /// PUBGATE_LISTEN (https when PUBGATE_TLS_CERT is set; the certificate is not verified);
    /// 0.0.0.0 / :: are reached on loopback.
    Health {
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pubgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Health { url }) = cli.command {
        let url = url.unwrap_or_else(|| pubgate::health::default_url(&cli.config));
        return runtime.block_on(health(&url));
    }
    let mut config = cli.config;
    // An empty PUBGATE_REDIS_URL or PUBGATE_REDIS_CLUSTER_URLS counts as unset, so a compose file
    // can pick the mode by interpolation (docker-compose.yml, profile `cluster`).
    for value in [&mut config.redis_url, &mut config.redis_cluster_urls] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            *value = None;
        }
    }
    init_tracing(config.log_format);
    match runtime.block_on(pubgate::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pubgate failed");
            eprintln!("pubgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One GET with a 2 s budget; prints the outcome for `docker inspect`.
async fn health(url: &str) -> ExitCode {
    match tokio::time::timeout(Duration::from_secs(2), pubgate::health::status(url)).await {
        Ok(Ok(200)) => {
            println!("ready");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            println!("not ready: HTTP {status}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("not ready: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("not ready: no answer within 2s");
            ExitCode::FAILURE
        }
    }
}
