"""Ranks started with different checkpoints, layouts, specs or versions are refused before any
tensor data is read, naming the ranks that differ and in what."""

import json
import os

from tests import failure_jobs
from tests.hf_checkpoints import copy_checkpoint


def _disagreement(out, ranks):
    for o in out:
        assert not o["ok"]
    texts = [o["message"] for o in out if o["type"] == "DistloadError"]
    assert texts, out
    assert f"ranks {ranks} disagree with rank 0" in texts[0]
    return texts[0]


def test_a_rank_with_another_checkpoint_is_named(pool, example, tmp_path):
    other = copy_checkpoint(example, str(tmp_path / "other"))
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["rms_norm_eps"] = 1e-5
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    dirs = [example, example, other, example]
    text = _disagreement(pool.run(4, failure_jobs.load_per_rank_checkpoint, dirs, 2), [2])
    assert "in: checkpoint config (" in text  # that part alone


def test_the_same_checkpoint_at_another_path_is_fine(pool, example, tmp_path):
    same = copy_checkpoint(example, str(tmp_path / "same"))
    out = pool.run(2, failure_jobs.load_per_rank_checkpoint, [example, same], 2)
    assert all(o["ok"] for o in out), out


def test_a_rank_with_another_layout_is_named(pool, example):
    out = pool.run(4, failure_jobs.load_with_options, example, {"*": {"tp": 2}, 3: {"tp": 4}})
    text = _disagreement(out, [3])
    assert "layout" in text and "model specs" in text


def test_a_rank_with_another_version_is_named(pool, example):
    text = _disagreement(pool.run(4, failure_jobs.load_with_version, example, 2, {1: "0.0.9"}), [1])
    assert "distload version" in text


def test_a_layout_error_on_one_rank_stops_the_others(pool, example):
    out = pool.run(4, failure_jobs.load_with_options, example, {"*": {"tp": 2}, 2: {"tp": 3}})
    assert out[2]["type"] == "LayoutError"
    assert all(o["type"] == "PeerFailedError" and o["failed_rank"] == 2 for r, o in enumerate(out) if r != 2)
