//! `pubgate-bench`: a load generator for pubgate with a bare-writer baseline built in.
//!
//! `pubgate-bench <fanout|channels|idle|churn> [options]` spawns (or targets with `--url`) the
//! gateway, opens the connections from worker processes it re-executes itself as (each under the
//! per-process fd limit, bound to several 127.0.0.x source addresses), publishes stamped messages
//! at a set rate, and reports deliveries/s, publish->deliver latency percentiles, connect rate,
//! errors, and the server's CPU, RSS and write syscalls, as a table and as JSON (`--json`).
//! `--target pubgate,baseline,nchan` (or `all`; `both` is the first two) measures the bare writer
//! and Nchan in the same run and gives every figure as a ratio to the bare writer.

mod baseline;
mod cli;
mod client;
mod http_publish;
mod ipc;
mod nchan;
mod pool;
mod procstat;
mod publisher;
mod scenarios;
mod spawn;
mod stats;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, Scenario};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (scenario, args) = match cli.command {
        Command::Worker => return worker::main(),
        Command::BareServer(args) => return baseline::main(args),
        Command::Fanout(a) => (Scenario::Fanout, a),
        Command::Channels(a) => (Scenario::Channels, a),
        Command::Idle(a) => (Scenario::Idle, a),
        Command::Churn(a) => (Scenario::Churn, a),
    };
    let plan = match scenarios::Plan::new(scenario, args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pubgate-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let json = plan.args.json.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = match runtime.block_on(scenarios::run(plan)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pubgate-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("report serializes");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("pubgate-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
