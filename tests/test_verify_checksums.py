"""--verify-checksums: every file a load reads is hashed whole against the Hugging Face cache's blob
names or the checkpoint's manifest; a file that differs is named with the rank that hashed it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import distload
from distload import __main__ as cli_main
from distload.checkpoint.digests import CHUNK_BYTES, GIT_SHA1, SHA256, file_digest
from distload.examples import EXAMPLE_SHARDS
from distload.manifest import write_manifest
from distload.verify import assign
from tests import jobs
from tests.hub_cache import blob_of, cache_repo, etag, flip_last_byte

SHARD1, SHARD2 = EXAMPLE_SHARDS
INDEX = "model.safetensors.index.json"
NAMES = ["config.json", SHARD1, SHARD2, INDEX]
VERIFY = {"verify_checksums": True}


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def hub(tmp_path):
    """The example checkpoint as a snapshot of a Hugging Face cache (blobs named by their etags)."""
    return cache_repo(str(tmp_path / "hub"), "acme/tiny-llama", distload.example_checkpoint())


@pytest.fixture()
def listed(tmp_path):
    """A copy of the example checkpoint with its manifest."""
    import shutil
    directory = shutil.copytree(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    write_manifest(directory)
    return directory


def _checkpoint(kind: str, hub: str, listed: str) -> str:
    return {"hub": hub, "manifest": listed}[kind]


def _file(kind: str, directory: str, name: str) -> str:
    """The bytes behind ``name``: the blob in the cache, the file itself beside a manifest."""
    path = os.path.join(directory, name)
    return blob_of(path) if kind == "hub" else path


def _sizes(directory: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(directory, n)) for n in NAMES}


# ---- digests, and which rank hashes what -----------------------------------------------------

@pytest.mark.parametrize("size", [0, 5, CHUNK_BYTES + 3])
def test_digests_are_the_ones_sha256sum_git_and_huggingface_hub_compute(tmp_path, size):
    from huggingface_hub.utils.sha import git_hash
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    sha256 = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert file_digest(str(path), SHA256) == (sha256, size)
    assert file_digest(str(path), GIT_SHA1) == (git, size) and git == git_hash(path.read_bytes())


def test_the_test_cache_names_blobs_as_the_hub_does(hub):
    from huggingface_hub.utils.sha import git_hash
    for name in NAMES:
        data = open(os.path.join(hub, name), "rb").read()
        want = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_hash(data)
        assert os.path.basename(blob_of(os.path.join(hub, name))) == want == etag(os.path.join(hub, name))


@pytest.mark.parametrize("sizes,num_local", [([5, 3, 3, 1], 2), ([7] * 9, 4), ([1, 100, 2, 50, 3], 3),
                                             ([4, 4], 8), (list(range(1, 40)), 8)])
def test_the_ranks_of_a_node_split_the_files_largest_first(sizes, num_local):
    owners = assign(sizes, num_local)
    assert len(owners) == len(sizes) and all(0 <= o < num_local for o in owners)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(num_local)]
    assert max(load) <= sum(sizes) / num_local + max(sizes)  # the bound of largest-first greedy
    assert len({o for o in owners}) == min(num_local, len(sizes))
    assert owners == assign(list(sizes), num_local)


# ---- loads ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("kind", ["hub", "manifest"])
def test_an_intact_checkpoint_verifies_every_file_once_per_node(pool, hub, listed, kind, world):
    directory = _checkpoint(kind, hub, listed)
    out = pool.run(world, jobs.load_outcome, directory, 2 if world == 4 else 1, VERIFY)
    for o in out:
        assert not o["raised"] and o["report"]["ok"] and o["report"]["complete"], o
    report = out[0]["report"]
    verification = report["verification"]
    algorithms = {n: SHA256 if kind == "manifest" or n.endswith(".safetensors") else GIT_SHA1 for n in NAMES}
    assert verification["ok"] and verification["reference"] == {"hub": "huggingface-cache", "manifest": "manifest"}[kind]
    assert [(f["name"], f["status"], f["algorithm"], f["hashes"]) for f in verification["files"]] == \
        [(n, "verified", algorithms[n], 1) for n in sorted(NAMES)]
    hashed = [r["bytes_hashed"] for r in report["ranks"]]
    assert sum(hashed) == verification["bytes_hashed"] == sum(_sizes(directory).values())  # each file once
    assert sum(1 for b in hashed if b) == min(world, len(NAMES))  # the node's ranks split the files


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("kind", ["hub", "manifest"])
def test_one_flipped_byte_in_one_shard_is_named_with_the_rank_that_hashed_it(pool, hub, listed, kind, world):
    directory = _checkpoint(kind, hub, listed)
    flip_last_byte(_file(kind, directory, SHARD2))
    out = pool.run(world, jobs.load_outcome, directory, 2 if world == 4 else 1, VERIFY)
    for rank, o in enumerate(out):
        assert o["raised"] and o["message"] == \
            f"load not usable: 1 file failed verification ({SHARD2}) [rank {rank}]", o
    report = out[0]["report"]
    assert report["complete"] is False and report["ok"] is False
    assert report["missing"] == [] and report["inconsistent"] == []  # tracking alone sees nothing wrong
    by_name = {f["name"]: f for f in report["verification"]["files"]}
    bad = by_name.pop(SHARD2)
    assert bad["status"] == "differs" and len(bad["failed_on"]) == 1 and bad["hashes"] == 1
    assert report["ranks"][bad["failed_on"][0]]["bytes_hashed"] >= os.path.getsize(os.path.join(directory, SHARD2))
    assert all(f["status"] == "verified" for f in by_name.values())


def test_on_two_nodes_each_node_hashes_every_file_and_both_name_the_flipped_one(pool, hub):
    flip_last_byte(blob_of(os.path.join(hub, SHARD2)))
    out = pool.run(4, jobs.load_on_nodes, hub, 2, 2, VERIFY)
    assert all(o["raised"] for o in out)
    report = out[0]["report"]
    files = {f["name"]: f for f in report["verification"]["files"]}
    assert all(f["hashes"] == 2 for f in files.values())  # once on each node
    assert sum(r["bytes_hashed"] for r in report["ranks"]) == 2 * sum(_sizes(hub).values())
    node_of = {r: r // 2 for r in range(4)}
    assert sorted(node_of[r] for r in files[SHARD2]["failed_on"]) == [0, 1]


def test_hashing_runs_beside_the_reads(monkeypatch, listed):
    """Each hash waits (up to 10 s) for the executor's first read and then hashes: the intervals
    overlap only if hashing is in flight while the executor reads; hashed after the reads, or
    before them, they do not."""
    import threading
    import time
    from distload import execute, verify
    first_read = threading.Event()
    hashes, reads = [], []
    digest, place = verify.file_digest, execute._Job._place_cpu

    def hashing(*args, **kwargs):
        start = time.monotonic()
        first_read.wait(10)
        got = digest(*args, **kwargs)
        hashes.append((start, time.monotonic()))
        return got

    def reading(self, *args, **kwargs):
        start = time.monotonic()
        first_read.set()
        place(self, *args, **kwargs)
        reads.append((start, time.monotonic()))

    monkeypatch.setattr(verify, "file_digest", hashing)
    monkeypatch.setattr(execute._Job, "_place_cpu", reading)
    loaded = distload.load(listed, distload.LoadConfig(device="cpu", verify_checksums=True,
                                                       extra_config={"num_read_threads": 2}))
    assert loaded.report.verification.ok and len(hashes) == len(NAMES) and reads
    assert min(s for s, _ in hashes) < max(e for _, e in reads), "hashing began after the last read"
    assert min(s for s, _ in reads) < max(e for _, e in hashes), "hashing ended before the first read"
    assert not any(t.name.startswith("distload-verify") for t in threading.enumerate())  # joined before returning


def _cli(tmp_path, capsys, *args: str) -> tuple[int, str, str, dict]:
    path = tmp_path / "r.json"
    code = cli_main.main([*args, "--device", "cpu", "--quiet", "--json", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err, json.loads(path.read_text())


def test_an_edited_config_json_is_named_as_a_git_blob(tmp_path, capsys, hub):
    blob = blob_of(os.path.join(hub, "config.json"))
    with open(blob, "ab") as f:
        f.write(b"\n")  # still the same JSON
    code, out, _, report = _cli(tmp_path, capsys, hub, "--verify-checksums")
    assert code == 3 and not report["ok"]
    assert f"  verified: 3 of 4 files against the Hugging Face cache's blob names in {os.path.dirname(blob)} " \
           "(sha256; git blob SHA-1 for small files); " in out
    assert f"  verification failed (1):\n    config.json  (its git-sha1 differs from the reference " \
           f"{os.path.basename(blob)}; hashed by rank 0)" in out


def test_a_missing_blob_is_named(tmp_path, capsys, hub):
    blob = blob_of(os.path.join(hub, SHARD1))
    os.remove(blob)
    code, _, err, report = _cli(tmp_path, capsys, hub, "--verify-checksums")
    assert code == 1 and report["error"]["file"] == os.path.join(hub, SHARD1)
    assert err.strip().splitlines() == [
        f"distload: error: cannot read safetensors file: No such file or directory (it links to blob "
        f"{os.path.basename(blob)}, which is missing from the Hugging Face cache: fetch the repo again "
        f"(`hf download`)) [file {os.path.join(hub, SHARD1)}, rank 0]"]


def _missing(name: str, rank: int, directory: str, why: str) -> str:
    return f"{why} [file {os.path.join(directory, name)}, tensor {_first_tensor(directory, name)}, rank {rank}]"


def _first_tensor(directory: str, name: str) -> str:
    """The first tensor (by name) the index places in ``name``."""
    index = json.load(open(os.path.join(directory, INDEX)))["weight_map"]
    return min(t for t, f in index.items() if f == name)


def test_a_missing_blob_is_named_at_world_4(pool, hub):
    blob = blob_of(os.path.join(hub, SHARD1))
    os.remove(blob)
    out = pool.run(4, jobs.load_outcome, hub, 2, VERIFY)
    for rank, err in enumerate(out):
        assert isinstance(err, distload.CheckpointError) and str(err) == \
            f"cannot read safetensors file: No such file or directory (it links to blob {os.path.basename(blob)}, " \
            f"which is missing from the Hugging Face cache: fetch the repo again (`hf download`)) " \
            f"[file {os.path.join(hub, SHARD1)}, rank {rank}]", err


@pytest.mark.parametrize("kind", ["hub", "manifest"])
def test_a_shard_removed_while_the_index_names_it_is_named_at_world_4(pool, hub, listed, kind):
    directory = _checkpoint(kind, hub, listed)
    os.remove(os.path.join(directory, SHARD2))  # the snapshot's link, or the file beside the manifest
    out = pool.run(4, jobs.load_outcome, directory, 2, VERIFY)
    for rank, err in enumerate(out):
        assert isinstance(err, distload.CheckpointError) and str(err) == \
            _missing(SHARD2, rank, directory, f"the index names {SHARD2}, which does not exist"), err


def _relist(directory: str) -> None:
    """Writes the manifest again, of the folder as it is now."""
    os.remove(os.path.join(directory, "distload-manifest.json"))
    write_manifest(directory)


def _change(listed: str, change: str, name: str) -> None:
    """Makes the folder differ from its manifest by ``name``: ``removed``, ``added`` beside the index
    (the load does not read it), ``added, read`` to a checkpoint without an index (it reads it),
    ``added, listed`` (and the manifest written again), or ``replaced`` by other bytes of one size."""
    from safetensors.torch import save_file
    if change == "removed":
        os.remove(os.path.join(listed, name))
        return
    if change == "replaced":
        flip_last_byte(os.path.join(listed, name))
        return
    if change == "added, read":  # without an index every *.safetensors file is read
        os.remove(os.path.join(listed, INDEX))
        _relist(listed)
    path = os.path.join(listed, name)
    if name.endswith((".bin", ".pt")):
        torch.save({"extra.weight": torch.ones(2)}, path)
    else:
        save_file({"extra.weight": torch.ones(2)}, path, metadata={"format": "pt"})
    if change == "added, listed":
        _relist(listed)


MISMATCHES = [  # files the load reads (or its index): each one fails it
    ("removed", INDEX, "absent", "in the manifest, not in the folder"),
    ("added, read", "model-extra.safetensors", "unlisted", "in the folder, not in the manifest"),
]
UNHASHED_ENTRY = {"algorithm": None, "expected": None, "hashes": 0, "failed_on": [], "size": None,
                  "expected_size": None, "seen_on": None}


@pytest.mark.parametrize("change,name,status,why", MISMATCHES)
def test_a_manifest_that_does_not_match_the_folder_is_named(tmp_path, capsys, listed, change, name, status, why):
    _change(listed, change, name)
    code, out, _, report = _cli(tmp_path, capsys, listed, "--verify-checksums")
    assert code == 3 and report["complete"] is False and report["missing"] == []
    failed = [f for f in report["verification"]["files"] if f["status"] != "verified"]
    assert failed == [{"name": name, "status": status, **UNHASHED_ENTRY}]
    assert f"  verification failed (1):\n    {name}  ({why})" in out


@pytest.mark.parametrize("change,name,status", [m[:3] for m in MISMATCHES])
def test_a_manifest_that_does_not_match_the_folder_is_named_at_world_4(pool, listed, change, name, status):
    _change(listed, change, name)
    out = pool.run(4, jobs.load_outcome, listed, 2, VERIFY)
    for rank, o in enumerate(out):
        assert o["raised"] and o["message"] == \
            f"load not usable: 1 file failed verification ({name}) [rank {rank}]", o
        failed = [f for f in o["report"]["verification"]["files"] if f["status"] != "verified"]
        assert failed == [{"name": name, "status": status, **UNHASHED_ENTRY}]


TWIN = "pytorch_model.bin"  # the pickled copy of the safetensors shards that many repos carry
WHY_UNREAD = {"present-unread": "in the manifest and the folder; not hashed",
              "unlisted-unread": "in the folder, not in the manifest",
              "absent-unread": "in the manifest, not in the folder"}
GONE_TWIN = [("added, listed", TWIN), ("removed", TWIN)]
UNREAD = [  # (changes, the unread files' statuses, the report's note)
    ([("added", "model-extra.safetensors")], {"model-extra.safetensors": "unlisted-unread"},
     "1 weight file in the folder was not read by this load and not verified: model-extra.safetensors"),
    (GONE_TWIN, {TWIN: "absent-unread"}, f"1 file the manifest lists is gone: {TWIN}"),
    # not read, so not hashed: other bytes behind a listed name go unseen, and the note says so
    ([("added, listed", TWIN), ("replaced", TWIN)], {TWIN: "present-unread"},
     f"1 weight file in the folder was not read by this load and not verified: {TWIN}"),
    ([("added", "optimizer.pt")], {"optimizer.pt": "unlisted-unread"},
     "1 weight file in the folder was not read by this load and not verified: optimizer.pt"),
    ([*GONE_TWIN, *(("added", n) for n in ("training_args.bin", "adapter_model.safetensors",
                                           "consolidated.safetensors", "optimizer.pt"))],
     {"adapter_model.safetensors": "unlisted-unread", "consolidated.safetensors": "unlisted-unread",
      "optimizer.pt": "unlisted-unread", TWIN: "absent-unread", "training_args.bin": "unlisted-unread"},
     "4 weight files in the folder were not read by this load and not verified: adapter_model.safetensors, "
     f"consolidated.safetensors, optimizer.pt and 1 more; 1 file the manifest lists is gone: {TWIN}"),
]


def _check_unread(report: dict, unread: dict[str, str], note: str, directory: str) -> None:
    """The unread files are named with their status, the note says so, and the load is ok."""
    assert report["ok"] and report["complete"] and report["verification"]["ok"], report
    files = report["verification"]["files"]
    assert [f for f in files if f["name"] in unread] == \
        [{"name": n, "status": unread[n], **UNHASHED_ENTRY} for n in sorted(unread)]
    assert [(f["name"], f["status"]) for f in files if f["name"] not in unread] == \
        [(n, "verified") for n in sorted(NAMES)]
    assert report["notes"] == [note]
    assert report["verification"]["bytes_hashed"] == sum(_sizes(directory).values())  # only what was read


@pytest.mark.parametrize("changes,unread,note", UNREAD)
def test_weight_files_the_load_does_not_read_are_named_and_do_not_fail_it(tmp_path, capsys, listed, changes,
                                                                          unread, note):
    for change, name in changes:
        _change(listed, change, name)
    code, out, _, report = _cli(tmp_path, capsys, listed, "--verify-checksums")
    assert code == 0
    _check_unread(report, unread, note, listed)
    assert f"  verified: 4 of 4 files against the manifest {listed}/distload-manifest.json (sha256); " in out
    assert "\n".join([f"  not read by this load, not verified ({len(unread)}):",
                      *(f"    {n}  ({unread[n]}: {WHY_UNREAD[unread[n]]})" for n in sorted(unread)),
                      f"  note: {note}"]) in out
    assert "verification failed" not in out


def test_weight_files_the_load_does_not_read_are_named_at_world_4(pool, listed):
    changes, unread, note = UNREAD[-1]
    for change, name in changes:
        _change(listed, change, name)
    for o in pool.run(4, jobs.load_outcome, listed, 2, VERIFY):
        assert not o["raised"], o
        _check_unread(o["report"], unread, note, listed)


def test_nodes_whose_own_copies_differ_in_unread_files_load_and_name_who_saw_what(pool, listed, tmp_path):
    import shutil
    _change(listed, "added, listed", TWIN)  # the published repo carries the twin
    _change(listed, "added", "training_args.bin")
    other = shutil.copytree(listed, str(tmp_path / "node1"))
    _change(listed, "added", "optimizer.pt")  # node 0 downloaded the twin and kept an optimizer state
    _change(other, "removed", TWIN)  # node 1 skipped the twin
    out = pool.run(2, jobs.load_on_nodes_from, [listed, other], 1, 1, VERIFY)
    seen = [("optimizer.pt", "unlisted-unread", [0]), (TWIN, "absent-unread", [1]),
            (TWIN, "present-unread", [0]), ("training_args.bin", "unlisted-unread", None)]
    for o in out:
        assert not o["raised"] and o["report"]["ok"] and o["report"]["complete"], o
        files = o["report"]["verification"]["files"]
        assert [(f["name"], f["status"], f["seen_on"]) for f in files if f["status"] != "verified"] == seen
        assert [f["name"] for f in files if f["status"] == "verified"] == sorted(NAMES)
        assert o["report"]["notes"] == [
            "3 weight files in the folder were not read by this load and not verified: optimizer.pt (rank 0 only), "
            f"{TWIN} (rank 0 only), training_args.bin; 1 file the manifest lists is gone: {TWIN} (rank 1 only)"]


def test_a_file_whose_size_is_not_the_manifests_is_named_unread(tmp_path, capsys, listed):
    path = os.path.join(listed, "config.json")
    listed_size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\n")  # still the same JSON
    code, out, _, report = _cli(tmp_path, capsys, listed, "--verify-checksums")
    assert code == 3 and not report["ok"]
    assert f"  verification failed (1):\n    config.json  (size differs: {listed_size + 1} bytes, the manifest " \
           f"says {listed_size}; seen by rank 0)\n" in out
    bad = next(f for f in report["verification"]["files"] if f["name"] == "config.json")
    assert (bad["status"], bad["hashes"], bad["failed_on"], bad["size"], bad["expected_size"]) == \
        ("size-differs", 0, [0], listed_size + 1, listed_size)
    assert report["verification"]["bytes_hashed"] == sum(_sizes(listed).values()) - listed_size - 1  # not read


def test_a_checkpoint_without_a_reference_says_how_to_write_a_manifest(tmp_path, capsys):
    import shutil
    directory = shutil.copytree(distload.example_checkpoint(), str(tmp_path / "plain"))
    code, _, err, _ = _cli(tmp_path, capsys, directory, "--verify-checksums")
    assert code == 1 and err.strip().splitlines() == [
        "distload: error: --verify-checksums has nothing to check against: the checkpoint is no snapshot of the "
        f"Hugging Face cache and holds no distload-manifest.json; write one from a copy you trust with "
        f"`python -m distload.manifest {directory}` [file {directory}, rank 0]"]


def test_a_malformed_manifest_is_named(tmp_path, capsys, listed):
    path = os.path.join(listed, "distload-manifest.json")
    doc = json.load(open(path))
    doc["files"][SHARD1]["sha256"] = "abc"
    with open(path, "w") as f:
        json.dump(doc, f)
    code, _, err, _ = _cli(tmp_path, capsys, listed, "--verify-checksums")
    assert code == 1 and err.strip().splitlines() == [
        f"distload: error: manifest is unreadable: the entry of {SHARD1} is not {{\"sha256\": 64 hex digits, "
        f"\"size\": bytes}} (write it again with `python -m distload.manifest`) [file {path}, rank 0]"]


def test_without_the_option_nothing_is_hashed(tmp_path, capsys, hub):
    flip_last_byte(blob_of(os.path.join(hub, SHARD2)))
    code, out, _, report = _cli(tmp_path, capsys, hub)
    assert code == 0 and report["verification"] is None and "verified:" not in out
    assert all(r["bytes_hashed"] == 0 for r in report["ranks"])


# ---- the manifest command ----------------------------------------------------------------------

def _tree(directory: str) -> dict[str, str]:
    """Every file under ``directory`` with its sha256 and modification time."""
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, directory)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(),
                                                  os.stat(p).st_mtime_ns)
    return out


def test_the_manifest_command_is_repeatable_and_touches_nothing_else(tmp_path, capsys):
    import shutil
    directory = shutil.copytree(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    before = _tree(directory)
    run = [sys.executable, "-m", "distload.manifest", directory]
    first = subprocess.run(run, capture_output=True, text=True, timeout=120)
    manifest = os.path.join(directory, "distload-manifest.json")
    assert first.returncode == 0 and first.stdout == f"wrote {manifest}\n", first.stderr
    text = open(manifest, "rb").read()
    from distload import manifest as command
    assert command.main([directory]) == 0 and capsys.readouterr().out == f"up to date: {manifest}\n"
    os.remove(manifest)
    assert command.main([directory]) == 0 and open(manifest, "rb").read() == text  # the same bytes from scratch
    after = _tree(directory)
    assert after.pop("distload-manifest.json") and after == before
    doc = json.loads(text)
    assert doc["files"] == {n: {"sha256": hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest(),
                                "size": os.path.getsize(os.path.join(directory, n))} for n in NAMES}


def test_the_manifest_command_refuses_a_cache_snapshot(hub, capsys):
    from distload import manifest
    assert manifest.main([hub]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "distload.manifest: error: is a snapshot of the Hugging Face cache: its blob names are each file's digest "
        "already, and --verify-checksums checks against them (distload writes nothing into the cache) "
        f"[file {hub}]"]
    assert not os.path.exists(os.path.join(hub, "distload-manifest.json"))


# ---- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,line", [
    (["--verify-checksums", "--model-loader-extra-config", '{"verify_checksums": true}'],
     "--verify-checksums and --model-loader-extra-config both set verify_checksums; give it once"),
    (["--verify-checksums", "--dry-run"],
     "--verify-checksums hashes the files a load reads, and --dry-run reads no tensor data; verify with a load"),
    (["--model-loader-extra-config", '{"verify_checksums": 1}'], "verify_checksums must be true or false, got 1"),
])
def test_option_misuse_exits_2(capsys, args, line):
    assert cli_main.main(["--device", "cpu", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"distload: error: {line}"]


def test_the_extra_config_key_turns_verification_on(tmp_path, capsys, listed):
    code, _, _, report = _cli(tmp_path, capsys, listed, "--model-loader-extra-config", '{"verify_checksums": true}')
    assert code == 0 and report["verification"]["ok"] and report["verification"]["reference"] == "manifest"
    assert distload.LoadConfig(verify_checksums=True).verify_enabled
    with pytest.raises(distload.ConfigError, match="disagree"):
        distload.LoadConfig(verify_checksums=True, extra_config={"verify_checksums": False})
