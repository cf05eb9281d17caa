#!/usr/bin/env bash
# GPU load benchmark at world 1 (one GPU): writes the llama8b-7g checkpoint (7.34 GB, 3 files),
# then loads it with distload, engine, load_file, fastsafetensors, instanttensor, floor (pinned)
# and h2d, warm x5 and cold x3, each load in fresh processes (benchmarks/load_bench.py), and
# plots the results. Made for a machine with no network and about 9 minutes: each phase has a
# time budget after which it starts no further run (recorded as skipped), and results are
# written after every run.
#
#   bash benchmarks/gpu_suite.sh                 # results under $OUT if set, else benchmarks/results
#
# Peers are optional: wheels in .whl/ (fastsafetensors, instanttensor for this Python) are
# installed into /tmp/site first, without network; a peer that cannot be imported is reported
# "not run". Environment: PRESET (default llama8b-7g; "tiny" for a smoke test), PYTHON (default python3), DISTLOAD_BENCH_DIR (checkpoint cache,
# default /tmp/distload-bench), WARM_RUNS (5), COLD_RUNS (3), WARM_BUDGET_S (270), COLD_BUDGET_S (215),
# WARM_LOADERS (default below), COLD_LOADERS (default: the warm loaders but h2d; add
# distload_no_readahead for the readahead's A/B).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
PRESET=${PRESET:-llama8b-7g}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
export DISTLOAD_BENCH_DIR=${DISTLOAD_BENCH_DIR:-/tmp/distload-bench}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG="$RESULTS/gpu_suite.log"
{
  date -u +"start %FT%TZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  $PY -m benchmarks.synth_checkpoints --preset "$PRESET"
  LOADERS=${WARM_LOADERS:-distload,engine,load_file,fastsafetensors,instanttensor,floor,h2d}
  $PY benchmarks/load_bench.py --preset "$PRESET" --device cuda --worlds 1 --loaders "$LOADERS" \
    --runs "${WARM_RUNS:-5}" --budget-s "${WARM_BUDGET_S:-270}" --timeout 150 --out "$RESULTS/load_gpu_warm.json" || echo "warm phase failed: $?"
  # h2d reads no file: a cold run of it would measure the same copy again
  $PY benchmarks/load_bench.py --preset "$PRESET" --device cuda --worlds 1 --loaders "${COLD_LOADERS:-${LOADERS%,h2d}}" --cold \
    --runs "${COLD_RUNS:-3}" --budget-s "${COLD_BUDGET_S:-215}" --timeout 150 --out "$RESULTS/load_gpu_cold.json" || echo "cold phase failed: $?"
  if $PY -c "import matplotlib" 2>/dev/null; then
    $PY benchmarks/plot.py "$RESULTS/load_gpu_warm.json" "$RESULTS/load_gpu_cold.json" --outdir "$RESULTS"
  fi
  date -u +"end %FT%TZ"
} 2>&1 | tee "$LOG"
