"""A Hugging Face repo id instead of a path: found in the local Hugging Face cache, never downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import distload
from distload import __main__ as cli_main
from distload.checkpoint.hub_cache import hub_cache_dir, resolve_checkpoint
from tests.hub_cache import cache_repo


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    return cache


def test_a_cached_repo_id_loads_like_its_directory(hub, tmp_path, capsys):
    from huggingface_hub import try_to_load_from_cache
    snapshot = cache_repo(hub, "acme/tiny-llama", distload.example_checkpoint())
    assert resolve_checkpoint("acme/tiny-llama") == snapshot
    # huggingface_hub's own offline lookup finds the same files
    assert try_to_load_from_cache("acme/tiny-llama", "config.json", cache_dir=hub) == \
        os.path.join(snapshot, "config.json")
    assert cli_main.main(["acme/tiny-llama", "--device", "cpu", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True and report["checkpoint"] == snapshot


def test_revisions_by_ref_and_by_commit(hub):
    v2 = cache_repo(hub, "acme/tiny-llama", distload.example_checkpoint(), commit="b" * 40, revision="v2")
    assert resolve_checkpoint("acme/tiny-llama@v2") == v2
    assert resolve_checkpoint(f"acme/tiny-llama@{'b' * 40}") == v2


def test_a_repo_id_not_in_the_cache_says_how_to_get_it(hub, capsys):
    assert cli_main.main(["acme/absent", "--device", "cpu", "--quiet"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "distload: error: acme/absent is no local directory, and the Hugging Face cache has no snapshot of it at "
        "revision main; distload reads local files only (it never downloads): fetch it first with "
        f"`hf download acme/absent` (huggingface_hub), or pass its directory [file {hub}, rank 0]"]


def test_an_existing_path_is_never_taken_for_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("acme/tiny-llama")
    assert resolve_checkpoint("acme/tiny-llama") == "acme/tiny-llama"


@pytest.mark.parametrize("env", [{}, {"HF_HOME": "/srv/hf"}, {"XDG_CACHE_HOME": "/srv/xdg"},
                                 {"HF_HUB_CACHE": "/srv/hub", "HF_HOME": "/srv/hf"}])
def test_the_cache_is_where_huggingface_hub_looks(env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")}
    theirs = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"],
                            env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert hub_cache_dir({**clean, **env}) == theirs
