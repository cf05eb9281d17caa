# Sourced by the other scripts: makes .venv (once) with CPU torch 2.13.0 installed first,
# then distload with its test and ray extras. GPU users install distload into their own CUDA torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! .venv/bin/python -c "import distload, torch, tqdm, transformers, pytest, hypothesis, compressed_tensors, accelerate, ray" >/dev/null 2>&1; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test,ray]'
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
