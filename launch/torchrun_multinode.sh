#!/usr/bin/env bash
# Run on every node: NNODES nodes x NPROC ranks, rendezvous at MASTER_ADDR:MASTER_PORT.
# Usage: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash torchrun_multinode.sh CHECKPOINT --tp 8
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC="${NPROC:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m distload "$@" --json "report-node${NODE_RANK}.json"
