"""transformers' own tensor-parallel loading (``from_pretrained(..., tp_plan="auto")`` under torchrun,
gloo on CPU) of a qwen3_moe checkpoint written by transformers, whose per-expert tensors it fuses
while loading, tracked by ``distload.track``.

transformers writes only fused parameters, so what can be observed per checkpoint tensor without
patching it is what each rank *read*: the job hands ``from_pretrained`` a state dict of recording
slices (``track.read_slices``). With one expert's ``up_proj`` deleted, distload's merged report names
that tensor once, with its owners (every TP rank holds a piece of every expert); transformers
itself, on each rank, names the fused ``experts.gate_up_proj`` (MISSING, then a CONVERSION error
from stacking 7 of 8 experts) and raises. Both are printed side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distload.testing import free_port
from tests.hf_checkpoints import QWEN3_MOE, copy_checkpoint, delete_tensors, write_hf_checkpoint

pytest.importorskip("transformers")

JOB = os.path.join(os.path.dirname(__file__), "transformers_tp_job.py")
SPEC = QWEN3_MOE
UP = "model.layers.2.mlp.experts.5.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-transformers")
    intact = write_hf_checkpoint(str(root / "qwen3_moe"), SPEC)
    deleted = copy_checkpoint(intact, str(root / "no-up"))
    delete_tensors(deleted, [UP])
    return {"intact": intact, "deleted": deleted}


def run_tp(directory: str, tp: int, out) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(JOB)),
           "TORCH_CPP_LOG_LEVEL": "ERROR"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
                           "--master-port", str(free_port()), JOB, directory, str(out)],
                          env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp)]
    for r, res in enumerate(results):  # distload's merged view next to transformers' own, per rank
        print(f"rank {r}: distload missing {res['report']['missing']}; transformers raised "
              f"{res['transformers'].get('raised')!r}, its report: {res['transformers']['report_lines']}")
    first = results[0]["report"]
    assert all({k: r["report"][k] for k in ("missing", "inconsistent", "unexpected")} ==
               {k: first[k] for k in ("missing", "inconsistent", "unexpected")} for r in results)
    return results


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_one_deleted_expert_up_proj_is_named_once_with_its_owners(checkpoints, tmp_path, tp):
    results = run_tp(checkpoints["deleted"], tp, tmp_path)
    report = results[0]["report"]
    assert report["missing"] == [{"name": UP, "owners": list(range(tp))}]
    assert not report["inconsistent"] and not report["unexpected"] and not report["ok"]
    for res in results:  # transformers names the fused parameter, not the checkpoint tensor, and raises
        seen = res["transformers"]
        assert seen["raised"].startswith("RuntimeError: We encountered some issues during automatic conversion")
        assert seen["report_lines"] == ["model.layers.2.mlp.experts.gate_up_proj | MISSING    |",
                                        "model.layers.2.mlp.experts.gate_up_proj | CONVERSION |"]


def test_an_intact_checkpoint_loads_in_transformers_and_is_complete(checkpoints, tmp_path):
    results = run_tp(checkpoints["intact"], 2, tmp_path)
    report = results[0]["report"]
    assert report["complete"] and report["ok"] and not report["unexpected"]
    assert all(r["transformers"] == {"raised": None, "missing_keys": [], "report_lines": []} for r in results)
    # every piece of every checkpoint tensor: per rank, each tensor once (experts fused by transformers)
    assert report["num_units"] == 145 and [r["units_loaded"] for r in report["ranks"]] == [80, 80]
