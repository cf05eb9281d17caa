"""Hand-written facts of expert layouts and checkpoint slices, shared by the MoE tests.

Nothing here asks distload: which logical expert each local slot of a rank holds, which shard of
it, which rows / columns of an attention or MLP tensor a TP rank holds, and where each tensor's
bytes lie in its file (parsed from the safetensors headers here).
"""

from __future__ import annotations

import json
import os
import struct

import torch

from tests.layouts import L, coords, hosted, stage_of_layer  # noqa: F401  (part of this oracle's vocabulary)

TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits (and routing weights)"""


def moe_input_ids() -> torch.Tensor:
    """Token ids of the MoE tests (vocabulary 128; its first and last ids included)."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    ids[0, 0], ids[1, 3] = 127, 0
    return ids


def deepseek_input_ids() -> torch.Tensor:
    """Token ids of the DeepSeek-V3 tests (vocabulary 64; its first and last ids included)."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (2, 10), generator=gen)
    ids[0, 0], ids[1, 3] = 63, 0
    return ids


def headers(directory: str) -> dict[str, tuple[str, int, int]]:
    """name -> (file, absolute begin, absolute end) of its data, parsed from the safetensors headers."""
    out = {}
    for fname in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with open(os.path.join(directory, fname), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                out[name] = (fname, 8 + n + begin, 8 + n + end)
    return out


def layers_of(m, lay: L, rank: int) -> list[int]:
    """The decoder layers of ``rank``'s pipeline stage."""
    pp_i = coords(lay, rank)[2]
    return [layer for layer in range(m.num_layers) if stage_of_layer(m, lay, layer) == pp_i]


def by_expert(experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's chosen experts in ascending order, with their weights (the order top-k
    returns them in is not part of the routing decision)."""
    order = experts.argsort(dim=-1)
    return experts.gather(-1, order), weights.gather(-1, order)


def block(t: torch.Tensor, dim: int, n: int, i: int, first: int = 0, size: int | None = None) -> torch.Tensor:
    """Piece ``i`` of ``n`` equal pieces along ``dim`` of ``t``'s ``[first, first + size)``."""
    piece = (t.shape[dim] if size is None else size) // n
    return t.narrow(dim, first + i * piece, piece)


def attention_state(ckpt: dict[str, torch.Tensor], a: str, *, heads: int, kv_heads: int, head_dim: int, tp: int,
                    tp_i: int) -> dict[str, torch.Tensor]:
    """GQA attention ``a`` (``model.layers.N.self_attn.``) of TP rank ``tp_i``: ``qkv_proj`` = its
    query heads' rows of q, then the rows of the KV heads they read from k and from v (weight and
    bias); ``o_proj`` its query heads' columns, its bias whole."""
    mine = range(tp_i * heads // tp, (tp_i + 1) * heads // tp)
    my_kv = sorted({h // (heads // kv_heads) for h in mine})

    def rows(t: torch.Tensor, which, dim: int = 0) -> torch.Tensor:
        return torch.cat([t.narrow(dim, h * head_dim, head_dim) for h in which], dim=dim)

    out = {}
    for kind in ("weight", "bias"):
        if a + f"q_proj.{kind}" in ckpt:
            out[a + f"qkv_proj.{kind}"] = torch.cat([rows(ckpt[a + f"q_proj.{kind}"], mine),
                                                     rows(ckpt[a + f"k_proj.{kind}"], my_kv),
                                                     rows(ckpt[a + f"v_proj.{kind}"], my_kv)])
    out[a + "o_proj.weight"] = rows(ckpt[a + "o_proj.weight"], mine, dim=1)
    if a + "o_proj.bias" in ckpt:
        out[a + "o_proj.bias"] = ckpt[a + "o_proj.bias"]
    return out


def divisor(name: str, tp: int, kv_heads: int) -> int:
    """Into how many pieces a TP group cuts a tensor that is no expert's: k/v projections by at
    most their heads; q/o projections, sinks, dense and shared MLPs, embedding and head by tp;
    norms, routers and the o_proj bias not at all."""
    if any(k in name for k in ("k_proj.", "v_proj.")):
        return min(tp, kv_heads)
    if name.endswith(("q_proj.weight", "q_proj.bias", "o_proj.weight", ".sinks", "embed_tokens.weight",
                      "lm_head.weight")) or any(k in name for k in ("gate_proj.", "up_proj.", "down_proj.")):
        return tp
    return 1


def dense_ffn_state(ckpt: dict[str, torch.Tensor], prefix: str, tp: int, tp_i: int) -> dict[str, torch.Tensor]:
    """A TP-split MLP stored unfused (``prefix``: ``...mlp.``): ``gate_up_proj`` = its row block of
    gate, then of up; ``down_proj`` its column block."""
    return {prefix + "gate_up_proj.weight": torch.cat([block(ckpt[prefix + "gate_proj.weight"], 0, tp, tp_i),
                                                       block(ckpt[prefix + "up_proj.weight"], 0, tp, tp_i)]),
            prefix + "down_proj.weight": block(ckpt[prefix + "down_proj.weight"], 1, tp, tp_i)}


def packed_slot(t: torch.Tensor, expert: int, etp: int, shard: int, *, halves: bool = False) -> torch.Tensor:
    """Shard ``shard`` of ``etp`` of ``expert``'s ``gate_up_proj`` (or its bias) ``[E, ..., 2 I]``: its
    column block, interleaved gate/up taken as they lie, or with ``halves`` that block of the gate
    half, then of the up half."""
    piece = t[expert]
    if halves:
        half = piece.shape[-1] // 2
        return torch.cat([block(piece, piece.dim() - 1, etp, shard, 0, half),
                          block(piece, piece.dim() - 1, etp, shard, half, half)], dim=-1)
    return block(piece, piece.dim() - 1, etp, shard)


def hf_reference(directory: str, ids: torch.Tensor, model=None) -> tuple[torch.Tensor, dict[int, tuple]]:
    """transformers' logits (eager attention, eval, float32) and, per sparse layer, what its router
    chose: (top-k expert indices [N, k], their weights [N, k]). Top-k routers return (logits, weights,
    indices); Llama 4's returns (scores over every expert, logits): its choice is the top-k logits'.

    Args:
        model: transformers' model of the checkpoint, loaded by the caller (a quantized one); None:
            ``from_pretrained(directory)`` in float32.
    """
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    k = model.config.num_experts_per_tok
    routes = {}

    def top_k(_m, _a, out, layer):
        routes[layer] = (out[2].clone(), out[1].clone())

    def scored(_m, _a, out, layer):
        top, experts = torch.topk(out[1], k, dim=-1)
        routes[layer] = (experts, torch.sigmoid(top))

    for name, module in model.named_modules():
        kind = type(module).__name__.lower()
        hook = top_k if kind.endswith("topkrouter") else scored if kind == "llama4router" else None
        if hook is not None:
            layer = int(name.split(".")[2])
            module.register_forward_hook(lambda m, a, out, layer=layer, hook=hook: hook(m, a, out, layer))
    with torch.no_grad():
        logits = model(ids).logits.float()
    return logits, routes


def in_stage(m, lay: L, rank: int, name: str) -> bool:
    """Whether checkpoint tensor ``name`` belongs to the pipeline stage of ``rank`` (the embedding
    to the first, the final norm and LM head to the last)."""
    _, _, pp_i = coords(lay, rank)
    if name.startswith("model.layers."):
        return stage_of_layer(m, lay, int(name.split(".")[2])) == pp_i
    return pp_i == (0 if name == "model.embed_tokens.weight" else lay.pp - 1)


def packed_needs(m, lay: L, rank: int, hdr: dict, *, kv_heads: int, halves: bool = False) \
        -> dict[str, tuple[int, int]]:
    """Checkpoint tensors ``rank`` reads -> (its bytes of it, its units of it), for a model whose
    experts are packed per layer. A packed tensor: 1/E of it per hosted expert, cut over the expert
    tp (the down bias whole), a unit per hosted expert (per half of gate_up with ``halves``); the
    others as ``divisor`` cuts them, one unit each."""
    experts, _, etp = hosted(m, lay, rank)
    n, out = len(experts), {}
    for name, (_, begin, end) in hdr.items():
        if not in_stage(m, lay, rank, name):
            continue
        size = end - begin
        if ".experts." in name:
            parts = 2 if halves and name.endswith("gate_up_proj") else 1
            out[name] = (size * n // m.num_experts // (1 if name.endswith("down_proj_bias") else etp), n * parts)
        else:
            out[name] = (size // divisor(name, lay.tp, kv_heads), 1)
    return out


def common_state(ckpt: dict[str, torch.Tensor], m, lay: L, rank: int, *, heads: int, kv_heads: int,
                 head_dim: int) -> dict[str, torch.Tensor]:
    """What ``rank`` holds outside its feed-forwards: the embedding's and LM head's row block and the
    final norm (on their stages), and per layer of its stage its attention (``attention_state``),
    q/k norms and layer norms whole."""
    tp, tp_i = lay.tp, coords(lay, rank)[0]
    out = {n: t if n == "model.norm.weight" else block(t, 0, tp, tp_i) for n, t in ckpt.items()
           if not n.startswith("model.layers.") and in_stage(m, lay, rank, n)}
    for layer in layers_of(m, lay, rank):
        p = f"model.layers.{layer}."
        out.update(attention_state(ckpt, p + "self_attn.", heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                   tp=tp, tp_i=tp_i))
        for whole in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight",
                      "post_attention_layernorm.weight"):
            if p + whole in ckpt:
                out[p + whole] = ckpt[p + whole]
    return out


def assert_clean(report: dict, lay: L) -> None:
    """A complete load of ``lay`` with nothing to report."""
    assert report["complete"] is True and report["ok"] is True, report
    assert report["layout"] == {"world_size": lay.world, "tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep}
    for kind in ("missing", "inconsistent", "unexpected", "defaulted", "mismatched", "ignored"):
        assert report[kind] == [], (kind, report[kind])


def assert_reads(report: dict, rank: int, need: dict[str, tuple[int, int]], hdr: dict) -> None:
    """``rank`` owned and loaded exactly the units ``need`` counts, read their bytes and no others,
    from the files holding them."""
    stats = report["ranks"][rank]
    assert stats["units_owned"] == stats["units_loaded"] == sum(u for _, u in need.values()), f"rank {rank}"
    assert stats["units_not_loaded"] == 0
    assert stats["bytes_read"] == sum(b for b, _ in need.values()), f"rank {rank}"
    assert stats["files_opened"] == len({hdr[n][0] for n in need}), f"rank {rank}"


def assert_routes_and_logits(got: dict, m, lay: L, rank: int, ref_logits: torch.Tensor, ref_routes: dict) -> None:
    """The routing each sparse layer of ``rank``'s stage used is transformers' (with ep > 1 the
    router sees every token of the stage, one copy of the input per rank), and the last stage's
    logits are transformers' within TOLERANCE; earlier stages return none."""
    _, _, pp_i = coords(lay, rank)
    mine = sorted(layer for layer in m.sparse if stage_of_layer(m, lay, layer) == pp_i)
    assert sorted(got["routes"]) == mine, f"rank {rank}"
    copies = lay.tp * lay.dp if lay.ep > 1 else 1
    for layer in mine:
        ref_experts, ref_weights = by_expert(*ref_routes[layer])
        experts, weights = by_expert(*(torch.from_numpy(x) for x in got["routes"][layer]))
        assert torch.equal(experts, ref_experts.repeat(copies, 1)), f"rank {rank}: layer {layer} routes differ"
        assert (weights - ref_weights.repeat(copies, 1)).abs().max().item() < TOLERANCE
    if pp_i == lay.pp - 1:
        logits = torch.from_numpy(got["logits"])
        assert logits.shape == ref_logits.shape
        err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"
    else:
        assert got["logits"] is None, f"rank {rank}"


def assert_only_inconsistent(out: list[dict], name: str, owners: list[int], loaded_by: list[int]) -> None:
    """Every rank raised, and every report names ``name`` inconsistent (its owners, the ranks that
    loaded all their units of it) and nothing missing."""
    assert all(o["raised"] for o in out)
    for o in out:
        assert o["report"]["missing"] == []
        assert o["report"]["inconsistent"] == [{"name": name, "owners": owners, "loaded_by": loaded_by}]


def error_with_one_expert_fewer(directory: str, name: str):
    """The error a load raises after packed tensor ``name`` lost its last expert (``directory`` is a copy)."""
    import distload
    from tests.hf_checkpoints import put_tensors, read_tensors

    put_tensors(directory, {name: read_tensors(directory)[name][:-1].clone()})
    try:
        distload.load(directory, distload.LoadConfig(device="cpu"))
    except distload.DistloadError as err:
        return err
    raise AssertionError(f"a load with {name} an expert short raised nothing")


def missing_after_deleting(pool, directory: str, names: list[str], lay: L) -> dict:
    """Deletes ``names`` from the checkpoint copy ``directory``, loads it at ``lay`` and returns the
    report, once every rank raised, agrees, and named each deleted tensor missing once and nothing
    inconsistent or unexpected."""
    from tests import moe_jobs
    from tests.hf_checkpoints import delete_tensors

    delete_tensors(directory, names)
    out = pool.run(lay.world, moe_jobs.load_report, directory, lay.options(), raise_errors=True)
    assert all(o["raised"] for o in out)
    report = out[0]["report"]
    assert sorted(e["name"] for e in report["missing"]) == sorted(names)  # each once
    assert report["inconsistent"] == [] and report["unexpected"] == []
    for o in out[1:]:
        assert o["report"]["missing"] == report["missing"]
    return report


def assert_dry_run_matches(directory: str, lay: L, real: dict) -> None:
    """A dry run of ``lay`` plans, per rank, the units and bytes the real load ``real`` (its report
    JSON) counted, and the same table and findings."""
    from distload import LoadConfig
    from distload.dryrun import dry_run

    planned = dry_run(directory, LoadConfig(**lay.options()), world_size=lay.world)
    for key in ("complete", "layout", "num_units", "missing", "inconsistent", "unexpected", "bytes_read"):
        assert planned.to_json()[key] == real[key], key
    keys = ("units_loaded", "units_owned", "units_not_loaded", "bytes_read", "files_opened")
    for rank in range(lay.world):
        row = planned.stats_of(rank).to_json()
        assert {k: row[k] for k in keys} == {k: real["ranks"][rank][k] for k in keys}, f"rank {rank}"
