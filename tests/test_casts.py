"""Casts only between floating types, and pickles held to what a safetensors file could hold.

1. The rule itself (``distload.casts``) against a table written here, over every pair of
   safetensors dtypes.
2. Loads and dry runs refuse an integer / bool tensor for a float parameter, any other dtype for
   an integer parameter, and a non-FP8 tensor for an FP8 one, with one exact message, before any
   byte is read; ``--strict-dtype`` keeps its message, in the dry run too.
3. Pickle weight files holding sparse, quantized, complex, nested, data-less or non-safetensors
   tensors are refused naming file and tensor; views (storage offsets, strides, lazy negation)
   load as their values.

Checkpoints are edited copies of ``distload.example_checkpoint()`` (bf16 tiny Llama).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import distload
from distload.casts import cast_refusal, kind
from distload.checkpoint.header import DTYPES
from distload.comm import WorldInfo
from distload.dryrun import dry_run
from distload.errors import CheckpointError, DistloadError, PlanError
from distload.examples import EXAMPLE_SHARDS
from distload.models import reference_model
from tests import reliability_jobs
from tests.hf_checkpoints import copy_checkpoint, put_tensors, read_tensors

SOLO = WorldInfo(rank=0, world_size=1, local_rank=0)
SHARD1, SHARD2 = EXAMPLE_SHARDS
NORM = "model.norm.weight"  # [64], in SHARD2
Q0 = "model.layers.0.self_attn.q_proj.weight"  # [64, 64], in SHARD1, one source of qkv_proj
UP1 = "model.layers.1.mlp.up_proj.weight"  # [128, 64], in SHARD2
DOWN0 = "model.layers.0.mlp.down_proj.weight"  # [64, 128], split along its columns at tp > 1
K0 = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]

WIDE_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
"""the dtypes that cast into one another (the oracle; FP8 only into itself)"""
INTEGER = "integer tensors are not cast to floating types (only floating types are cast into one another)"
BOOL = "bool tensors are not cast to floating types (only floating types are cast into one another)"


def load1(directory: str, **options) -> distload.Loaded:
    return distload.load(directory, distload.LoadConfig(device="cpu", **options), world=SOLO)


def plan_error(directory: str, tensor: str, stored: str, wanted: str, param: str, why: str, *,
               file: str) -> tuple[str, str, str]:
    """(message, file, tensor) of the refusal the cast rule gives."""
    return (f"checkpoint dtype {stored} differs from the model's {wanted} (parameter {param}); {why}",
            os.path.join(directory, file), tensor)


def check_error(err: DistloadError, cls: type, expect: tuple[str, str, str], rank: int | None) -> None:
    """The exact error: class, message, named fields and the one line users see."""
    message, file, tensor = expect
    assert type(err) is cls, (type(err), str(err))
    assert (err.message, err.file, err.tensor, err.rank) == (message, file, tensor, rank), str(err)
    where = f"file {file}, tensor {tensor}" + ("" if rank is None else f", rank {rank}")
    assert str(err) == f"{message} [{where}]"


# ---- 1. the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("stored,wanted,strict,why", [
    (torch.bfloat16, torch.bfloat16, False, None),
    (torch.float32, torch.bfloat16, False, None),
    (torch.float64, torch.float16, False, None),
    (torch.float32, torch.bfloat16, True, "--strict-dtype refuses to cast"),
    (torch.int32, torch.int32, True, None),
    (torch.int64, torch.bfloat16, False, INTEGER),
    (torch.uint32, torch.bfloat16, False, INTEGER),
    (torch.uint8, torch.float32, False, INTEGER),
    (torch.bool, torch.float16, False, BOOL),
    (torch.bfloat16, torch.int32, False, "integer parameters need the identical dtype"),
    (torch.int64, torch.int32, False, "integer parameters need the identical dtype"),
    (torch.uint8, torch.int8, False, "integer parameters need the identical dtype"),
    (torch.uint8, torch.bool, False, "bool parameters need the identical dtype"),
    (torch.float32, torch.complex64, False, "complex parameters need the identical dtype"),
    (torch.float8_e4m3fn, torch.float8_e4m3fn, False, None),
    (torch.float8_e4m3fn, torch.bfloat16, False, "FP8 tensors are read only into parameters of the same FP8 dtype"),
    (torch.float8_e5m2, torch.float8_e4m3fn, False, "FP8 tensors are read only into parameters of the same FP8 dtype"),
    (torch.float32, torch.float8_e4m3fn, False, "FP8 parameters are read only from tensors of the same FP8 dtype"),
    (torch.int8, torch.float8_e4m3fn, False, INTEGER),
])
def test_cast_rule(stored, wanted, strict, why):
    assert cast_refusal(stored, wanted, strict_dtype=strict) == why


def test_only_floats_of_16_to_64_bits_cast_among_all_safetensors_dtypes():
    for stored in DTYPES.values():
        for wanted in DTYPES.values():
            allowed = stored == wanted or {stored, wanted} <= WIDE_FLOATS
            assert (cast_refusal(stored, wanted) is None) == allowed, (stored, wanted)
            assert (cast_refusal(stored, wanted, strict_dtype=True) is None) == (stored == wanted), (stored, wanted)
    assert {kind(d) for d in DTYPES.values()} == {"floating", "FP8", "integer", "bool", "complex"}


# ---- 2. loads and dry runs --------------------------------------------------------------------

BAD_FLOATS = {  # case -> (tensor, its file, the value written, the parameter it fills, why)
    "int64_norm": (NORM, SHARD2, torch.arange(64, dtype=torch.int64), "model.norm.weight", INTEGER),
    "uint32_q": (Q0, SHARD1, torch.arange(64 * 64, dtype=torch.int64).to(torch.uint32).reshape(64, 64),
                 "model.layers.0.self_attn.qkv_proj.weight", INTEGER),
    "bool_up": (UP1, SHARD2, torch.ones(128, 64, dtype=torch.bool), "model.layers.1.mlp.gate_up_proj.weight", BOOL),
}


def bad_float(example: str, directory: str, case: str) -> tuple[str, tuple[str, str, str]]:
    """A copy of the example with one bf16 weight replaced by an integer / bool tensor."""
    tensor, file, value, param, why = BAD_FLOATS[case]
    d = copy_checkpoint(example, directory)
    put_tensors(d, {tensor: value})
    return d, plan_error(d, tensor, str(value.dtype).removeprefix("torch."), "bfloat16", param, why, file=file)


@pytest.mark.parametrize("case", BAD_FLOATS)
def test_integer_or_bool_tensor_for_a_float_weight_is_refused(example, tmp_path, case, monkeypatch):
    d, expect = bad_float(example, str(tmp_path / "ckpt"), case)
    import distload.execute
    monkeypatch.setattr(distload.execute.Executor, "run", lambda *a, **k: pytest.fail("bytes were read"))
    with pytest.raises(PlanError) as info:
        load1(d)
    check_error(info.value, PlanError, expect, 0)
    with pytest.raises(PlanError) as info:
        dry_run(d, distload.LoadConfig(tp=2), world_size=4)
    check_error(info.value, PlanError, expect, None)


def test_later_pipeline_stage_is_checked_by_the_dry_run(example, tmp_path):
    d, expect = bad_float(example, str(tmp_path / "ckpt"), "int64_norm")  # the final norm: stage 1 of 2
    with pytest.raises(PlanError) as info:
        dry_run(d, distload.LoadConfig(pp=2), world_size=2)
    check_error(info.value, PlanError, expect, None)


def test_integer_tensor_refused_on_every_rank_at_world_4(example, tmp_path, pool):
    d, (message, file, tensor) = bad_float(example, str(tmp_path / "ckpt"), "uint32_q")
    for rank, out in enumerate(pool.run(4, reliability_jobs.outcome, d, 2)):
        assert not out["ok"], out
        if out["type"] == "PeerFailedError":  # a rank that failed first published its error
            assert (out["file"], out["tensor"]) == (file, tensor) and message in out["message"], out
            continue
        assert (out["type"], out["message"], out["file"], out["tensor"], out["rank"]) == \
            ("PlanError", message, file, tensor, rank), out


def test_strict_dtype_message_is_unchanged_and_the_dry_run_refuses_too(example, tmp_path):
    d = copy_checkpoint(example, str(tmp_path / "ckpt"))
    put_tensors(d, {UP1: read_tensors(example)[UP1].float()})
    expect = plan_error(d, UP1, "float32", "bfloat16", "model.layers.1.mlp.gate_up_proj.weight",
                        "--strict-dtype refuses to cast", file=SHARD2)
    with pytest.raises(PlanError) as info:
        load1(d, strict_dtype=True)
    check_error(info.value, PlanError, expect, 0)
    with pytest.raises(PlanError) as info:
        dry_run(d, distload.LoadConfig(strict_dtype=True))
    check_error(info.value, PlanError, expect, None)
    assert load1(d).report.notes == ("cast float32 -> bfloat16 while loading (model dtype differs from the "
                                     "checkpoint's)",)  # a float cast without --strict-dtype still loads


def with_buffer(dtype: torch.dtype):
    """A builder: the reference model plus a persistent buffer ``table`` [4] of ``dtype`` (default spec:
    the checkpoint tensor of the same name)."""
    def build(ctx):
        model = reference_model(ctx)
        model.register_buffer("table", torch.empty(4, dtype=dtype, device="meta"))
        return model
    return build


@pytest.mark.parametrize("stored", [torch.int64, torch.bfloat16, torch.uint32])
def test_integer_parameter_needs_the_identical_dtype(example, tmp_path, stored):
    d = copy_checkpoint(example, str(tmp_path / "ckpt"))
    put_tensors(d, {"table": torch.tensor([1, 2, 3, 4]).to(stored)})
    expect = plan_error(d, "table", str(stored).removeprefix("torch."), "int32", "table",
                        "integer parameters need the identical dtype", file=SHARD2)
    config = distload.LoadConfig(device="cpu")
    with pytest.raises(PlanError) as info:
        distload.load(d, config, world=SOLO, build=with_buffer(torch.int32))
    check_error(info.value, PlanError, expect, 0)
    with pytest.raises(PlanError) as info:
        dry_run(d, config, build=with_buffer(torch.int32))
    check_error(info.value, PlanError, expect, None)


def test_integer_parameter_of_the_same_dtype_loads_exactly(example, tmp_path):
    d = copy_checkpoint(example, str(tmp_path / "ckpt"))
    packed = torch.tensor([-2**31, -1, 7, 2**31 - 1], dtype=torch.int32)  # bit patterns a float cast would change
    put_tensors(d, {"table": packed})
    loaded = distload.load(d, distload.LoadConfig(device="cpu"), world=SOLO, build=with_buffer(torch.int32))
    assert loaded.report.complete and loaded.report.notes == ()
    assert loaded.model.table.dtype == torch.int32 and torch.equal(loaded.model.table, packed)


def test_fp8_parameter_is_not_filled_from_a_wider_float(example, tmp_path):
    d = copy_checkpoint(example, str(tmp_path / "ckpt"))
    put_tensors(d, {"table": torch.ones(4, dtype=torch.bfloat16)})
    expect = plan_error(d, "table", "bfloat16", "float8_e4m3fn", "table",
                        "FP8 parameters are read only from tensors of the same FP8 dtype", file=SHARD2)
    with pytest.raises(PlanError) as info:
        distload.load(d, distload.LoadConfig(device="cpu"), world=SOLO, build=with_buffer(torch.float8_e4m3fn))
    check_error(info.value, PlanError, expect, 0)


def test_cli_prints_the_refusal_as_one_line_exit_1(example, tmp_path):
    d, (message, file, tensor) = bad_float(example, str(tmp_path / "ckpt"), "int64_norm")
    proc = subprocess.run([sys.executable, "-m", "distload", d, "--device", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"distload: error: {message} [file {file}, tensor {tensor}, rank 0]"]
    assert "COMPLETE" not in proc.stdout


# ---- 3. pickles --------------------------------------------------------------------------------


def pickle_of(example: str, directory: str, replace: dict[str, torch.Tensor]) -> str:
    """The example as one ``pytorch_model.bin`` (torch.save), with ``replace``'s tensors swapped in.
    Returns the file's path."""
    os.mkdir(directory)
    shutil.copyfile(os.path.join(example, "config.json"), os.path.join(directory, "config.json"))
    path = os.path.join(directory, "pytorch_model.bin")
    torch.save({**read_tensors(example), **replace}, path)
    return path


def _norm():
    return torch.ones(64)


UNLOADABLE = {  # case -> (the tensor stored as model.norm.weight, what the message says it is)
    "sparse": (lambda: _norm().to_sparse(), "is sparse (torch.sparse_coo); only dense tensors can be loaded"),
    "sparse_csr": (lambda: torch.ones(8, 8).to_sparse_csr(),
                   "is sparse (torch.sparse_csr); only dense tensors can be loaded"),
    "quantized": (lambda: torch.quantize_per_tensor(_norm(), 0.1, 0, torch.quint8),
                  "is quantized (torch.quint8, torch.per_tensor_affine); only non-quantized tensors can be loaded"),
    "complex": (lambda: _norm().to(torch.complex64), "is complex (torch.complex64); only real tensors can be loaded"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(32), torch.ones(32)]),
               "is nested; only dense tensors can be loaded"),
    "meta": (lambda: torch.empty(64, device="meta"),
             "has no data on the CPU (device meta); only tensors with data can be loaded"),
    "bits8": (lambda: torch.zeros(64, dtype=torch.uint8).view(torch.bits8),
              f"has dtype torch.bits8, which safetensors cannot hold (it knows {', '.join(DTYPES)})"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: sparse CSR beta, quantization and nested deprecated
@pytest.mark.parametrize("case", UNLOADABLE)
def test_pickle_holding_what_safetensors_cannot_is_refused(example, tmp_path, case):
    make, what = UNLOADABLE[case]
    path = pickle_of(example, str(tmp_path / "pkl"), {NORM: make()})
    expect = (f"tensor {NORM} {what}", path, NORM)
    with pytest.raises(CheckpointError) as info:
        load1(os.path.dirname(path), allow_pickle_format=True)
    check_error(info.value, CheckpointError, expect, 0)
    with pytest.raises(CheckpointError) as info:
        dry_run(os.path.dirname(path), distload.LoadConfig(allow_pickle_format=True), world_size=2)
    check_error(info.value, CheckpointError, expect, None)


def views(example: str) -> dict[str, torch.Tensor]:
    """Tensors of the example stored as views: a storage offset, transposed strides, a stride-0
    broadcast (values that are all equal) and a lazily negated tensor, each equal to the original."""
    t = read_tensors(example)
    base = torch.cat([torch.full((7, 64), 3.0, dtype=torch.bfloat16), t[K0]])
    return {
        K0: base[7:],  # storage offset 7 x 64
        DOWN0: t[DOWN0].t().contiguous().t(),  # strides (1, 64): column-major
        "model.layers.1.input_layernorm.weight": torch.full((1,), 0.5, dtype=torch.bfloat16).expand(64),
        NORM: (-t[NORM])._neg_view(),  # storage holds -x, the negative bit makes it x
    }


def test_pickled_views_load_as_their_values(example, tmp_path, pool):
    replace = views(example)
    assert not replace[DOWN0].is_contiguous() and replace[K0].storage_offset() == 7 * 64
    assert replace[NORM].is_neg() and torch.equal(replace[NORM], read_tensors(example)[NORM])
    path = pickle_of(example, str(tmp_path / "pkl"), replace)
    ref = distload.load(example, distload.LoadConfig(device="cpu"), world=SOLO).model.state_dict()
    ref["model.layers.1.input_layernorm.weight"] = torch.full((64,), 0.5, dtype=torch.bfloat16)
    loaded = load1(os.path.dirname(path), allow_pickle_format=True)
    assert loaded.report.complete
    got = loaded.model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    # tp=2: the column-major DOWN0 is read by column shard, the others by row shard
    sharded = pool.run(4, reliability_jobs.outcome_with, os.path.dirname(path), 2, {"allow_pickle_format": True},
                       {"digests": True})
    plain = pickle_of(example, str(tmp_path / "plain"),
                            {"model.layers.1.input_layernorm.weight": torch.full((64,), 0.5, dtype=torch.bfloat16)})
    expected = pool.run(4, reliability_jobs.outcome_with, os.path.dirname(plain), 2,
                        {"allow_pickle_format": True}, {"digests": True})
    for got4, want4 in zip(sharded, expected):
        assert got4["ok"] and got4["report"]["complete"] is True, got4
        assert got4["digests"] == want4["digests"]
