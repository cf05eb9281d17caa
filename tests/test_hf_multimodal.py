"""Multimodal checkpoints written by transformers (a tiny vision tower beside the text model):
distload loads the language model that ``text_config`` describes, under the checkpoint's
``language_model.`` prefix; every vision tower and projector tensor is listed as ignored with the
rule that ignored it; parameters equal their slices and logits equal transformers' own text model
on the same weights; a deleted language-model tensor is named by its full checkpoint name.

Both wrappers run here at one rank, tp=2 and tp=2 x pp=2; the Llama 4 text decoder's own slices are
checked in test_hf_llama4.py, so its cases here check the report and logits.
"""

from __future__ import annotations

import re

import pytest
import torch

import distload
from distload.dryrun import dry_run
from distload.errors import ConfigError
from distload.models import architecture, build_model
from tests import jobs
from tests.dense_slices import expected_params
from tests.hf_checkpoints import (CheckpointCache, HFSpec, WrappedSpec, check_clean_report, as_4_52,
                                  check_only_missing, delete_tensors, read_tensors, renamed_checkpoint,
                                  token_ids)

pytest.importorskip("transformers")

SIGLIP = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 16, "patch_size": 4}
SPECS = {
    # a sliding and a global layer, tied embeddings (Gemma 3's default)
    "gemma3": WrappedSpec(
        text=HFSpec(model_type="gemma3_text", tie_word_embeddings=True, seed=31, extra={
            "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
            "query_pre_attn_scalar": 24, "final_logit_softcapping": 4.0}),
        config_class="Gemma3Config", model_class="Gemma3ForConditionalGeneration", vision=SIGLIP,
        extra={"mm_tokens_per_image": 4}),
    # layer 0 dense, layer 1 with 4 experts and a shared expert; an untied head
    "llama4": WrappedSpec(
        text=HFSpec(model_type="llama4_text", seed=32, extra={
            "intermediate_size_mlp": 128, "num_local_experts": 4, "interleave_moe_layer_step": 2,
            "attention_chunk_size": 8}),
        config_class="Llama4Config", model_class="Llama4ForConditionalGeneration",
        vision={**SIGLIP, "vision_output_dim": 32, "projector_input_dim": 64, "projector_output_dim": 64}),
}
RULES = {"gemma3": {"vision_tower.": r"^vision_tower\.", "multi_modal_projector.": r"^multi_modal_projector\."},
         "llama4": {"vision_model.": r"^vision_model\.", "multi_modal_projector.": r"^multi_modal_projector\."}}
"""per wrapper: the start of each ignored part's names -> the rule that ignores it"""
DECODERS = {"gemma3": "gemma3_text", "llama4": "llama4_text"}
TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""


@pytest.fixture(scope="session")
def mm_ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-multimodal"), SPECS)


def _ignored(name: str, directory: str, others: str = "") -> list[dict]:
    """Every checkpoint tensor outside the language model, with the rule that ignores it (each part
    under ``others``, as the layout puts it)."""
    out = []
    for tensor in sorted(read_tensors(directory)):
        rule = next((r for start, r in RULES[name].items() if tensor.startswith(others + start)), None)
        if rule is not None:
            out.append({"name": tensor, "rule": "^" + re.escape(others) + rule[1:]})
        else:
            assert tensor.startswith(("language_model.", "model.language_model.", "lm_head.")), tensor
    return out


# (wrapper, world, tp, pp): one rank, tp=2, and tp=2 x pp=2 (Gemma 3's tied head on the last stage is a
# copy of the prefixed embedding; Llama 4's stages are its dense layer and its MoE layer)
LAYOUTS = [("gemma3", 1, 1, 1), ("gemma3", 2, 2, 1), ("gemma3", 4, 2, 2), ("llama4", 1, 1, 1), ("llama4", 2, 2, 1),
           ("llama4", 4, 2, 2)]


@pytest.mark.parametrize("name,world,tp,pp", LAYOUTS, ids=[f"{n}-w{w}-tp{t}-pp{p}" for n, w, t, p in LAYOUTS])
def test_the_language_model_loads_and_the_vision_tensors_are_ignored(pool, mm_ckpts, name, world, tp, pp):
    spec = SPECS[name]
    directory = mm_ckpts.path(name)
    results = pool.run(world, jobs.load_and_forward_pp, directory, tp, pp, token_ids(spec), raise_errors=True)
    ckpt, reference, ignored = read_tensors(directory), mm_ckpts.reference_logits(name), _ignored(name, directory)
    per_stage = spec.text.num_hidden_layers // pp
    for rank, got in enumerate(results):
        report = got["report"]
        check_clean_report(report, ignored)
        assert report["notes"][0].startswith(f"loaded the language model of model_type '{name}': text_config "
                                              f"(model_type '{DECODERS[name]}'), checkpoint names under "
                                              "'language_model.'; ")
        tp_i, stage = rank % tp, rank // (world // pp)
        if name == "gemma3":  # llama4_text's own tests check its slices
            want = expected_params(ckpt, spec.text, tp, tp_i, prefix=spec.prefix, first=stage == 0,
                                   last=stage == pp - 1, layers=range(stage * per_stage, (stage + 1) * per_stage))
            assert sorted(got["state"]) == sorted(want), f"rank {rank}"
            for pname, t in want.items():
                assert (got["state"][pname] == t.numpy()).all(), f"rank {rank}: {pname} differs"
        if stage == pp - 1:
            logits = torch.from_numpy(got["logits"])
            err = ((logits - reference).abs().max() / reference.abs().max()).item()
            assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


# the registered wrappers read their layout from the checkpoint's names as the generic path does:
# Gemma 3 fine-tunes saved by transformers 4.52 to 4.57 (the text body under model.language_model.,
# the head at the top level, the vision parts under model.); no transformers writes Llama 4 so (its
# class holds language_model itself), but the same rename of its names loads too
RENAMED = [("gemma3", 2), ("llama4", 1)]


@pytest.mark.parametrize("name,world", RENAMED, ids=[f"{n}-w{w}" for n, w in RENAMED])
def test_the_language_model_of_a_renamed_checkpoint_loads(pool, mm_ckpts, tmp_path, name, world):
    spec = SPECS[name]
    directory = renamed_checkpoint(mm_ckpts.path(name), str(tmp_path / "renamed"), as_4_52)
    results = pool.run(world, jobs.load_and_forward_pp, directory, world, 1, token_ids(spec), raise_errors=True)
    ckpt, reference = read_tensors(mm_ckpts.path(name)), mm_ckpts.reference_logits(name)
    ignored = _ignored(name, directory, "model.")
    assert ignored and len(ignored) == len(_ignored(name, mm_ckpts.path(name)))
    parts = " and ".join(f"the {what} ({rule})" for what, rule in zip(
        ("vision tower" if name == "gemma3" else "vision model", "multimodal projector"),
        (r"^model\." + r[1:] for r in RULES[name].values())))
    for rank, got in enumerate(results):
        check_clean_report(got["report"], ignored)
        assert got["report"]["notes"] == [f"loaded the language model of model_type '{name}': text_config (model_type "
                                          f"'{DECODERS[name]}'), checkpoint names under 'model.language_model.' and "
                                          f"'lm_head.'; {parts} are ignored"]
        if name == "gemma3":  # a tied head: no lm_head tensor, its embedding named at the new place
            want = {as_4_52(n): t for n, t in expected_params(ckpt, spec.text, world, rank,
                                                              prefix=spec.prefix).items()}
            assert sorted(got["state"]) == sorted(want), f"rank {rank}"
            for pname, t in want.items():
                assert (got["state"][pname] == t.numpy()).all(), f"rank {rank}: {pname} differs"
        logits = torch.from_numpy(got["logits"])
        err = ((logits - reference).abs().max() / reference.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


def test_the_gemma3_report_says_which_part_was_loaded(mm_ckpts):
    report = dry_run(mm_ckpts.path("gemma3"), distload.LoadConfig(tp=2), world_size=2)
    assert report.notes == (r"loaded the language model of model_type 'gemma3': text_config (model_type "
                            r"'gemma3_text'), checkpoint names under 'language_model.'; the vision tower "
                            r"(^vision_tower\.) and the multimodal projector (^multi_modal_projector\.) are ignored",)
    text = report.format_text(limit=1)
    assert "  ignored (34), by an ignore rule:\n    multi_modal_projector.mm_input_projection_weight  " \
           r"(rule ^multi_modal_projector\.)" in text


@pytest.mark.parametrize("name", ["gemma3", "llama4"])
def test_a_deleted_language_model_tensor_is_named_by_its_full_name(pool, mm_ckpts, name):
    directory = mm_ckpts.copy(name)
    deleted = "language_model.model.layers.0.self_attn.k_proj.weight"
    delete_tensors(directory, [deleted])
    check_only_missing(pool, directory, deleted)


def _read(config: dict):
    arch = architecture(config)
    return arch.read(config, arch)


def test_a_text_config_of_a_type_distload_does_not_build_is_named():
    with pytest.raises(ConfigError) as err:
        _read({"model_type": "gemma3", "text_config": {"model_type": "bert", "num_hidden_layers": 2}})
    assert str(err.value) == ("config.json text_config.model_type 'bert' is not a language model distload builds, "
                              "so model_type 'gemma3' cannot be loaded (it expects 'gemma3_text')")


def test_a_bad_text_config_field_is_named_inside_text_config():
    with pytest.raises(ConfigError) as err:
        _read({"model_type": "gemma3", "text_config": {"num_hidden_layers": 2, "hidden_size": 0}})
    assert str(err.value) == "config.json text_config: hidden_size must be a positive integer, got 0"
    with pytest.raises(ConfigError) as err:
        _read({"model_type": "gemma3", "text_config": None})
    assert str(err.value) == ("config.json text_config must be an object (the language model's config, which "
                              "model_type 'gemma3' nests), got null")


GEMMA3 = {"model_type": "gemma3", "text_config": {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
                                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                                  "head_dim": 4}}
"""a tiny Gemma 3 config.json"""


def test_names_of_two_layouts_are_an_error_for_a_registered_wrapper():
    with pytest.raises(ConfigError) as err:  # both bodies
        architecture(GEMMA3, ["language_model.model.norm.weight", "model.language_model.norm.weight"])
    assert err.value.message == (
        "config.json model_type 'gemma3': the checkpoint's names fit more than one of the layouts looked for: "
        "language_model.model.*, language_model.lm_head.* (transformers 5 and before 4.52) or model.language_model.*, "
        "lm_head.* (transformers 4.52 to 4.57)")
    with pytest.raises(ConfigError) as err:  # one body, the other layout's head
        architecture({**GEMMA3, "model_type": "llama4"}, ["model.language_model.norm.weight", "lm_head.weight",
                                                          "language_model.lm_head.weight"])
    assert err.value.message == (
        "config.json model_type 'llama4': the checkpoint's names mix two layouts: 'model.language_model.norm.weight' "
        "is where transformers 4.52 to 4.57 put the language model, and 'language_model.lm_head.weight' where "
        "transformers 5 and before 4.52 put its head")


def test_build_model_without_tensor_names_builds_the_transformers_5_layout():
    names = [n for n, _ in build_model(GEMMA3).named_parameters()]
    assert names[0] == "language_model.model.embed_tokens.weight" and names[-1] == "language_model.model.norm.weight"
    names = [n for n, _ in build_model(GEMMA3, tensor_names=["model.language_model.norm.weight"]).named_parameters()]
    assert names[0] == "model.language_model.embed_tokens.weight"
