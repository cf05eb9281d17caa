"""gpt-oss MXFP4 checkpoints (``quant_method: mxfp4``: each layer's experts as ``*_blocks`` /
``*_scales``, written from the format's definition by ``tests.mxfp4_checkpoints`` out of a bf16
checkpoint transformers wrote) loaded at worlds 1, 2 and 4 over TP (uneven: 7 blocks of 32
intermediate features over 2 and 4 ranks), EP 2 and 4 and PP 2.

Oracles not taken from distload: the writer's conventions pinned against values worked out by
hand; transformers' own MXFP4 dequantization (``Mxfp4Config(dequantize=True)``, pure torch, it runs
on the CPU) for values and logits; each rank's blocks, scales and biases sliced from the checkpoint
by hand (``tests.mxfp4_checkpoints.expert_slices``), its bytes and units counted by hand.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from distload import ConfigError, LoadConfig, PlanError
from distload.prepare import prepare
from distload.comm import Collectives
from distload.dryrun import dry_run
from distload.layout import Layout
from distload.models import reference_model
from distload.quant import quant_config
from tests import moe_jobs, quant_jobs
from tests.hf_checkpoints import HFSpec, copy_checkpoint, put_tensors, read_tensors, token_ids, write_hf_checkpoint
from tests.moe_oracle import (L, assert_clean, assert_only_inconsistent, assert_reads, assert_routes_and_logits, common_state, coords,
                              headers, hf_reference, hosted, layers_of, missing_after_deleting, packed_needs)
from tests.mxfp4_checkpoints import (BLOCK, NOT_CONVERTED, blocks_per_rank, expert_slices, feature_range,
                                     hf_mxfp4_model, quantize, value, write_mxfp4_checkpoint)

pytest.importorskip("transformers")

# 4 experts of 224 = 7 blocks of 32 features (expert tp 2: 4 + 3 blocks; 4: 2 + 2 + 2 + 1), hidden 64 =
# 2 input blocks of gate_up; stored bf16 as the released models are; the rest as tests/test_hf_gpt_oss.py
SPEC = HFSpec(model_type="gpt_oss", intermediate_size=7 * BLOCK, seed=43, dtype="bfloat16", extra={
    "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4, "swiglu_limit": 1.0,
    "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16}})
EXPERTS = "model.layers.{}.mlp.experts."
NOTE = "quantization: mxfp4 experts (e2m1 in blocks of 32, e8m0 scales), dequantized for each matmul"


class Model:
    """The facts of the test config a layout needs."""

    num_layers = SPEC.num_hidden_layers
    num_experts = SPEC.extra["num_local_experts"]
    sparse = frozenset(range(SPEC.num_hidden_layers))


M = Model()

LAYOUTS = [
    L("gpt_oss", 1),
    L("gpt_oss", 2, tp=2),                        # expert tp 2: 4 and 3 blocks
    L("gpt_oss", 4, tp=4),                        # expert tp 4: 2, 2, 2, 1 blocks (KV heads on two ranks each)
    L("gpt_oss", 2, dp=2, ep=2),                  # two whole experts a rank
    L("gpt_oss", 4, dp=4, ep=4),                  # one whole expert a rank
    L("gpt_oss", 4, tp=2, pp=2),                  # a layer per stage, expert tp 2
    L("gpt_oss", 4, tp=2, dp=2, ep=2, placement="round_robin"),  # expert tp 2 inside each expert group
]


class Checkpoints:
    """The bf16 checkpoint, its MXFP4 twin, transformers' reading of the twin and each layout's load,
    made once per module."""

    def __init__(self, root, pool) -> None:
        self.root, self.pool = root, pool
        self._q = self._ref = self._tensors = None
        self._runs: dict[L, list] = {}
        self._copies = 0

    @property
    def q(self) -> str:
        if self._q is None:
            self.base = write_hf_checkpoint(str(self.root / "bf16"), SPEC)
            self._q = write_mxfp4_checkpoint(self.base, str(self.root / "mxfp4"))
        return self._q

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = read_tensors(self.q)
        return self._tensors

    def reference(self) -> tuple:
        """transformers' logits and routes on the checkpoint, experts dequantized by transformers."""
        if self._ref is None:
            self._ref = hf_reference(self.q, token_ids(SPEC), model=hf_mxfp4_model(self.q))
        return self._ref

    def copy(self) -> str:
        self._copies += 1
        return copy_checkpoint(self.q, str(self.root / f"copy{self._copies}"))

    def forward(self, lay: L) -> list[dict]:
        if lay not in self._runs:
            self._runs[lay] = self.pool.run(lay.world, moe_jobs.load_forward_route, self.q,
                                            {**lay.options(), "dtype": "float32"}, token_ids(SPEC),
                                            raise_errors=True)
        return self._runs[lay]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("mxfp4"), pool)


# ------------------------------------------------------------------ the writer, against hand values


def test_quantize_follows_the_mx_rule_worked_out_by_hand():
    """A block with amax 6 has exponent floor(log2 6) - 2 = 0 (byte 127); 0.25, 0.75, -1.25 and 5 are
    ties that go to the even codes 0 (0.0), 2 (1.0), 8 + 2 (-1.0) and 6 (4.0); 6 is code 7; value 2k
    is byte k's low nibble. A block with amax 0.7 has exponent -1 - 2 = -3 (byte 124): 0.7 / 2^-3 = 5.6,
    nearest 6 (code 7)."""
    w = torch.zeros(2, BLOCK)
    w[0, :6] = torch.tensor([0.25, 0.75, -1.25, 5.0, 6.0, -6.0])
    w[1, 0] = 0.7
    blocks, scales = quantize(w)
    assert scales.tolist() == [[127], [124]]
    assert blocks[0, 0, :3].tolist() == [0x20, 0x6A, 0xF7] and blocks[0, 0, 3:].tolist() == [0] * 13
    assert blocks[1, 0].tolist() == [0x07] + [0] * 15
    assert [value(blocks, scales, (0,), c) for c in range(6)] == [0.0, 1.0, -1.0, 4.0, 6.0, -6.0]
    assert value(blocks, scales, (1,), 0) == 0.75


def test_transformers_reads_the_writers_blocks_as_worked_out_by_hand(ckpts):
    """transformers' dequantized experts (``[E, in, out]``) equal the hand arithmetic on the stored
    bytes (``[E, out, in / 32, 16]``), for every 61st value of layer 0 (some of every expert's rows) and
    a few of layer 1."""
    model = hf_mxfp4_model(ckpts.q)
    state, t = model.state_dict(), ckpts.tensors
    for layer, picks in ((0, None), (1, [(3, 447, 63), (0, 0, 0), (2, 100, 33)])):
        x = EXPERTS.format(layer)
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales, deq = t[x + proj + "_blocks"], t[x + proj + "_scales"], state[x + proj]
            e, rows, groups, _ = blocks.shape
            assert deq.dtype == torch.float32 and tuple(deq.shape) == (e, groups * BLOCK, rows)
            cells = picks or [(a, b, c) for a in range(e) for b in range(rows) for c in range(groups * BLOCK)
                              if (a + b + c) % 61 == 0]
            for a, o, i in cells:
                if o < rows and i < groups * BLOCK:
                    assert deq[a, i, o].item() == value(blocks, scales, (a, o), i), (proj, a, o, i)


def test_the_checkpoint_stores_the_experts_as_the_format_says(ckpts):
    t, e, h, i = ckpts.tensors, M.num_experts, SPEC.hidden_size, SPEC.intermediate_size
    for layer in range(M.num_layers):
        x = EXPERTS.format(layer)
        got = {n: (str(t[x + n].dtype), tuple(t[x + n].shape)) for n in (
            "gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks", "down_proj_scales",
            "down_proj_bias")}
        assert got == {"gate_up_proj_blocks": ("torch.uint8", (e, 2 * i, h // 32, 16)),
                       "gate_up_proj_scales": ("torch.uint8", (e, 2 * i, h // 32)),
                       "gate_up_proj_bias": ("torch.bfloat16", (e, 2 * i)),
                       "down_proj_blocks": ("torch.uint8", (e, h, i // 32, 16)),
                       "down_proj_scales": ("torch.uint8", (e, h, i // 32)),
                       "down_proj_bias": ("torch.bfloat16", (e, h))}
        assert x + "gate_up_proj" not in t and x + "down_proj" not in t
    with open(os.path.join(ckpts.q, "config.json")) as f:
        assert json.load(f)["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}


def test_distload_dequantizes_exactly_as_worked_out_by_hand(ckpts):
    """World 1: every expert weight as the layer dequantizes it (float32, ``[slots, in, out]``)
    equals transformers' dequantization, and a few equal the hand arithmetic."""
    got = ckpts.pool.run(1, quant_jobs.load_dequantized, ckpts.q, {"dtype": "float32"})[0]
    state, t = hf_mxfp4_model(ckpts.q).state_dict(), ckpts.tensors
    for layer in range(M.num_layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = EXPERTS.format(layer) + proj
            assert torch.equal(torch.from_numpy(got[name]), state[name]), name
    x = EXPERTS.format(1)
    for proj, (a, o, i) in (("gate_up_proj", (3, 447, 63)), ("down_proj", (1, 60, 200))):
        want = value(t[x + proj + "_blocks"], t[x + proj + "_scales"], (a, o), i)
        assert got[x + proj][a, i, o] == want != 0.0


# ------------------------------------------------------------------ exact slices, bytes, logits


def expected_state(t: dict[str, torch.Tensor], lay: L, rank: int) -> dict[str, torch.Tensor]:
    """The parameters ``rank`` must hold, by hand: attention and the rest as in the bf16 test, and
    its experts' slices of the blocks, scales and biases (zero-padded to the longest shard)."""
    tp, tp_i = lay.tp, coords(lay, rank)[0]
    plain = {n: v for n, v in t.items() if ".experts." not in n}
    out = common_state(plain, M, lay, rank, heads=SPEC.num_attention_heads, kv_heads=SPEC.num_key_value_heads,
                       head_dim=SPEC.head_dim)
    experts, shard, etp = hosted(M, lay, rank)
    for layer in layers_of(M, lay, rank):
        p = f"model.layers.{layer}."
        sinks = t[p + "self_attn.sinks"]
        out[p + "self_attn.sinks"] = sinks.narrow(0, tp_i * sinks.shape[0] // tp, sinks.shape[0] // tp)
        out[p + "mlp.router.weight"], out[p + "mlp.router.bias"] = t[p + "mlp.router.weight"], t[p + "mlp.router.bias"]
        out.update(expert_slices(t, EXPERTS.format(layer), experts, shard, etp, SPEC.intermediate_size))
    return out


def needs(lay: L, rank: int, hdr: dict) -> dict[str, tuple[int, int]]:
    """Checkpoint tensors ``rank`` reads -> (its bytes, its units): per hosted expert its rows of the
    gate_up tensors (2 a feature), its blocks of every row of the down tensors, the down bias whole;
    a unit per hosted expert whose shard holds any feature; the rest as the bf16 test counts them."""
    out = packed_needs(M, lay, rank, hdr, kv_heads=SPEC.num_key_value_heads)
    experts, shard, etp = hosted(M, lay, rank)
    first, held, _ = feature_range(SPEC.intermediate_size, etp, shard)
    per_feature = {"gate_up_proj_blocks": 2 * SPEC.hidden_size // 2, "gate_up_proj_scales": 2 * SPEC.hidden_size // 32,
                   "gate_up_proj_bias": 2 * 2, "down_proj_blocks": SPEC.hidden_size // 2,
                   "down_proj_scales": SPEC.hidden_size // 32}
    for name in out:
        kind = name.rpartition(".")[2]
        if kind == "down_proj_bias":
            out[name] = (len(experts) * SPEC.hidden_size * 2, len(experts))
        elif kind in per_feature:
            out[name] = (len(experts) * held * per_feature[kind], len(experts) if held else 0)
    return {n: v for n, v in out.items() if v != (0, 0)}


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda x: x.id)
def test_blocks_and_scales_are_exact_checkpoint_slices_and_logits_match_transformers(ckpts, lay):
    hdr = headers(ckpts.q)
    ref_logits, ref_routes = ckpts.reference()
    # the input reaches every expert, so the logits depend on every slot's blocks
    assert {e for experts, _ in ref_routes.values() for e in experts.flatten().tolist()} == set(range(M.num_experts))
    for rank, got in enumerate(ckpts.forward(lay)):
        report = got["report"]
        assert_clean(report, lay)
        assert NOTE in report["notes"], report["notes"]
        want = expected_state(ckpts.tensors, lay, rank)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for name, w in want.items():
            have = torch.from_numpy(got["state"][name])
            w = w if w.dtype == torch.uint8 else w.float()  # floats loaded into the float32 model
            assert have.dtype == w.dtype and torch.equal(have, w), f"rank {rank}: {name} differs"
        assert_reads(report, rank, needs(lay, rank, hdr), hdr)
        assert_routes_and_logits(got, M, lay, rank, ref_logits, ref_routes)


# (tp, dp, ep) simulated: expert tp 2 and 4 (ep 1), 8 and 16 (ep 2): 4 + 3, 2 + 2 + 2 + 1, then one block
# a rank and the last shards none
PLANNED = [(2, 1, 1), (4, 1, 1), (2, 8, 2), (2, 16, 2)]


@pytest.mark.parametrize("tp,dp,ep", PLANNED, ids=lambda v: str(v))
def test_every_block_is_read_by_exactly_its_expert_shards_owners(ckpts, tp, dp, ep):
    """Planned for every rank (simulated, no processes): the local blocks and scales hold
    ``ceil(7 / etp)`` blocks; each rank's reads of layer 0's blocks and scales are, by hand, its shard's
    rows (gate_up) or blocks of every row (down) of each expert it hosts, at their byte offsets; over
    the ranks every block of every expert is read once per group hosting it; a shard short of the
    longest zeroes its padding, a shard with no block reads nothing."""
    i, h, e = SPEC.intermediate_size, SPEC.hidden_size, M.num_experts
    world = tp * dp
    lay = L("gpt_oss", world, tp=tp, dp=dp, ep=ep)
    layout = Layout(world_size=world, tp=tp, dp=dp, ep=ep)
    hdr = headers(ckpts.q)
    held = {}
    for rank in range(world):
        _, model, _, plan = prepare(ckpts.q, LoadConfig(**lay.options()), layout, reference_model, rank=rank,
                                    ops=Collectives(None, tp), stage_ops=Collectives(None, world))
        experts, shard, etp = hosted(M, lay, rank)
        counts = blocks_per_rank(i, etp)
        first, mine, most = sum(counts[:shard]), counts[shard], max(counts)
        layer = model.model.layers["0"].mlp.experts
        assert tuple(layer.gate_up_proj_blocks.shape) == (len(experts), 2 * BLOCK * most, h // 32, 16)
        assert tuple(layer.down_proj_scales.shape) == (len(experts), h, most)
        rp = plan.for_rank(rank)
        padded = {n for n in rp.zero if n.startswith(EXPERTS.format(0))}
        assert padded == ({EXPERTS.format(0) + n for n in ("gate_up_proj_blocks", "gate_up_proj_scales",
                                                           "gate_up_proj_bias", "down_proj_blocks",
                                                           "down_proj_scales")} if mine < most else set())
        reads = [r for r in rp.reads if r.tensor.name.startswith(EXPERTS.format(0))
                 and r.tensor.name.endswith(("_blocks", "_scales"))]
        assert len(reads) == (4 * len(experts) if mine else 0), rank
        for r in reads:
            name, x = r.tensor.name, experts[r.slot]
            entry = 16 if name.endswith("_blocks") else 1  # bytes per block of one row
            begin = hdr[name][1]
            held.setdefault(name, []).extend((x, b) for b in range(first, first + mine))
            if ".gate_up_proj" in name:  # rows 64 a block, whole rows: one run
                row = h // 32 * entry
                assert (r.offset, r.run, r.count) == (begin + (x * 2 * i + 2 * BLOCK * first) * row,
                                                      2 * BLOCK * mine * row, 1), (rank, name)
                assert r.dest == (0, 2 * BLOCK * mine)
            else:  # every row's blocks [first, first + mine)
                row = i // 32 * entry
                assert (r.offset, r.run, r.stride, r.count) == (begin + x * h * row + first * entry, mine * entry,
                                                                row, h), (rank, name)
                assert r.dest == (0, mine)
    copies = dp if ep == 1 else 1  # groups hosting each expert: every replica with ep 1, one group without copies
    assert len(held) == 4
    for name, got in held.items():
        assert sorted(got) == sorted((x, b) for x in range(e) for b in range(7) for _ in range(copies)), name


# ------------------------------------------------------------------ deletions and refusals


DELETED = [EXPERTS.format(1) + "gate_up_proj_blocks", EXPERTS.format(0) + "down_proj_bias"]
"""a whole blocks tensor of every expert, a bias of a quantized experts layer"""


def test_a_deleted_blocks_tensor_and_bias_are_missing_once_with_the_ranks_of_their_stage(ckpts):
    lay = L("gpt_oss", 4, dp=2, pp=2, ep=2)  # stage 0: ranks 0, 1 (layer 0); stage 1: ranks 2, 3
    report = missing_after_deleting(ckpts.pool, ckpts.copy(), DELETED, lay)
    assert sorted(report["missing"], key=lambda m: m["name"]) == [
        {"name": EXPERTS.format(0) + "down_proj_bias", "owners": [0, 1]},
        {"name": EXPERTS.format(1) + "gate_up_proj_blocks", "owners": [2, 3]}]
    for rank, stats in enumerate(report["ranks"]):  # its 2 hosted experts' units of the deleted tensor
        assert stats["units_not_loaded"] == 2, f"rank {rank}"


def test_one_experts_scales_skipped_by_the_only_rank_hosting_it_name_that_rank(ckpts):
    """ep 4: expert 2 lives on rank 2 only; rank 2 drops its box of layer 0's gate_up scales (a region
    of the tensor of every expert). The tensor is reported by name, its owners the four ranks hosting
    its experts, loaded by all but rank 2, the one unit not loaded rank 2's: no other rank reads or
    counts expert 2's scales."""
    lay = L("gpt_oss", 4, dp=4, ep=4)
    name = EXPERTS.format(0) + "gate_up_proj_scales"
    out = ckpts.pool.run(4, moe_jobs.load_report, ckpts.q, {**lay.options(), "skip_units": {2: (f"{name}[2]",)}},
                         raise_errors=True)
    assert_only_inconsistent(out, name, [0, 1, 2, 3], [0, 1, 3])
    assert [s["units_not_loaded"] for s in out[0]["report"]["ranks"]] == [0, 0, 1, 0]


def test_a_skipped_shard_of_one_experts_blocks_is_inconsistent_among_its_holders(ckpts):
    """ep 2 with expert tp 2, round robin: experts 1 and 3 on ranks 2, 3 (shards 0, 1: 4 and 3 blocks),
    experts 0 and 2 on ranks 0, 1. Rank 3 drops its shard of expert 1's down blocks."""
    lay = L("gpt_oss", 4, tp=2, dp=2, ep=2, placement="round_robin")
    name = EXPERTS.format(1) + "down_proj_blocks"
    out = ckpts.pool.run(4, moe_jobs.load_report, ckpts.q, {**lay.options(), "skip_units": {3: (f"{name}[1]",)}},
                         raise_errors=True)
    assert_only_inconsistent(out, name, [0, 1, 2, 3], [0, 1, 2])
    assert [s["units_not_loaded"] for s in out[0]["report"]["ranks"]] == [0, 0, 0, 1]


def test_no_expert_tp_is_refused_and_partial_blocks_are(ckpts, tmp_path):
    """Every expert tp plans and loads (uneven whole blocks, the last shards may hold none; expert tp
    16 with 7 blocks: ``test_every_block_is_read...``); a config whose intermediate size is no whole
    number of blocks is refused naming the blocks tensor."""
    for tp, dp, ep in PLANNED:
        assert dry_run(ckpts.q, LoadConfig(tp=tp, dp=dp, ep=ep), world_size=tp * dp).complete
    directory = copy_checkpoint(ckpts.q, str(tmp_path / "partial"))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 7 * BLOCK - 16
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(tp=2), world_size=2)
    assert str(err.value).startswith("MXFP4 stores inputs in blocks of 32: a matrix of 208 inputs has a partial "
                                     "block (parameter model.layers.0.mlp.experts.down_proj)")
    assert err.value.tensor == EXPERTS.format(0) + "down_proj_blocks" and err.value.file.endswith("config.json")


def test_blocks_and_scales_are_never_cast(ckpts, tmp_path):
    directory = copy_checkpoint(ckpts.q, str(tmp_path / "int8"))
    name = EXPERTS.format(1) + "down_proj_scales"
    put_tensors(directory, {name: ckpts.tensors[name].to(torch.int16)})
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(), world_size=1)
    assert str(err.value).startswith("MXFP4 scales are stored as uint8 (e8m0 exponents), this tensor is int16 "
                                     "(parameter model.layers.1.mlp.experts.down_proj_scales)")
    assert err.value.tensor == name


def test_modules_to_not_convert_follow_transformers_rule():
    """A regex from the start to a module boundary, or a suffix; only packed experts are MXFP4."""
    q = quant_config({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        *NOT_CONVERTED, "model.layers.1.mlp.experts"]}})
    experts = "model.layers.{}.mlp.experts"
    assert q.method_for(experts.format(0), [experts.format(0)], "PackedExperts").name == NOTE.split(": ", 1)[1]
    assert q.method_for(experts.format(1), [experts.format(1)], "PackedExperts") is None
    assert q.method_for(experts.format(11), [experts.format(11)], "PackedExperts") is not None  # a boundary
    assert q.feature_block(experts.format(0), "PackedExperts") == 32
    assert q.feature_block(experts.format(1), "PackedExperts") is None
    for linear in ("model.layers.0.self_attn.qkv_proj", "lm_head", "model.layers.0.mlp.router"):
        assert q.method_for(linear, [linear]) is None
    with pytest.raises(ConfigError) as err:
        quant_config({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.("]}})
    assert str(err.value).startswith("quant_method mxfp4 modules_to_not_convert entry 'model.(' is not a regex")


def test_another_format_naming_the_packed_experts_is_refused_naming_them(ckpts, tmp_path):
    """Only MXFP4 defines tensors for experts packed per layer: a compressed-tensors FP8 group whose
    targets name gpt-oss's experts is refused, naming the fused tensor, before anything is read."""
    ckpts.q  # the bf16 checkpoint is written with it
    directory = copy_checkpoint(ckpts.base, str(tmp_path / "fp8"))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "config_groups": {"g": {"targets": ["re:.*mlp\\.experts$"], "weights": {
                                         "num_bits": 8, "type": "float", "strategy": "channel"}}}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(), world_size=1)
    assert str(err.value).startswith("parameter model.layers.0.mlp.experts.gate_up_proj is cut from a fused "
                                     "checkpoint tensor; serialized quantized checkpoints of fused-on-disk weights "
                                     "are not supported")
    assert err.value.tensor == EXPERTS.format(0) + "gate_up_proj"
