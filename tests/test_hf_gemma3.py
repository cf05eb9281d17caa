"""Gemma 3 text checkpoints written by transformers, loaded at worlds 1, 2 and 4 (TP, TP x DP, PP):
each rank's parameters equal their slices (tests/dense_slices.py), logits equal transformers'
Gemma3ForCausalLM in float32, and a deleted norm is missing once with the ranks that own it.
"""

from __future__ import annotations

import pytest
import torch

from tests import jobs
from tests.dense_slices import expected_params
from tests.hf_checkpoints import CheckpointCache, HFSpec, delete_tensors, read_tensors, token_ids

pytest.importorskip("transformers")

# a sliding layer (window 4, shorter than the 10-token test sequence) and a global one with its own
# linearly scaled rope base; query_pre_attn_scalar (24) unlike head_dim (16); logits soft-capped;
# attn_logit_softcapping set, which transformers' Gemma 3 reads and does not apply
GEMMA = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4, "query_pre_attn_scalar": 24,
         "final_logit_softcapping": 4.0, "attn_logit_softcapping": 5.0,
         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
SPECS = {
    "gemma3": HFSpec(model_type="gemma3_text", tie_word_embeddings=True, seed=21, extra=GEMMA),
    # untied head, q/k/v/o biases, the 4.x rope keys, the default global/sliding pattern (every
    # 6th layer global: here both sliding) and no soft-capping
    "gemma3_untied": HFSpec(model_type="gemma3_text", seed=22, extra={
        "attention_bias": True, "sliding_window": 3, "rope_theta": 50000.0, "rope_local_base_freq": 500.0}),
    # EmbeddingGemma's bidirectional attention
    "gemma3_bidi": HFSpec(model_type="gemma3_text", tie_word_embeddings=True, seed=23,
                          extra={**GEMMA, "use_bidirectional_attention": True, "sliding_window": 6}),
}
TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""


@pytest.fixture(scope="session")
def gemma_ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-gemma3"), SPECS)


def _clean(report: dict) -> None:
    assert report["complete"] is True and report["ok"] is True, report
    for kind in ("missing", "inconsistent", "unexpected", "mismatched", "defaulted"):
        assert report[kind] == [], (kind, report[kind])


# (checkpoint, world, tp, pp): tp=2 (one KV head per rank), tp=2 x dp=2, tp=4 (KV heads on two
# ranks each), pp=2 (one layer per stage: the tied head on the last stage is a copy), tp=2 x pp=2
LAYOUTS = [("gemma3", 1, 1, 1), ("gemma3", 2, 2, 1), ("gemma3", 4, 2, 1), ("gemma3", 4, 4, 1),
           ("gemma3", 2, 1, 2), ("gemma3", 4, 2, 2), ("gemma3_untied", 2, 2, 1), ("gemma3_bidi", 1, 1, 1)]


@pytest.mark.parametrize("name,world,tp,pp", LAYOUTS, ids=[f"{n}-w{w}-tp{t}-pp{p}" for n, w, t, p in LAYOUTS])
def test_params_are_exact_and_logits_match_transformers(pool, gemma_ckpts, name, world, tp, pp):
    spec = SPECS[name]
    directory = gemma_ckpts.path(name)
    results = pool.run(world, jobs.load_and_forward_pp, directory, tp, pp, token_ids(spec), raise_errors=True)
    ckpt = read_tensors(directory)
    reference = gemma_ckpts.reference_logits(name)
    per_stage = spec.num_hidden_layers // pp
    for rank, got in enumerate(results):
        _clean(got["report"])
        tp_i, stage = rank % tp, rank // (world // pp)
        want = expected_params(ckpt, spec, tp, tp_i, layers=range(stage * per_stage, (stage + 1) * per_stage),
                               first=stage == 0, last=stage == pp - 1)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for pname, t in want.items():
            assert got["state"][pname].shape == tuple(t.shape), (rank, pname)
            assert (got["state"][pname] == t.numpy()).all(), f"rank {rank}: {pname} differs"
        if stage == pp - 1:
            logits = torch.from_numpy(got["logits"])
            err = ((logits - reference).abs().max() / reference.abs().max()).item()
            assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


def test_deleted_norm_is_missing_once_with_the_ranks_of_its_stage(pool, gemma_ckpts):
    directory = gemma_ckpts.copy("gemma3")
    norm = "model.layers.1.pre_feedforward_layernorm.weight"
    delete_tensors(directory, [norm])
    results = pool.run(4, jobs.load_outcome, directory, 2, {"pp": 2})
    assert all(r["raised"] for r in results)
    for rank, r in enumerate(results):
        # layer 1 lives on stage 1 (ranks 2 and 3); stage 0 owns no piece of it and says nothing
        assert r["report"]["missing"] == [{"name": norm, "owners": [2, 3]}]
        assert r["report"]["inconsistent"] == [] and r["report"]["unexpected"] == []
        assert r["message"] == f"load not usable: 1 missing ({norm}) [rank {rank}]"


# a released Gemma 3 text_config (4B): most fields left to Gemma3TextConfig's defaults, the 4.x rope keys
RELEASED = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "sliding_window": 1024,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}


def test_a_released_config_reads_as_transformers_reads_it():
    from transformers import Gemma3TextConfig

    from distload.models.registry import architecture

    arch = architecture(RELEASED)
    cfg, theirs = arch.read(RELEASED, arch), Gemma3TextConfig(**RELEASED)
    dec = cfg.decoder
    assert (dec.vocab_size, dec.head_dim, dec.tie_word_embeddings) == (theirs.vocab_size, theirs.head_dim, True)
    assert cfg.layer_types == tuple(theirs.layer_types) and cfg.layer_types[5] == "full_attention"
    assert dec.sliding_windows[:6] == (1024,) * 5 + (None,)
    assert cfg.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    for kind, rope in cfg.rope.items():
        params = theirs.rope_parameters[kind]
        assert (rope.theta, rope.factor) == (params["rope_theta"], params.get("factor", 1.0)), kind


def test_an_unsupported_rope_type_is_named():
    from distload.errors import ConfigError
    from distload.models.registry import architecture

    config = {**RELEASED, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}
    with pytest.raises(ConfigError) as err:
        architecture(config).read(config, architecture(config))
    assert str(err.value) == ("config.json rope_scaling.rope_type 'yarn' is not supported for gemma3_text "
                              "(supported: default, linear)")


def test_the_embedding_is_scaled_in_its_own_dtype_as_transformers_scales_it():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from distload.models import build_model

    hidden = 2560  # sqrt(2560) = 50.596 is 50.5 in bfloat16
    config = {"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": hidden, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8}
    model = build_model(config, dtype=torch.bfloat16, device="cpu")
    theirs = Gemma3TextScaledWordEmbedding(8, hidden, 0, embed_scale=hidden ** 0.5).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        theirs.weight.copy_(model.model.embed_tokens.weight)
    seen = []
    model.model.layers["0"].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.tensor([[0, 3, 7]])
    with torch.no_grad():
        model(ids)
        assert torch.equal(seen[0], theirs(ids))
        assert not torch.equal(seen[0], model.model.embed_tokens(ids) * hidden ** 0.5)  # the rounding matters
