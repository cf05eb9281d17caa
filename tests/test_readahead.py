"""Readahead of cold files: what it asks of the kernel, and that a load places the same bytes
with it and without it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.page_cache import evict, resident
from distload.checkpoint.header import read_header
from distload.chunks import Chunk
from distload.config import LoadConfig
from distload.errors import CheckpointError, ConfigError
from distload.execute import Executor
from distload.plan import RankPlan
from distload.readahead import (DEFAULT_REQUEST_BYTES, SPAN_BYTES, WINDOW_BYTES, Readahead, request_bytes, spans,
                                window_for)

from .test_execute import GPU, make_read

MIB = 1024 * 1024


@pytest.fixture
def weights(tmp_path):
    """A 48 MiB safetensors file of two tensors."""
    path = tmp_path / "model.safetensors"
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randint(0, 255, (32 * MIB,), dtype=torch.uint8, generator=g),
               "b": torch.randint(0, 255, (4 * MIB, 4), dtype=torch.uint8, generator=g)}
    save_file(tensors, str(path))
    return path, tensors


@pytest.fixture
def cold_file(weights):
    """``weights``, evicted from the page cache (or a skip)."""
    path, tensors = weights
    evict([str(path)])
    done, pages = resident(str(path))
    if done > pages // 100:
        pytest.skip("this machine keeps the file cached after POSIX_FADV_DONTNEED")
    return path, tensors


def _reads(path):
    header = read_header(str(path))
    return [make_read(header["a"], 0, "a"), make_read(header["b"], 1, "b")]


def test_spans_merge_adjacent_chunks_of_one_file_up_to_the_span_size(weights):
    reads = _reads(weights[0])
    step = 3 * MIB
    chunks = [Chunk(i, k, min(k + step, r.nbytes)) for i, r in enumerate(reads) for k in range(0, r.nbytes, step)]
    got = spans(chunks, reads, lambda i: 7)
    assert all(fd == 7 and n <= SPAN_BYTES for fd, _, n, _ in got)
    # together the spans are exactly the reads' bytes, in the readers' order
    covered = [(off, off + n) for _, off, n, _ in got]
    assert covered == sorted(covered)
    assert sum(n for _, _, n, _ in got) == sum(r.nbytes for r in reads)
    assert covered[0][0] == reads[0].offset and covered[-1][1] == reads[1].offset + reads[1].nbytes
    # a span's pacing mark is the bytes placed once its last chunk is
    assert [p for *_, p in got][-1] == sum(r.nbytes for r in reads)
    assert all(a[3] < b[3] for a, b in zip(got, got[1:]))
    # bytes that preadv does not read (a pickle's) are not asked for, but still count as placed
    first = spans(chunks, reads, lambda i: None if i == 0 else 7)[0]
    assert first[1] == reads[1].offset and first[3] == reads[0].nbytes + first[2]
    # a gap between chunks starts a new span; so does another file
    gap = [Chunk(0, 0, MIB), Chunk(0, 2 * MIB, 3 * MIB)]
    assert [(o - reads[0].offset, n) for _, o, n, _ in spans(gap, reads, lambda i: 7)] == [(0, MIB), (2 * MIB, MIB)]
    assert len(spans(gap[:1] + [Chunk(1, 0, MIB)], reads, lambda i: 7 + i)) == 2
    # a strided read (a column shard) is left to the readers
    header = read_header(str(weights[0]))
    cols = make_read(header["b"], 2, "b", dim=1, span=(0, 2))
    assert cols.count > 1 and spans([Chunk(0, 0, cols.nbytes)], [cols], lambda i: 7) == []


def test_a_cold_file_is_asked_for_and_lands_in_the_page_cache(cold_file):
    path, _ = cold_file
    reads = _reads(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [Chunk(i, 0, r.nbytes) for i, r in enumerate(reads)]
        ahead = Readahead(spans(chunks, reads, lambda i: fd), lambda: 0).start()
        deadline = time.monotonic() + 10
        while ahead.asked < sum(r.nbytes for r in reads) and time.monotonic() < deadline:
            time.sleep(0.01)
        ahead.stop()
        assert ahead.asked == sum(r.nbytes for r in reads)
        assert request_bytes(fd) >= DEFAULT_REQUEST_BYTES
        while resident(str(path))[0] < resident(str(path))[1] * 0.9 and time.monotonic() < deadline:
            time.sleep(0.05)
        done, pages = resident(str(path))
        assert done >= pages * 0.9
        # now cached: nothing to ask for, and no thread
        again = Readahead(spans(chunks, reads, lambda i: fd), lambda: 0).start()
        again.stop()
        assert again.cold == [] and again.asked == 0
    finally:
        os.close(fd)


def test_the_walk_keeps_its_window_ahead_of_the_bytes_taken(cold_file):
    path, _ = cold_file
    reads = _reads(path)
    fd = os.open(path, os.O_RDONLY)
    taken = [0]
    try:
        chunks = [Chunk(0, k, k + MIB) for k in range(0, reads[0].nbytes, MIB)]
        # a window under one span is one span: the first 16 MiB, and no more until readers move
        ahead = Readahead(spans(chunks, reads, lambda i: fd), lambda: taken[0], window=4 * MIB).start()
        assert len(ahead.cold) == 2

        def settle(want: int) -> None:
            deadline = time.monotonic() + 10
            while ahead.asked < want and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # time to ask for more, were it wrong
            assert ahead.asked == want

        settle(SPAN_BYTES)
        taken[0] = SPAN_BYTES  # the readers took the first span: the second is within reach
        settle(2 * SPAN_BYTES)
        ahead.stop()
    finally:
        os.close(fd)


def _executor(device: str, window: int, threads: int = 2) -> Executor:
    ex = Executor(device=torch.device(device), num_threads=threads, staging_bytes=8 * MIB, readahead_bytes=window)
    ex.readahead_bytes = window  # on the CPU too: the same walk beside the CPU readers
    return ex


def _walkers() -> list:
    return [t for t in threading.enumerate() if t.name == "distload-readahead"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("readahead", [True, False])
def test_a_cold_load_places_the_same_bytes_with_and_without_readahead(cold_file, device, readahead):
    path, tensors = cold_file
    reads = _reads(path)
    params = {"a": torch.empty(32 * MIB, dtype=torch.uint8, device=device),
              "b": torch.empty(4 * MIB, 4, dtype=torch.uint8, device=device)}
    result = _executor(device, window_for(1) if readahead else 0).run(
        RankPlan(rank=0, reads=tuple(reads), zero=(), defaults=(), owned=(0, 1)), params)
    assert sorted(result.loaded) == [0, 1]
    assert torch.equal(params["a"].cpu(), tensors["a"]) and torch.equal(params["b"].cpu(), tensors["b"])
    assert not _walkers()


def test_a_truncated_cold_file_still_fails_naming_it_and_leaves_no_walker(cold_file):
    path, _ = cold_file
    reads = _reads(path)
    os.truncate(path, reads[0].offset + 6 * MIB)  # a's bytes end early, while the walker waits for readers
    evict([str(path)])
    params = {"a": torch.empty(32 * MIB, dtype=torch.uint8), "b": torch.empty(4 * MIB, 4, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match="is it truncated") as err:  # raised through the calling thread
        _executor("cpu", SPAN_BYTES, threads=1).run(RankPlan(rank=0, reads=tuple(reads), zero=(), defaults=(), owned=(0, 1)),
                                            params)
    assert err.value.file == str(path) and err.value.tensor == "a"
    assert not _walkers()


def test_an_interrupt_mid_read_leaves_no_walker(cold_file):
    reads = _reads(cold_file[0])
    params = {"a": torch.empty(32 * MIB, dtype=torch.uint8), "b": torch.empty(4 * MIB, 4, dtype=torch.uint8)}

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a window of one span: the walker is still waiting for readers
        _executor("cpu", SPAN_BYTES).run(RankPlan(rank=0, reads=tuple(reads), zero=(), defaults=(), owned=(0, 1)),
                                            params, progress=interrupt)
    assert not _walkers()


def test_only_cuda_ranks_read_ahead():
    # the CPU's 16 MB chunks go without (the kernel's own readahead keeps up), CUDA's 2 MB ones with it
    assert Executor(device=torch.device("cpu")).readahead_bytes == 0
    assert Executor(device=torch.device("cpu"), num_threads=32, staging_bytes=64 * MIB).readahead_bytes == 0
    assert Executor(device=torch.device("cuda")).readahead_bytes == WINDOW_BYTES


def test_a_node_s_ranks_share_its_window():
    assert window_for(1) == WINDOW_BYTES
    assert window_for(8) == WINDOW_BYTES // 8
    assert window_for(10_000) == SPAN_BYTES  # never less than one span


def test_readahead_must_be_true_or_false():
    assert LoadConfig(extra_config={"readahead": False}).readahead is False
    assert LoadConfig().readahead is True
    with pytest.raises(ConfigError, match="readahead must be true or false, got 'no'"):
        LoadConfig(extra_config={"readahead": "no"})
