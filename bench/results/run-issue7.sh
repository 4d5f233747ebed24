#!/bin/sh
# Reproduces the issue-7 figures into bench/results/. Needs root: both benches create (and delete)
# their own network namespaces and never touch the host's. Takes about 30 minutes on 2 cores.
# Charts need python3 with matplotlib (`pip install matplotlib`); without it the tables are still written.
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p palisade-bench -p palisade-agent
STAMP=${STAMP:-$(date -u +%Y%m%dT%H%MZ)}
target/release/enforce-bench run --agent target/release/palisade-agent \
    --pods 100,1000,10000 --policies-per-pod 0.1 --trials 100 \
    --churn 0,20,100 --churn-trials 30 --churn-seconds 10 --compile-changes 200 \
    --out bench/results --name "enforce-$STAMP"
target/release/datapath-bench run --policies 0,100,1000,10000 \
    --systems none,iptables-model,naive-nft-model,palisade --rounds 12 --slice-ms 500 --iperf-every 3 --iperf-secs 2 \
    --out bench/results --name "datapath-$STAMP"
