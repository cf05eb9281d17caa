"""An engine-style model and loader that follow vLLM's loading protocol, written for these tests.

It stands in for a serving engine's own model: nothing in it comes from distload but the
``distload.track`` calls a real engine would add. Each rank builds only its own shard (its
pipeline stage's layers, its TP rows or columns, its hosted experts); its parameters carry
``weight_loader(param, loaded_weight[, shard_id])`` (experts: ``(param, loaded_weight,
weight_name, shard_id, expert_id, return_success)``); ``load_weights`` walks the checkpoint with
a stacked-parameter mapping ``(param_name, shard_name, shard_id)`` and an expert-parameter
mapping ``(param_name, weight_name, expert_id, shard_id)`` over physical experts, redundant
copies included, skipping pipeline-missing parameters; every rank reads whole tensors and
narrows them. Rank arithmetic, layer split and expert placement are computed here.

Model types: llama (attention biases), qwen3_moe (q/k norms, a dense layer), deepseek_v3 (MLA,
shared experts, correction bias); checkpoints plain, block FP8 (``weight_scale_inv``) or
compressed-tensors per-tensor FP8 with static inputs (``weight_scale``, ``input_scale``) and
KV-cache scales (``k_scale`` / ``v_scale``, optional with default 1.0).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from distload.track import Key

FP8 = torch.float8_e4m3fn

STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
           ("fused_qkv_a_proj", "q_a_proj", 0), ("fused_qkv_a_proj", "kv_a_proj_with_mqa", 1)]
"""(param_name, shard_name, shard_id), as vLLM's llama / qwen3_moe / deepseek_v2 ``load_weights`` list them"""


@dataclass(frozen=True)
class Place:
    """One rank's coordinates: ``rank = (pp_i * dp + dp_i) * tp + tp_i``; experts over ``ep`` groups
    of ``dp * tp / ep`` consecutive ranks of a stage (with ep 1, every replica hosts every expert)."""

    rank: int
    tp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def tp_i(self) -> int:
        return self.rank % self.tp

    @property
    def pp_i(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def etp(self) -> int:
        return self.tp if self.ep == 1 else self.dp * self.tp // self.ep

    @property
    def expert_group(self) -> tuple[int, int]:
        """(the expert group this rank hosts, its shard index in it)."""
        if self.ep == 1:
            return 0, self.tp_i
        local = (self.rank // self.tp % self.dp) * self.tp + self.tp_i
        return divmod(local, self.etp)

    def layers(self, num_layers: int) -> range:
        """This stage's decoder layers: an even split, the first stages taking one more."""
        base, extra = divmod(num_layers, self.pp)
        start = self.pp_i * base + min(self.pp_i, extra)
        return range(start, start + base + (self.pp_i < extra))


def make_expert_params_mapping(gate: str, down: str, up: str, num_experts: int, redundant: int = 0):
    """vLLM's ``FusedMoE.make_expert_params_mapping``: one entry per physical expert and matrix, the
    weight named by its logical expert (redundant physical experts E.. copy experts 0..)."""
    physical_to_logical = list(range(num_experts)) + [i % num_experts for i in range(redundant)]
    return [("experts.w13_" if name in (gate, up) else "experts.w2_", f"experts.{physical_to_logical[p]}.{name}.",
             p, shard_id)
            for p in range(num_experts + redundant) for shard_id, name in (("w1", gate), ("w2", down), ("w3", up))]


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """vLLM's default: the whole tensor into the whole parameter."""
    param.data.copy_(loaded_weight.reshape(param.shape))


def safetensors_weights(directory: str):
    """vLLM's ``safetensors_weights_iterator``: every tensor of every file, read whole."""
    from safetensors import safe_open

    for fname in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class Quant:
    """The checkpoint's quantization, read from config.json as an engine reads it."""

    def __init__(self, config: dict) -> None:
        q = config.get("quantization_config") or {}
        self.block = tuple(q["weight_block_size"]) if q.get("quant_method") == "fp8" else None
        self.per_tensor = q.get("quant_method") == "compressed-tensors"
        self.static = self.per_tensor and not q["config_groups"]["group_0"]["input_activations"]["dynamic"]
        self.kv = self.per_tensor and q.get("kv_cache_scheme") is not None
        self._skip = q.get("modules_to_not_convert") or q.get("ignore") or []

    def applies(self, prefix: str) -> bool:
        if self.block is None and not self.per_tensor:
            return False
        return not any(re.fullmatch(s[3:], prefix) if s.startswith("re:") else s == prefix for s in self._skip)


class Node(nn.Module):
    """A module that only holds parameters and children (the engine's layers are data here)."""


class EngineModel(nn.Module):
    """One rank's shard of a decoder model, with vLLM's loading protocol."""

    def __init__(self, config: dict, place: Place, *, redundant: int = 0) -> None:
        super().__init__()
        self.cfg, self.place, self.quant = config, place, Quant(config)
        c = config
        self.model_type = c["model_type"]
        self.num_layers = c["num_hidden_layers"]
        self.stage = place.layers(self.num_layers)
        self.first, self.last = place.pp_i == 0, place.pp_i == place.pp - 1
        self.expert_params_mapping = []
        self.expert_maps: dict[str, list[int]] = {}
        experts = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
        if experts:
            self.expert_params_mapping = make_expert_params_mapping("gate_proj", "down_proj", "up_proj", experts,
                                                                    redundant)
        self.redundant = redundant
        h = c["hidden_size"]
        if self.first:
            self._vocab("model.embed_tokens", c["vocab_size"], h)
        for i in self.stage:
            p = f"model.layers.{i}"
            self._norm(f"{p}.input_layernorm", h)
            self._norm(f"{p}.post_attention_layernorm", h)
            self._attention(f"{p}.self_attn")
            if self._sparse(i):
                self._moe(f"{p}.mlp", experts)
            else:
                self._mlp(f"{p}.mlp", c["intermediate_size"])
        if self.last:
            self._norm("model.norm", h)
            self._vocab("lm_head", c["vocab_size"], h)

    # ------------------------------------------------------------------ the loading protocol

    def is_pp_missing_parameter(self, name: str) -> bool:
        """vLLM's ``is_pp_missing_parameter``: the parameter lives in another pipeline stage."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            return int(m.group(1)) not in self.stage
        return (name.startswith("model.embed_tokens.") and not self.first) or \
            (name.startswith(("model.norm.", "lm_head.")) and not self.last)

    def load_weights(self, weights) -> set[str]:
        """vLLM's qwen3_moe / deepseek_v2 ``load_weights`` loop."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, loaded_weight in weights:
            for param_name, weight_name, shard_id in STACKED:
                if weight_name not in name or "mlp.experts" in name:
                    continue
                name = name.replace(weight_name, param_name)
                if self.is_pp_missing_parameter(name) or name not in params:
                    break
                param = params[name]
                param.weight_loader(param, loaded_weight, shard_id)
                break
            else:
                is_expert = False
                for param_name, weight_name, expert_id, shard_id in self.expert_params_mapping:
                    if weight_name not in name:
                        continue
                    is_expert = True
                    mapped = name.replace(weight_name, param_name)
                    if self.is_pp_missing_parameter(mapped):
                        continue
                    param = params[mapped]
                    if param.weight_loader(param, loaded_weight, mapped, shard_id=shard_id, expert_id=expert_id,
                                           return_success=True):
                        name = mapped
                        break
                else:
                    if is_expert or self.is_pp_missing_parameter(name):
                        continue
                    if name.endswith((".k_scale", ".v_scale")):  # vLLM's kv-scale remap
                        name = name.replace(".k_scale", ".attn.k_scale").replace(".v_scale", ".attn.v_scale")
                    if name not in params:
                        continue  # nothing of this model takes it
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)
            loaded.add(name)
        return loaded

    # ------------------------------------------------------------------ layers

    def _param(self, name: str, shape, dtype=torch.float32, *, loader=None, piece=None) -> nn.Parameter:
        param = nn.Parameter(torch.full(tuple(shape), float("nan")).to(dtype), requires_grad=False)
        if loader is not None:
            param.weight_loader = loader
        param.piece = piece or (lambda ckpt, shard_id: Key.of(ckpt))
        path, _, attr = name.rpartition(".")
        module = self
        for part in path.split("."):
            if not hasattr(module, part):
                module.add_module(part, Node())
            module = getattr(module, part)
        module.register_parameter(attr, param)
        return param

    def _norm(self, prefix: str, size: int) -> None:
        self._param(f"{prefix}.weight", (size,))

    def _vocab(self, prefix: str, vocab: int, hidden: int) -> None:
        tp, t = self.place.tp, self.place.tp_i
        rows = -(-vocab // tp)
        lo, hi = min(t * rows, vocab), min((t + 1) * rows, vocab)

        def loader(param, w):
            param.data[:hi - lo].copy_(w.narrow(0, lo, hi - lo))

        self._param(f"{prefix}.weight", (rows, hidden), loader=loader,
                    piece=lambda ckpt, _: Key.of(ckpt, dim=0, index=t, num_shards=tp, pad=True) if hi > lo else None)

    def _linear(self, prefix: str, parts: list[tuple[object, int, int]], cols: int, *, split_cols: int = 1,
                bias: bool = False) -> None:
        """A linear layer: ``parts`` are ``(shard_id, rows, pieces)`` stacked along the rows, each cut
        into ``pieces`` row pieces (this rank takes piece ``tp_i * pieces // tp``); ``split_cols``
        cuts the columns instead (row-parallel)."""
        tp, t = self.place.tp, self.place.tp_i
        quant = self.quant.applies(prefix)
        info = {}
        offset = 0
        for shard_id, rows, pieces in parts:
            info[shard_id] = (offset, rows // pieces, t * pieces // tp, pieces)
            offset += rows // pieces
        local_cols = cols // split_cols
        col = t if split_cols > 1 else 0

        def piece_rows(ckpt, shard_id, scale_rows=None):
            _, _, index, pieces = info[shard_id]
            if split_cols > 1:
                return Key.of(ckpt, dim=1, index=col, num_shards=split_cols)
            return Key.of(ckpt, dim=0, index=index, num_shards=pieces) if pieces > 1 else Key.of(ckpt)

        def load_rows(param, w, shard_id=None, per_row=1):
            start, rows, index, _ = info[shard_id]
            if split_cols > 1:
                param.data.copy_(w.narrow(1, col * param.shape[1], param.shape[1]))
                return
            n = rows // per_row
            param.data.narrow(0, start // per_row, n).copy_(w.narrow(0, index * n, n))

        dtype = FP8 if quant else torch.float32
        self._param(f"{prefix}.weight", (offset, local_cols), dtype, loader=load_rows, piece=piece_rows)
        if bias:  # row-parallel: the whole bias on every rank
            whole = split_cols > 1
            self._param(f"{prefix}.bias", (offset,), loader=default_weight_loader if whole else load_rows,
                        piece=(lambda ckpt, _: Key.of(ckpt)) if whole else piece_rows)
        if not quant:
            return
        if self.quant.block is not None:
            bn, bk = self.quant.block
            if split_cols > 1:
                shape = (math.ceil(offset / bn), local_cols // bk)
            else:
                shape = (offset // bn, math.ceil(cols / bk))  # whole blocks per piece (distload refuses others)
            self._param(f"{prefix}.weight_scale_inv", shape,
                        loader=lambda param, w, shard_id=None: load_rows(param, w, shard_id, per_row=bn),
                        piece=piece_rows)
            return
        slot = {shard_id: i for i, shard_id in enumerate(info)}

        def load_scalar(param, w, shard_id=None):
            param.data[slot[shard_id]:slot[shard_id] + 1].copy_(w.reshape(1))

        names = ("weight_scale", "input_scale") if self.quant.static else ("weight_scale",)
        for attr in names:
            self._param(f"{prefix}.{attr}", (len(info),), loader=load_scalar)

    def _column(self, prefix: str, rows: int, cols: int, *, bias=False, pieces=None) -> None:
        self._linear(prefix, [(None, rows, pieces or self.place.tp)], cols, bias=bias)

    def _row(self, prefix: str, rows: int, cols: int, *, bias=False) -> None:
        self._linear(prefix, [(None, rows, 1)], cols, split_cols=self.place.tp, bias=bias)

    def _attention(self, p: str) -> None:
        c, tp = self.cfg, self.place.tp
        h, heads = c["hidden_size"], c["num_attention_heads"]
        if self.model_type == "deepseek_v3":
            nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            qa, kva = c["q_lora_rank"], c["kv_lora_rank"]
            self._linear(f"{p}.fused_qkv_a_proj", [(0, qa, 1), (1, kva + rope, 1)], h)
            self._norm(f"{p}.q_a_layernorm", qa)
            self._column(f"{p}.q_b_proj", heads * (nope + rope), qa)
            self._norm(f"{p}.kv_a_layernorm", kva)
            self._column(f"{p}.kv_b_proj", heads * (nope + v), kva)
            self._row(f"{p}.o_proj", h, heads * v)
            return
        hd, kv = c.get("head_dim") or h // heads, c["num_key_value_heads"]
        bias = bool(c.get("attention_bias"))
        kv_pieces = min(tp, kv)
        self._linear(f"{p}.qkv_proj", [("q", heads * hd, tp), ("k", kv * hd, kv_pieces), ("v", kv * hd, kv_pieces)],
                     h, bias=bias)
        self._row(f"{p}.o_proj", h, heads * hd, bias=bias)
        if self.model_type == "qwen3_moe":
            self._norm(f"{p}.q_norm", hd)
            self._norm(f"{p}.k_norm", hd)
        if self.quant.kv:
            for s in ("k_scale", "v_scale"):
                self._param(f"{p}.attn.{s}", ())

    def _mlp(self, p: str, inter: int) -> None:
        h, tp = self.cfg["hidden_size"], self.place.tp
        self._linear(f"{p}.gate_up_proj", [(0, inter, tp), (1, inter, tp)], h)
        self._row(f"{p}.down_proj", h, inter)

    def _sparse(self, layer: int) -> bool:
        c = self.cfg
        if self.model_type == "deepseek_v3":
            return layer >= c["first_k_dense_replace"] and layer % c.get("moe_layer_freq", 1) == 0
        if self.model_type == "qwen3_moe":
            return layer not in (c.get("mlp_only_layers") or []) and (layer + 1) % c.get("decoder_sparse_step", 1) == 0
        return False

    def _moe(self, p: str, experts: int) -> None:
        c, place = self.cfg, self.place
        h, inter = c["hidden_size"], c["moe_intermediate_size"]
        self._param(f"{p}.gate.weight", (experts, h))
        if self.model_type == "deepseek_v3":
            self._param(f"{p}.gate.e_score_correction_bias", (experts,))
            self._mlp(f"{p}.shared_experts", inter * c["n_shared_experts"])
        slots = experts + self.redundant
        per = slots // place.ep
        group, shard = place.expert_group
        etp = place.etp
        expert_map = [p_ - group * per if group * per <= p_ < (group + 1) * per else -1 for p_ in range(slots)]
        if place.ep > 1:
            self.expert_maps[f"{p}.experts"] = expert_map
        block = self.quant.block if self.quant.applies(f"{p}.experts") else None
        local = inter // etp

        def weight_loader(param, w, weight_name, shard_id, expert_id, return_success=False):
            slot = expert_map[expert_id]
            if slot < 0:
                return False  # FusedMoE: another rank hosts this physical expert
            per_row = block[0] if weight_name.endswith("weight_scale_inv") else 1
            if shard_id == "w2":
                n = param.shape[2]
                param.data[slot].copy_(w.narrow(1, shard * n, n))
            else:
                n = local // per_row
                param.data[slot].narrow(0, 0 if shard_id == "w1" else n, n).copy_(w.narrow(0, shard * n, n))
            return True

        def piece(ckpt, shard_id):
            if etp == 1:
                return Key.of(ckpt)
            return Key.of(ckpt, dim=1 if shard_id == "w2" else 0, index=shard, num_shards=etp)

        dtype = FP8 if block else torch.float32
        self._param(f"{p}.experts.w13_weight", (per, 2 * local, h), dtype, loader=weight_loader, piece=piece)
        self._param(f"{p}.experts.w2_weight", (per, h, local), dtype, loader=weight_loader, piece=piece)
        if block:
            bn, bk = block
            self._param(f"{p}.experts.w13_weight_scale_inv", (per, 2 * local // bn, h // bk), loader=weight_loader,
                        piece=piece)
            self._param(f"{p}.experts.w2_weight_scale_inv", (per, h // bn, local // bk), loader=weight_loader,
                        piece=piece)


def engine_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)
