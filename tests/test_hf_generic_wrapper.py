"""LLaVA checkpoints written by transformers (tiny CLIP vision tower, tiny llama / qwen2 decoder):
``llava`` is no registered model type, but its ``text_config`` names a built-in decoder, so distload
loads that language model where the checkpoint's names put it (``language_model.*`` as transformers 5
writes it, or ``model.language_model.*`` with a top-level ``lm_head.*`` as 4.52 to 4.57 wrote it,
made here by renaming a written checkpoint's tensors). Every other tensor is listed as ignored with
the rule of its part; parameters equal their slices and logits equal transformers' own text model
on the same weights; a deleted language-model tensor is named by its full checkpoint name.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import distload
from distload.dryrun import dry_run
from distload.errors import ConfigError
from distload.models import architecture, build_model, supported_model_types
from tests import jobs
from tests.dense_slices import expected_params
from tests.hf_checkpoints import (CheckpointCache, HFSpec, WrappedSpec, check_clean_report, check_only_missing,
                                  as_4_52, delete_tensors, read_tensors, renamed_checkpoint, token_ids)

pytest.importorskip("transformers")

CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 16, "patch_size": 4}
SPECS = {
    # an untied head (LLaVA's default)
    "llava": WrappedSpec(text=HFSpec(model_type="llama", seed=41), config_class="LlavaConfig",
                         model_class="LlavaForConditionalGeneration", vision=CLIP, extra={"image_token_index": 5}),
    # q/k/v biases and a tied head: no lm_head tensor in the checkpoint
    "llava_qwen2": WrappedSpec(text=HFSpec(model_type="qwen2", vocab_size=96, tie_word_embeddings=True, seed=42),
                               config_class="LlavaConfig", model_class="LlavaForConditionalGeneration", vision=CLIP,
                               extra={"image_token_index": 5}),
}
PARTS = ("vision_tower.", "multi_modal_projector.")
"""what LLaVA has beside its language model"""
TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""


@pytest.fixture(scope="session")
def llava_ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-llava"), SPECS)


def _ignored(directory: str, start: str) -> list[dict]:
    """Every checkpoint tensor outside the language model, with the rule of its part."""
    out = []
    for tensor in sorted(read_tensors(directory)):
        part = next((start + p for p in PARTS if tensor.startswith(start + p)), None)
        if part is not None:
            out.append({"name": tensor, "rule": "^" + part.replace(".", r"\.")})
    return out


def _note(text_type: str, where: str, writers: str, start: str = "") -> str:
    return (f"loaded the language model through the generic path for an unregistered wrapper type: model_type "
            f"'llava' has no registered wrapper, its text_config (model_type '{text_type}') was read as the decoder, "
            f"checkpoint names under {where} (the layout {writers} write); nothing checked the other parts "
            f"({start}multi_modal_projector., {start}vision_tower.), which are ignored")


def _check(results, reference, ignored, note: str, want=None) -> None:
    """Each rank's report is complete with ``ignored`` and ``note``; its parameters equal ``want(rank)``
    (when given); the last stage's logits equal ``reference``."""
    for rank, got in enumerate(results):
        report = got["report"]
        check_clean_report(report, ignored)
        assert report["notes"] == [note]
        if want is not None:
            expected = want(rank)
            assert sorted(got["state"]) == sorted(expected), f"rank {rank}"
            for pname, t in expected.items():
                assert (got["state"][pname] == t.numpy()).all(), f"rank {rank}: {pname} differs"
        if got["logits"] is not None:
            logits = torch.from_numpy(got["logits"])
            err = ((logits - reference).abs().max() / reference.abs().max()).item()
            assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


LAYOUTS = [("llava", 1, 1, 1), ("llava", 2, 2, 1), ("llava_qwen2", 2, 2, 1)]


@pytest.mark.parametrize("name,world,tp,pp", LAYOUTS, ids=[f"{n}-w{w}-tp{t}-pp{p}" for n, w, t, p in LAYOUTS])
def test_the_language_model_of_a_transformers_5_llava_loads(pool, llava_ckpts, name, world, tp, pp):
    spec, directory = SPECS[name], llava_ckpts.path(name)
    results = pool.run(world, jobs.load_and_forward_pp, directory, tp, pp, token_ids(spec), raise_errors=True)
    ckpt = read_tensors(directory)
    _check(results, llava_ckpts.reference_logits(name), _ignored(directory, ""),
           _note(spec.text.model_type, "'language_model.'", "transformers 5 and before 4.52"),
           want=lambda rank: expected_params(ckpt, spec.text, tp, rank % tp, prefix="language_model."))


# the 4.52 layout moves the decoder's parts apart: a tied head there names the moved embedding, and
# on a later pipeline stage holds its own copy of it
RENAMED = [("llava", 2, 2, 1), ("llava_qwen2", 2, 2, 1), ("llava_qwen2", 2, 1, 2)]


@pytest.mark.parametrize("name,world,tp,pp", RENAMED, ids=[f"{n}-w{w}-tp{t}-pp{p}" for n, w, t, p in RENAMED])
def test_the_language_model_of_a_transformers_4_52_llava_loads(pool, llava_ckpts, tmp_path, name, world, tp, pp):
    spec = SPECS[name]
    directory = renamed_checkpoint(llava_ckpts.path(name), str(tmp_path / "renamed"), as_4_52)
    results = pool.run(world, jobs.load_and_forward_pp, directory, tp, pp, token_ids(spec), raise_errors=True)
    ckpt = read_tensors(llava_ckpts.path(name))  # transformers 5's names, to compare by
    per_stage = spec.text.num_hidden_layers // pp

    def want(rank: int) -> dict:
        stage = rank // (world // pp)
        mine = expected_params(ckpt, spec.text, tp, rank % tp, prefix="language_model.", first=stage == 0,
                               last=stage == pp - 1, layers=range(stage * per_stage, (stage + 1) * per_stage))
        return {as_4_52(n): t for n, t in mine.items()}

    _check(results, llava_ckpts.reference_logits(name), _ignored(directory, "model."),
           _note(spec.text.model_type, "'model.language_model.' and 'lm_head.'", "transformers 4.52 to 4.57", "model."),
           want=want)


def test_a_deleted_language_model_tensor_is_named_by_its_full_name(pool, llava_ckpts):
    directory = llava_ckpts.copy("llava")
    deleted = "language_model.model.layers.1.mlp.up_proj.weight"
    delete_tensors(directory, [deleted])
    check_only_missing(pool, directory, deleted)


BUILT_IN = ", ".join(supported_model_types())
RULES_HINT = ("to load it anyway, give a rules file saying how its tensors split: --rules rules.json, "
              "or LoadConfig(rules=...)")


def _with_config(llava_ckpts, change) -> str:
    return _edit_config(llava_ckpts.copy("llava"), change)


def _edit_config(directory: str, change) -> str:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return directory


def test_a_text_config_naming_a_decoder_distload_does_not_build_is_an_error(llava_ckpts):
    directory = _with_config(llava_ckpts, lambda c: c["text_config"].update(model_type="bert"))
    with pytest.raises(ConfigError) as err:
        dry_run(directory, distload.LoadConfig(tp=2), world_size=2)
    assert err.value.message == ("config.json model_type 'llava' has no built-in model, and its text_config.model_type "
                                 f"'bert' is no language model distload builds (built in: {BUILT_IN}); {RULES_HINT}")
    assert err.value.file == os.path.join(directory, "config.json")
    with pytest.raises(ConfigError) as err:  # a wrapper is no decoder
        architecture({"model_type": "llava", "text_config": {"model_type": "gemma3"}}, ["language_model.model.x"])
    assert "its text_config.model_type 'gemma3' is no language model distload builds" in err.value.message


def test_a_checkpoint_in_no_known_layout_is_an_error_naming_the_layouts():
    with pytest.raises(ConfigError) as err:
        architecture({"model_type": "llava", "text_config": {"model_type": "llama"}},
                     ["text_model.layers.0.mlp.up_proj.weight", "vision_tower.x"])
    assert err.value.message == (
        "config.json model_type 'llava' has no built-in model; its text_config (model_type 'llama') is built in, "
        "but the checkpoint's names fit none of the layouts looked for: language_model.model.*, "
        "language_model.lm_head.* (transformers 5 and before 4.52) or model.language_model.*, lm_head.* "
        f"(transformers 4.52 to 4.57) (built in: {BUILT_IN}); {RULES_HINT}")
    with pytest.raises(ConfigError) as err:  # names in both layouts
        architecture({"model_type": "llava", "text_config": {"model_type": "llama"}},
                     ["language_model.model.norm.weight", "model.language_model.norm.weight"])
    assert "but the checkpoint's names fit more than one of the layouts looked for: " in err.value.message
    with pytest.raises(ConfigError) as err:  # no text_config: the plain message
        architecture({"model_type": "llava"}, ["language_model.model.x"])
    assert err.value.message == (f"config.json model_type 'llava' has no built-in model (built in: {BUILT_IN}); "
                                 f"{RULES_HINT}")


TEXT = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2}
"""a tiny llama text_config"""
EMBED_ONLY = ["language_model.model.embed_tokens.weight"]
WITH_HEAD = [*EMBED_ONLY, "language_model.lm_head.weight"]


def _tied(top: dict, text: dict, names=EMBED_ONLY) -> bool:
    config = {"model_type": "llava", **top, "text_config": {**TEXT, **text}}
    arch = architecture(config, names)
    return arch.read(config, arch).decoder.tie_word_embeddings


FRAME = "config.json model_type 'llava' has no built-in model; its text_config (model_type 'llama') is built in, but "
"""what the unknown model type's error says before why the generic path cannot load it"""
MIXED = ("the checkpoint's names mix two layouts: {body} is where transformers 5 and before 4.52 put the language model, "
         "and {head} where transformers 4.52 to 4.57 put its head")


def test_a_head_where_another_layout_puts_it_is_an_error_naming_both_tensors(llava_ckpts, tmp_path):
    # transformers 5's body with its head at the top level, and config.json silent on tying: the head
    # must neither be ignored nor read as absent (a tied head would load complete, and wrong)
    directory = renamed_checkpoint(llava_ckpts.path("llava"), str(tmp_path / "mixed"),
                                   lambda n: "lm_head.weight" if n == "language_model.lm_head.weight" else n)
    _edit_config(directory, lambda c: [c.pop("tie_word_embeddings", None),
                                       c["text_config"].pop("tie_word_embeddings", None)])
    with pytest.raises(ConfigError) as err:
        dry_run(directory, distload.LoadConfig(), world_size=1)
    why = MIXED.format(body="'language_model.model.embed_tokens.weight'", head="'lm_head.weight'")
    assert err.value.message == f"{FRAME}{why} (built in: {BUILT_IN}); {RULES_HINT}"
    assert err.value.file == os.path.join(directory, "config.json")


def test_a_mixed_layout_is_an_error_whatever_the_head_is_named():
    config = {"model_type": "llava", "text_config": TEXT}
    for names, body, head in (
            # the mirror: 4.52's body, transformers 5's head (it would be ignored as a part ^language_model\.)
            (["model.language_model.norm.weight", "language_model.lm_head.weight", "model.vision_tower.x"],
             "model.language_model.norm.weight", "language_model.lm_head.weight"),
            # a quantized head is the head too
            (["language_model.model.embed_tokens.weight", "lm_head.qweight", "lm_head.scales"],
             "language_model.model.embed_tokens.weight", "lm_head.qweight")):
        with pytest.raises(ConfigError) as err:
            architecture(config, names)
        bodies = ("transformers 4.52 to 4.57", "transformers 5 and before 4.52")[body.startswith("language_model.")]
        heads = ("transformers 4.52 to 4.57", "transformers 5 and before 4.52")[head.startswith("language_model.")]
        assert err.value.message == (
            f"{FRAME}the checkpoint's names mix two layouts: '{body}' is where {bodies} put the language model, and "
            f"'{head}' where {heads} put its head (built in: {BUILT_IN}); {RULES_HINT}")


def test_the_head_is_tied_when_the_top_level_or_the_text_config_says_so():
    # as transformers' LlavaConfig: its own flag, or text_config's forwarded; the checkpoint is not asked
    for names in (EMBED_ONLY, WITH_HEAD):
        assert _tied({"tie_word_embeddings": False}, {}, names) is False
        assert _tied({}, {"tie_word_embeddings": False}, names) is False
        assert _tied({"tie_word_embeddings": True}, {"tie_word_embeddings": False}, names) is True
        assert _tied({"tie_word_embeddings": False}, {"tie_word_embeddings": True}, names) is True
        assert _tied({}, {"tie_word_embeddings": True}, names) is True


def _said_nothing(names) -> tuple[bool, str]:
    config = {"model_type": "llava", "text_config": TEXT}
    arch = architecture(config, names)
    return arch.read(config, arch).decoder.tie_word_embeddings, arch.notes(config)[0]


def test_where_no_config_level_says_the_checkpoint_decides_the_tying():
    # transformers 5 defaults differ by wrapper class (LLaVA untied, Mistral 3 / InternVL tied)
    lead = "config.json sets no tie_word_embeddings, so the head is "
    tied, note = _said_nothing(EMBED_ONLY)
    assert tied is True
    assert (f"(the layout transformers 5 and before 4.52 write); {lead}tied, as the checkpoint holds "
            "'language_model.model.embed_tokens.weight' and no 'language_model.lm_head.*' tensor; nothing checked") in note
    tied, note = _said_nothing(WITH_HEAD)
    assert tied is False
    assert f"{lead}untied, as the checkpoint holds 'language_model.lm_head.weight'; " in note
    tied, note = _said_nothing(["model.language_model.embed_tokens.weight", "lm_head.weight"])
    assert tied is False and f"{lead}untied, as the checkpoint holds 'lm_head.weight'; " in note
    assert _said_nothing(["model.language_model.embed_tokens.weight"])[0] is True
    tied, note = _said_nothing(["language_model.model.norm.weight"])  # no embedding either: both show as missing
    assert tied is False and (f"{lead}untied, as the checkpoint holds no 'language_model.lm_head.*' tensor and no "
                              "'language_model.model.embed_tokens.weight' to tie it to; ") in note


def test_a_quantized_head_is_a_head():
    # a head stored as GPTQ's qweight or compressed-tensors' weight_packed has no lm_head.weight
    for names, held in ((["language_model.model.embed_tokens.weight", "language_model.lm_head.qweight",
                          "language_model.lm_head.scales"], "language_model.lm_head.qweight"),
                        (["model.language_model.embed_tokens.weight", "lm_head.weight_packed", "lm_head.weight_scale"],
                         "lm_head.weight_packed")):
        tied, note = _said_nothing(names)
        assert tied is False, names
        assert f"so the head is untied, as the checkpoint holds '{held}'; " in note


def test_build_model_without_tensor_names_says_so_and_takes_them():
    config = {"model_type": "llava", "text_config": TEXT}
    with pytest.raises(ConfigError) as err:
        build_model(config)
    assert err.value.message == (
        "config.json model_type 'llava' has no built-in model; its text_config (model_type 'llama') is built in, "
        "but no checkpoint tensor names were given to read where its language model sits (build_model takes "
        f"them: tensor_names=...) (built in: {BUILT_IN}); {RULES_HINT}")
    model = build_model(config, tensor_names=["model.language_model.embed_tokens.weight", "lm_head.weight"])
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "model.language_model.embed_tokens.weight" and names[-2:] == [
        "model.language_model.norm.weight", "lm_head.weight"]


def test_each_part_outside_the_language_model_is_ignored_by_its_own_rule():
    config = {"model_type": "llava_next", "text_config": {"model_type": "mistral"}}
    names = ["model.language_model.norm.weight", "lm_head.weight", "image_newline", "model.vision_tower.a.weight",
             "model.vision_tower.b.weight", "model.multi_modal_projector.linear_1.weight", "lm_head_extra.weight"]
    assert architecture(config, names).ignores(config) == (
        r"^image_newline$", r"^lm_head_extra\.", r"^model\.multi_modal_projector\.", r"^model\.vision_tower\.")
    # a part's rule never covers where a layout puts the head (^language_model\. would cover language_model.lm_head.*)
    names = ["model.language_model.norm.weight", "lm_head.weight", "language_model.connector.weight"]
    assert architecture(config, names).ignores(config) == (r"^language_model\.connector\.",)
