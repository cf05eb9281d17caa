#!/usr/bin/env bash
# One torchrun agent of a multi-node distload job: run it on every node (the same command).
#   NNODES=2 RDZV_ENDPOINT=node0:29400 bash launch/multinode.sh CHECKPOINT --tp 16 --json 'report-{rank}.json'
# NNODES nodes x NPROC_PER_NODE ranks (default auto: one per visible GPU) meet at RDZV_ENDPOINT
# (HOST:PORT of a node that all can reach; torch's c10d rendezvous: the agent on HOST serves it).
# The rendezvous, not the order of starting, numbers the nodes; node ranks are not needed.
# Exits with its own node's distload code: 0 complete, 3 incomplete, 1 failure, 2 usage.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (HOST:PORT)}"
NPROC_PER_NODE="${NPROC_PER_NODE:-auto}"
RDZV_ID="${RDZV_ID:-distload}"   # the same on every node of one job; another job needs another id
exec "${PYTHON:-python}" -m distload.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" "$@"
