"""Rules mode on model types distload does not build, written by transformers: ``gpt2`` (``Conv1D``
weights stored [in, out], ``c_attn`` fused [q | k | v] along dim 1) and multi-query ``falcon``
(``query_key_value`` fused [q heads | one k head | one v head] along dim 0, k and v on every rank),
at TP 2 and 4; a mixtral through expert rules at tp=2 x ep=2. Each rank's sharded state dict equals
its slices, cut here by head / block arithmetic written for this test; a deleted tensor is missing
with its owners; the dry run plans what the load reads; a rules file that cannot be right is an error
naming the rule.
"""

from __future__ import annotations

import json

import pytest
import torch

import distload
from distload import LoadConfig
from distload.__main__ import main
from distload.dryrun import dry_run
from distload.errors import ConfigError, LayoutError, PlanError
from distload.rules import parse_rules
from tests import rules_jobs
from tests.hf_checkpoints import CheckpointCache, ConfigSpec, HFSpec, delete_tensors, put_tensors, read_tensors

pytest.importorskip("transformers")

H = 64
"""hidden size of every checkpoint here"""
TOKENS = {"bos_token_id": 0, "eos_token_id": 0}
SPECS = {
    "gpt2": ConfigSpec(config_class="GPT2Config", seed=41,
                       fields={"vocab_size": 128, "n_embd": H, "n_layer": 2, "n_head": 4, "n_positions": 32, **TOKENS}),
    "falcon": ConfigSpec(config_class="FalconConfig", seed=42, fields={
        "vocab_size": 128, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 4, "multi_query": True,
        "new_decoder_architecture": False, "parallel_attn": True, "bias": False, **TOKENS}),
    "mixtral": HFSpec(model_type="mixtral", intermediate_size=32, seed=43,
                      extra={"num_local_experts": 4, "num_experts_per_tok": 2}),
}

LAYER = r"(?P<layer>\d+)"
GPT2 = {"num_layers": "n_layer", "rules": [
    {"pattern": r"transformer\.wte\.weight", "split": {"dim": 0}},
    {"pattern": rf"transformer\.h\.{LAYER}\.attn\.c_attn\.weight", "split": {"dim": 1, "parts": [H, H, H]}},
    {"pattern": rf"transformer\.h\.{LAYER}\.attn\.c_attn\.bias", "split": {"dim": 0, "parts": [H, H, H]}},
    {"pattern": rf"transformer\.h\.{LAYER}\.mlp\.c_fc\.weight", "split": {"dim": 1}},
    {"pattern": rf"transformer\.h\.{LAYER}\.mlp\.c_fc\.bias", "split": {"dim": 0}},
    {"pattern": rf"transformer\.h\.{LAYER}\.(attn|mlp)\.c_proj\.weight", "split": {"dim": 0}},
    {"pattern": rf"transformer\.h\.{LAYER}\.((attn|mlp)\.c_proj\.bias|ln_[12]\.(weight|bias))"},
    {"pattern": r"transformer\.(wpe\.weight|ln_f\.(weight|bias))", "split": "replicate"}]}
"""GPT-2: Conv1D [in, out], so column-parallel layers split dim 1 and row-parallel ones dim 0"""
FALCON = {"num_layers": "num_hidden_layers", "rules": [
    {"pattern": r"transformer\.word_embeddings\.weight", "split": {"dim": 0}},
    {"pattern": rf"transformer\.h\.{LAYER}\.self_attention\.query_key_value\.weight",
     "split": {"dim": 0, "parts": [{"size": H, "groups": 4, "label": "q"}, {"size": 16, "groups": 1, "label": "k"},
                                   {"size": 16, "groups": 1, "label": "v"}]}},
    {"pattern": rf"transformer\.h\.{LAYER}\.(self_attention\.dense|mlp\.dense_4h_to_h)\.weight", "split": {"dim": 1}},
    {"pattern": rf"transformer\.h\.{LAYER}\.mlp\.dense_h_to_4h\.weight", "split": {"dim": 0}},
    {"pattern": rf"transformer\.(h\.{LAYER}\.input_layernorm|ln_f)\.(weight|bias)"}]}
"""Falcon (multi-query): one KV head, on every rank; nn.Linear [out, in] weights"""
MIXTRAL = {"num_layers": "num_hidden_layers", "num_experts": "num_local_experts", "rules": [
    {"pattern": r"model\.embed_tokens\.weight|lm_head\.weight", "split": {"dim": 0}},
    {"pattern": rf"model\.layers\.{LAYER}\.self_attn\.q_proj\.weight", "split": {"dim": 0, "groups": 4}},
    {"pattern": rf"model\.layers\.{LAYER}\.self_attn\.[kv]_proj\.weight", "split": {"dim": 0, "groups": 2}},
    {"pattern": rf"model\.layers\.{LAYER}\.self_attn\.o_proj\.weight", "split": {"dim": 1}},
    {"pattern": rf"model\.layers\.{LAYER}\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w[13]\.weight",
     "split": {"dim": 0}},
    {"pattern": rf"model\.layers\.{LAYER}\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight",
     "split": {"dim": 1}},
    {"pattern": rf"model\.(layers\.{LAYER}\.(input_layernorm|post_attention_layernorm|block_sparse_moe\.gate)|norm)"
                r"\.weight"}]}
"""Mixtral by rules: attention heads as groups, experts placed over ep groups and cut inside"""
RULES = {"gpt2": GPT2, "falcon": FALCON, "mixtral": MIXTRAL}


@pytest.fixture(scope="session")
def rules_ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-rules"), SPECS)


def _block(t: torch.Tensor, dim: int, tp: int, i: int) -> torch.Tensor:
    n = t.shape[dim] // tp
    return t.narrow(dim, i * n, n)


def gpt2_slices(ckpt: dict[str, torch.Tensor], tp: int, i: int) -> dict[str, torch.Tensor]:
    """c_attn: this rank's column block of each of q, k and v; c_fc: a column block; c_proj: a row
    block (its input); the token embedding: a row block; everything else whole."""
    out = {}
    for name, t in ckpt.items():
        if name.endswith("c_attn.weight") or name.endswith("c_attn.bias"):
            dim = t.dim() - 1
            out[name] = torch.cat([_block(t.narrow(dim, p * H, H), dim, tp, i) for p in range(3)], dim=dim)
        elif name.endswith("c_fc.weight") or name.endswith("c_fc.bias"):
            out[name] = _block(t, t.dim() - 1, tp, i)
        elif name.endswith("c_proj.weight") or name == "transformer.wte.weight":
            out[name] = _block(t, 0, tp, i)
        else:
            out[name] = t
    return out


def falcon_slices(ckpt: dict[str, torch.Tensor], tp: int, i: int) -> dict[str, torch.Tensor]:
    """query_key_value: this rank's query heads' rows, then the one key head and the one value head;
    dense and dense_4h_to_h: a column block; dense_h_to_4h and the embedding: a row block."""
    out = {}
    for name, t in ckpt.items():
        if name.endswith("query_key_value.weight"):
            out[name] = torch.cat([_block(t[:H], 0, tp, i), t[H:]])
        elif name.endswith("self_attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
            out[name] = _block(t, 1, tp, i)
        elif name.endswith("dense_h_to_4h.weight") or name.endswith("word_embeddings.weight"):
            out[name] = _block(t, 0, tp, i)
        else:
            out[name] = t
    return out


SLICES = {"gpt2": gpt2_slices, "falcon": falcon_slices}


def _agrees_with_dry_run(directory: str, tp: int, world: int, options: dict, results: list[dict]) -> None:
    """The dry run with LoadConfig ``options`` (the rules, ep) plans the load's findings and per-rank bytes."""
    planned = dry_run(directory, LoadConfig(tp=tp, **options), world_size=world)
    as_json = planned.to_json()
    for rank, r in enumerate(results):
        for kind in ("complete", "missing", "inconsistent", "defaulted", "unexpected", "ignored", "num_units", "notes"):
            assert as_json[kind] == r["report"][kind], (rank, kind)
        assert planned.stats_of(rank).bytes_read == r["report"]["ranks"][rank]["bytes_read"], rank


LAYOUTS = [("gpt2", 2, 2), ("gpt2", 4, 4), ("gpt2", 4, 2), ("falcon", 2, 2), ("falcon", 4, 4)]


@pytest.mark.parametrize("name,world,tp", LAYOUTS, ids=[f"{n}-w{w}-tp{t}" for n, w, t in LAYOUTS])
def test_each_rank_holds_its_slices_and_the_dry_run_agrees(pool, rules_ckpts, name, world, tp):
    directory = rules_ckpts.path(name)
    results = pool.run(world, rules_jobs.load_shards, directory, tp, {"rules": RULES[name]}, raise_errors=True)
    ckpt = read_tensors(directory)
    for rank, got in enumerate(results):
        report = got["report"]
        assert got["raised"] is False and report["complete"] is True and report["ok"] is True, report
        for kind in ("missing", "inconsistent", "unexpected", "defaulted", "ignored"):
            assert report[kind] == [], (kind, report[kind])
        assert report["notes"] == [f"rules mode: {len(RULES[name]['rules'])} rules from LoadConfig.rules; per-rank "
                                   "sharded state dicts (no model class, no forward)"]
        want = SLICES[name](ckpt, tp, rank % tp)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for tensor, t in want.items():
            assert got["state"][tensor].shape == tuple(t.shape), (rank, tensor)
            assert (got["state"][tensor] == t.numpy()).all(), f"rank {rank}: {tensor} differs"
    _agrees_with_dry_run(directory, tp, world, {"rules": RULES[name]}, results)


def test_experts_live_on_their_groups_cut_inside_each_expert(pool, rules_ckpts):
    directory = rules_ckpts.path("mixtral")
    options = {"rules": MIXTRAL, "ep": 2}
    results = pool.run(4, rules_jobs.load_shards, directory, 2, options, raise_errors=True)
    ckpt = read_tensors(directory)
    for rank, got in enumerate(results):
        assert got["report"]["complete"] is True and got["report"]["unexpected"] == [], got["report"]
        tp_i, group, shard = rank % 2, rank // 2, rank % 2  # 4 experts over 2 groups of 2 ranks: linear
        want = {}
        for name, t in ckpt.items():
            if ".experts." in name:
                expert = int(name.split(".experts.")[1].split(".")[0])
                if expert // 2 == group:
                    want[name] = _block(t, 1 if name.endswith("w2.weight") else 0, 2, shard)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "embed_tokens.weight",
                                "lm_head.weight")):
                want[name] = _block(t, 0, 2, tp_i)
            elif name.endswith("o_proj.weight"):
                want[name] = _block(t, 1, 2, tp_i)
            else:
                want[name] = t
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for tensor, t in want.items():
            assert (got["state"][tensor] == t.numpy()).all(), f"rank {rank}: {tensor} differs"
    _agrees_with_dry_run(directory, 2, 4, options, results)


# (checkpoint, deleted tensor, world, tp, its owners)
DELETED = [("gpt2", "transformer.h.1.attn.c_attn.weight", 2, 2, [0, 1]),
           ("gpt2", "transformer.h.0.ln_2.bias", 4, 4, [0, 1, 2, 3]),
           ("falcon", "transformer.h.1.self_attention.query_key_value.weight", 4, 4, [0, 1, 2, 3]),
           ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", 4, 2, [2, 3])]


@pytest.mark.parametrize("name,deleted,world,tp,owners", DELETED, ids=[f"{d[0]}-w{d[2]}" for d in DELETED])
def test_a_deleted_tensor_is_missing_with_its_owners(pool, rules_ckpts, name, deleted, world, tp, owners):
    directory = rules_ckpts.copy(name)
    delete_tensors(directory, [deleted])
    options = {"rules": RULES[name], **({"ep": 2} if name == "mixtral" else {})}
    results = pool.run(world, rules_jobs.load_shards, directory, tp, options)
    for r in results:
        assert r["raised"] is True
        assert r["report"]["missing"] == [{"name": deleted, "owners": owners}]
        assert r["report"]["inconsistent"] == [] and r["report"]["unexpected"] == []
    _agrees_with_dry_run(directory, tp, world, options, results)


def test_optional_tensors_are_defaulted_when_absent_and_loaded_when_present(pool, rules_ckpts):
    scale = "transformer.h.0.attn.k_scale"
    rules = {**GPT2, "rules": [*GPT2["rules"], {"names": [scale], "shape": [1], "optional": {"default": 1.0}}]}
    absent = pool.run(2, rules_jobs.load_shards, rules_ckpts.path("gpt2"), 2, {"rules": rules}, raise_errors=True)
    for r in absent:
        assert r["report"]["complete"] is True and r["report"]["defaulted"] == [{"name": scale, "owners": [0, 1]}]
        assert r["state"][scale].tolist() == [1.0]
    directory = rules_ckpts.copy("gpt2")
    put_tensors(directory, {scale: torch.tensor([0.25])})
    present = pool.run(2, rules_jobs.load_shards, directory, 2, {"rules": rules}, raise_errors=True)
    for r in present:
        assert r["report"]["defaulted"] == [] and r["state"][scale].tolist() == [0.25]


def test_ignored_tensors_are_listed_with_their_pattern(rules_ckpts):
    rules = {**GPT2, "rules": GPT2["rules"][:-1], "ignore": [r"^transformer\.(wpe|ln_f)\."]}
    report = dry_run(rules_ckpts.path("gpt2"), LoadConfig(tp=2, rules=rules), world_size=2).to_json()
    assert report["complete"] is True and report["unexpected"] == []
    names = ("transformer.ln_f.bias", "transformer.ln_f.weight", "transformer.wpe.weight")
    assert report["ignored"] == [{"name": n, "rule": r"^transformer\.(wpe|ln_f)\."} for n in names]


def _with(rules: dict, *extra: dict, **top) -> dict:
    return {**rules, **top, "rules": [*rules["rules"], *extra]}


# (rules, tp, error class, message)
BAD = [
    (_with(GPT2, {"pattern": r"transformer\.h\.\d+\.attn\.q_proj\.weight"}), 2, ConfigError,
     r"rules[8] 'transformer\\.h\\.\\d+\\.attn\\.q_proj\\.weight' matches no checkpoint tensor"),
    (_with(GPT2, {"pattern": r"transformer\.ln_f\.weight"}), 2, ConfigError,
     r"checkpoint tensor transformer.ln_f.weight matches rules[7] 'transformer\\.(wpe\\.weight|ln_f\\.(weight|bias))' "
     r"and rules[8] 'transformer\\.ln_f\\.weight': one rule per tensor"),
    ({**GPT2, "ignore": ["ln_f"]}, 2, ConfigError,
     r"checkpoint tensor transformer.ln_f.bias matches rules[7] 'transformer\\.(wpe\\.weight|ln_f\\.(weight|bias))' "
     "and ignore[0] 'ln_f': one rule per tensor"),
    ({**GPT2, "ignore": ["lm_head"]}, 2, ConfigError, "ignore[0] 'lm_head' matches no checkpoint tensor"),
    (_with(GPT2, {"names": ["transformer.ln_f.weight"]}, {"names": ["transformer.ln_f.weight", "x"]}), 2, ConfigError,
     "checkpoint tensor transformer.ln_f.weight is listed by rules[8] 'transformer.ln_f.weight' and rules[9] "
     "'transformer.ln_f.weight' (and 1 more): one rule per tensor"),
    (GPT2, 3, PlanError, r"rules[0] 'transformer\\.wte\\.weight': dim 0 of transformer.wte.weight (128) does not "
                         'split into 3 pieces for tp=3 (a vocabulary may pad: "pad": true)'),
    ({**GPT2, "rules": [{**GPT2["rules"][0], "split": {"dim": 0, "pad": True}}, *GPT2["rules"][1:]]}, 3, PlanError,
     r"rules[1] 'transformer\\.h\\.(?P<layer>\\d+)\\.attn\\.c_attn\\.weight': part '0' (64) does not split into 3 "
     'pieces for tp=3 (a vocabulary may pad: "pad": true)'),
    ({**GPT2, "rules": [GPT2["rules"][0], {**GPT2["rules"][1], "split": {"dim": 1, "parts": [H, H]}},
                        *GPT2["rules"][2:]]}, 2, PlanError,
     r"rules[1] 'transformer\\.h\\.(?P<layer>\\d+)\\.attn\\.c_attn\\.weight': parts [64, 64] add up to 128, but "
     "dim 1 of transformer.h.0.attn.c_attn.weight is 192"),
    ({**GPT2, "rules": [{**GPT2["rules"][0], "split": {"dim": 2}}, *GPT2["rules"][1:]]}, 2, PlanError,
     r"rules[0] 'transformer\\.wte\\.weight': split dim 2, but transformer.wte.weight has shape [128, 64]"),
    ({**GPT2, "num_layers": 1}, 2, ConfigError,
     r"rules[1] 'transformer\\.h\\.(?P<layer>\\d+)\\.attn\\.c_attn\\.weight': transformer.h.1.attn.c_attn.weight has "
     "layer 1, but num_layers is 1 (narrow the pattern, or ignore it)"),
    ({**GPT2, "num_layers": "num_hidden_layers"}, 2, ConfigError,
     "config.json has no 'num_hidden_layers', which the rules file's num_layers needs"),
    (FALCON, 2, ConfigError, r"rules[0] 'transformer\\.word_embeddings\\.weight' matches no checkpoint tensor"),
]


@pytest.mark.parametrize("rules,tp,cls,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_rules_that_cannot_be_right_name_the_rule(rules_ckpts, rules, tp, cls, message):
    with pytest.raises(cls) as err:
        dry_run(rules_ckpts.path("gpt2"), LoadConfig(tp=tp, rules=rules), world_size=tp)
    assert err.value.message == message


DOCUMENTS = [
    ([], "a rules file must be a JSON object with a \"rules\" list, got []"),
    ({"rules": []}, "rules file \"rules\" must be a non-empty list of rules, got []"),
    ({"rules": [{"pattern": "a"}], "layers": 2},
     "rules file: unknown key 'layers' (allowed: rules, ignore, num_layers, num_experts)"),
    ({"rules": [{"pattern": "a", "name": "b"}]}, "rules[0]: unknown key 'name' (allowed: pattern, names, split, "
                                                 "optional, shape, layers)"),
    ({"rules": [{"pattern": "a", "names": ["b"]}]},
     "rules[0] needs one of \"pattern\" (a regular expression) and \"names\" (a list of names), not both"),
    ({"rules": [{"pattern": "a("}]}, "rules[0]: not a valid regular expression: missing ), unterminated subpattern "
                                     "at position 1"),
    ({"rules": [{"pattern": "(?P<row>a)"}]}, "rules[0]: named group 'row' means nothing here (the named groups a "
                                             "pattern may have: layer, expert)"),
    ({"rules": [{"pattern": "a(?P<layer>\\d)"}]},
     "rules[0] 'a(?P<layer>\\\\d)': its layer group needs the number of layers: give \"num_layers\" (a number, or "
     "the config.json key that holds it)"),
    ({"rules": [{"pattern": "a", "optional": {"default": 1}}]},
     "rules[0] 'a': optional tensors are named by \"names\" (a pattern cannot match an absent tensor)"),
    ({"rules": [{"pattern": "a", "split": {"dim": -1}}]},
     "rules[0] 'a': split \"dim\" must be a dim of the tensor (0, 1, ...), got -1"),
    ({"rules": [{"pattern": "a", "split": "columns"}]},
     "rules[0] 'a': \"split\" must be \"replicate\" or {\"dim\": d, ...}, got \"columns\""),
    ({"rules": [{"pattern": "a", "split": {"dim": 0, "pad": True, "parts": [2, 2]}}]},
     "rules[0] 'a': a split with \"parts\" gives \"groups\" per part and cannot pad"),
    ({"num_experts": 4, "rules": [{"pattern": "e(?P<expert>\\d)", "split": {"dim": 0, "parts": [2, 2]}}]},
     "rules[0] 'e(?P<expert>\\\\d)': parts inside an expert are not supported; split each expert along one dim"),
]


@pytest.mark.parametrize("doc,message", DOCUMENTS, ids=[f"doc{i}" for i in range(len(DOCUMENTS))])
def test_a_rules_document_that_cannot_be_right_is_refused(doc, message):
    with pytest.raises(ConfigError) as err:
        parse_rules(doc, source=None)
    assert err.value.message == message


def test_an_unknown_model_type_without_rules_names_both_options(rules_ckpts):
    with pytest.raises(ConfigError) as err:
        dry_run(rules_ckpts.path("gpt2"), LoadConfig(), world_size=1)
    assert err.value.message.startswith("config.json model_type 'gpt2' has no built-in model (built in: llama, ")
    assert err.value.message.endswith("); to load it anyway, give a rules file saying how its tensors split: "
                                      "--rules rules.json, or LoadConfig(rules=...)")
    assert err.value.file.endswith("config.json")


def test_rules_mode_refuses_what_it_cannot_do(rules_ckpts):
    directory = rules_ckpts.path("gpt2")
    with pytest.raises(LayoutError, match=r"pipeline stages need a model's layer order \(pp=2\): use --pp 1"):
        dry_run(directory, LoadConfig(pp=2, rules=GPT2), world_size=2)
    with pytest.raises(ConfigError, match="quantize=fp8 applies to built-in models; rules mode loads each tensor"):
        dry_run(directory, LoadConfig(quantize="fp8", rules=GPT2), world_size=1)
    with pytest.raises(LayoutError, match="ep=2 applies to mixture-of-experts models"):
        dry_run(directory, LoadConfig(ep=2, rules=GPT2), world_size=2)
    loaded = distload.load(directory, LoadConfig(device="cpu", rules=GPT2))
    with pytest.raises(ConfigError, match="a rules-mode model has no forward"):
        loaded.model(torch.tensor([[1]]))
    assert loaded.model.state_dict().keys() == loaded.model.sharded_state_dict().keys()


def test_the_command_line_takes_a_rules_file(rules_ckpts, tmp_path, capsys):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(FALCON))
    out = tmp_path / "report.json"
    code = main([rules_ckpts.path("falcon"), "--rules", str(path), "--dry-run", "--world", "8", "--tp", "4",
                 "--json", str(out), "--quiet"])
    report = json.loads(out.read_text())
    assert code == 0 and report["complete"] is True and report["layout"]["dp"] == 2
    assert report["notes"] == [f"rules mode: 5 rules from {path}; per-rank sharded state dicts (no model class, "
                               "no forward)"]
    path.write_text('{"rules": [{"pattern": "a", "split": {"dim": "x"}}]}')
    assert main([rules_ckpts.path("falcon"), "--rules", str(path), "--dry-run", "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"distload: error: rules[0] 'a': split \"dim\" must be a dim of the tensor (0, 1, ...), got \"x\" "
        f"[file {path}]")


def test_load_config_takes_a_path_or_a_document():
    with pytest.raises(ConfigError) as err:
        LoadConfig(rules=3)
    assert err.value.message == "rules must be a rules file path or a rules document (a mapping), got 3"
