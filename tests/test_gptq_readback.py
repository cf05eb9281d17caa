"""GPTQ checkpoints read back by GPT-QModel, an implementation of the format we did not write.

``scripts/gptq_readback.py`` does the work (see its doc): GPT-QModel quantizes a tiny llama on
the CPU for each scheme of ``tests.gptq_checkpoints.SCHEMES`` and reads back those and the tests'
own writer's checkpoints; distload loads each at world 1 and tp 2. It runs here in a Python
that has gptqmodel: this one if it imports, else ``DISTLOAD_GPTQ_PYTHON``. Then
``scripts/autogptq_readback.py`` reads its ``gptq`` checkpoints with AutoGPTQ 0.7.1, in a Python
that has auto_gptq (``DISTLOAD_AUTOGPTQ_PYTHON``). Neither library is in the test extras
(gptqmodel pins numpy 2.2.6 and pulls datasets, pyarrow, pandas and torchao; auto_gptq imports only
beside transformers 4.x), so CI skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.gptq_checkpoints import SCHEMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(module: str, variable: str) -> str | None:
    """This Python if ``module`` imports here, else the one ``variable`` names (None: none)."""
    return sys.executable if importlib.util.find_spec(module) else os.environ.get(variable) or None


PYTHON = _python("gptqmodel", "DISTLOAD_GPTQ_PYTHON")
"""the Python that runs scripts/gptq_readback.py (None: skip)"""
AUTOGPTQ_PYTHON = _python("auto_gptq", "DISTLOAD_AUTOGPTQ_PYTHON")
"""the Python that runs scripts/autogptq_readback.py (None: skip its test)"""
TOLERANCE = 1e-5
"""max |distload - transformers on GPT-QModel's dequantization| / max |transformers|, float32"""
LIBRARY_TOLERANCE = 2e-2
"""the same against GPT-QModel's own forward (float16)"""
LAYOUTS = {"w1": 1, "tp2": 2}
"""the script's layouts and their world sizes"""
MATRICES = 2 * 4
"""quantized parameters a rank of the 2-layer llama holds: qkv, o, gate_up, down"""

pytestmark = pytest.mark.skipif(
    not PYTHON, reason="gptqmodel is not installed here and DISTLOAD_GPTQ_PYTHON names no Python that has it "
                       "(scripts/gptq_readback.py says how to make one)")


def _run(python: str, script: str, *args: str, out) -> tuple[subprocess.CompletedProcess, dict]:
    # run beside its result: GPT-QModel writes a logs/ folder into its working directory
    proc = subprocess.run([python, os.path.join(ROOT, "scripts", script), *args, "--json", str(out)], cwd=out.parent,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def readback(tmp_path_factory):
    """The script's exit, output, JSON result and checkpoint directory (one run, about 90 s on 2 cores)."""
    root = tmp_path_factory.mktemp("gptq-readback")
    return (*_run(PYTHON, "gptq_readback.py", "--keep", str(root / "ckpts"), out=root / "readback.json"),
            str(root / "ckpts"))


def test_every_scheme_ran_for_both_writers_at_both_layouts(readback):
    proc, result, _ = readback
    cases = {(c["writer"], c["scheme"], c["layout"]): c for c in result["cases"]}
    assert set(cases) == {(w, s, lay) for w in ("gptqmodel", "tests") for s in SCHEMES for lay in LAYOUTS}
    for (_, scheme, _), case in cases.items():
        assert case["checkpoint_format"] == ("gptq_v2" if SCHEMES[scheme].get("v2") else "gptq"), case
    assert proc.returncode == 0 and f"{len(cases)} of {len(cases)} cases agree" in proc.stdout, proc.stdout[-3000:]


def test_distload_dequantizes_every_rank_exactly_as_gptqmodel_does(readback):
    for case in readback[1]["cases"]:
        where = (case["writer"], case["scheme"], case["layout"])
        assert case["library_matrices"] == 14, where  # q, k, v, o, gate, up, down in 2 layers
        assert case["matrices"] == MATRICES * LAYOUTS[case["layout"]], where
        assert case["unequal"] == [] and case["max_abs_weight_diff"] == 0.0, where


def test_logits_match_transformers_on_gptqmodels_dequantization(readback):
    for case in readback[1]["cases"]:
        where = (case["writer"], case["scheme"], case["layout"])
        assert case["complete"] is True, where
        assert case["logits_rel_err"] < TOLERANCE, (where, case["logits_rel_err"])
        assert case["library_logits_rel_err"] < LIBRARY_TOLERANCE, (where, case["library_logits_rel_err"])


def test_gptqmodel_reads_the_tests_writer_as_the_tests_oracle_does(readback):
    """``tests.gptq_checkpoints.dequantize`` (the oracle of tests/test_quant_int.py) equals the library's."""
    ours = [c for c in readback[1]["cases"] if c["writer"] == "tests"]
    assert len(ours) == len(SCHEMES) * len(LAYOUTS)
    for case in ours:
        assert case["tests_oracle_diff"] == 0.0, (case["scheme"], case["tests_oracle_diff"])


@pytest.mark.skipif(not AUTOGPTQ_PYTHON, reason="auto_gptq is not installed here and DISTLOAD_AUTOGPTQ_PYTHON names "
                                              "no Python that has it (scripts/autogptq_readback.py says how to make one)")
def test_autogptq_reads_every_gptq_checkpoint_as_gptqmodel_and_the_tests_oracle_do(readback, tmp_path):
    proc, result = _run(AUTOGPTQ_PYTHON, "autogptq_readback.py", readback[2], out=tmp_path / "autogptq.json")
    v1 = [s for s, scheme in SCHEMES.items() if not scheme.get("v2")]
    assert sorted((c["writer"], c["scheme"]) for c in result["cases"]) == sorted(
        (w, s) for w in ("gptqmodel", "tests") for s in v1)
    assert len(result["not_read"]) == 2 * (len(SCHEMES) - len(v1))
    for case in result["cases"]:
        assert case["library_matrices"] == 14 and case["gptqmodel_diff"] == 0.0, case
        assert case.get("tests_oracle_diff", 0.0) == 0.0, case
    assert proc.returncode == 0, proc.stdout[-3000:]
