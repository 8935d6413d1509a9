#!/usr/bin/env bash
# Fuzzes one target with its seeds and dictionary and logs libFuzzer's output.
#   bash fuzz/run.sh <client_message|connection_reader> [seconds] [libFuzzer flags...]
# New inputs go to fuzz/corpus/<target>/, crashes to fuzz/artifacts/<target>/, the log to
# fuzz/logs/<target>.log (not committed). Needs nightly and cargo-fuzz (docs/fuzzing.md).
# fuzz/Cargo.toml builds pubgate with its `fuzzing` feature (the entry points in src/fuzzing.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?target}
secs=${2:-1800}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "fuzz/corpus/$target" fuzz/logs
cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
  "-dict=fuzz/dict/$target.dict" "-max_total_time=$secs" -rss_limit_mb=2048 -timeout=20 "$@" \
  2>&1 | tee "fuzz/logs/$target.log"
