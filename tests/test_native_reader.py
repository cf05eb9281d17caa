"""The compiled reader (distload/native), run here against a host stand-in of the CUDA runtime
(tests/host_cuda.py): every byte of its chunks lands at chunk boundaries and odd sizes, in
column shards read run by run, FP8 and scales; a read failure, a failed copy or a peer's
failure mid-load counts nothing loaded and leaves no stream, event or thread behind; its build
says why when there is no compiler. The real runtime's cases are tests/test_execute.py's
``cuda`` cases (marked ``gpu``).
"""

from __future__ import annotations

import threading

import pytest
import torch

import distload.native as native
from distload.errors import CheckpointError, DistloadError
from distload.execute import MIN_SLOT_BYTES, Executor, _Job
from distload.fileio import CheckpointFile
from distload.native.pipeline import eligible, run_native

from .exec_cases import POISON, case, check, ckpt, make_read  # noqa: F401 (ckpt: a fixture)
from .host_cuda import ILLEGAL_ADDRESS, HostCuda

pytestmark = pytest.mark.skipif(native.available() is not None, reason=f"no compiled reader: {native.available()}")


def _native_run(reads, params, *, threads: int, staging: int, host: HostCuda, slots_per_reader: int = 2,
                abort_check=None, tick: float = 0.25):
    """Runs the reads' eligible chunks through the compiled reader on the host; returns the job."""
    ex = Executor(device=torch.device("cpu"), num_threads=threads, staging_bytes=staging)
    ex.native = True  # the job orders its eligible chunks first, as on CUDA
    files = {}
    for r in reads:
        files.setdefault(r.tensor.file, CheckpointFile(r))
    try:
        job = _Job(ex, reads, params, files)
        chunks = job.chunks[:job.native]
        slot = -(-max(c.nbytes for c in chunks) // 4096) * 4096
        readers = min(threads, len(chunks))
        try:
            run_native(job, chunks, host.calls(), readers=readers, slots_per_reader=slots_per_reader,
                       slot_bytes=slot, device_index=3, error_text=host.error_text, progress=None,
                       abort_check=abort_check, tick=tick, copier=0)
        finally:
            assert not host.live, "every stream and event the readers made is destroyed"
            assert not host.host, "every reader freed the slots it pinned"
            assert not [t for t in threading.enumerate() if t.name.startswith("distload")]
        return job
    finally:
        for f in files.values():
            f.close()


def _eligible_reads(headers):
    reads, params = case(headers)
    # a column shard of 80 KB runs into a parameter of its own: contiguous, read run by run
    reads.append(make_read(headers["wide"], 10, "wide2", dim=1, span=(0, 40000)))
    params["wide2"] = torch.full((6, 40000), POISON, dtype=torch.bfloat16)
    ex = Executor(device=torch.device("cpu"), num_threads=1)
    job = _Job(ex, reads, params, {})
    keep = [r for i, r in enumerate(reads) if eligible(job, i)]
    return keep, params


def test_the_common_reads_are_the_eligible_ones(ckpt):
    """Whole tensors, row shards, FP8 and scales, and column shards of long runs into their own
    parameter qualify; short column runs and strided destinations stay with the Python pipeline."""
    _, headers, _ = ckpt
    keep, _ = _eligible_reads(headers)
    assert [r.unit for r in keep] == [0, 1, 5, 6, 7, 8, 10]


@pytest.mark.parametrize("threads,staging,slots", [(1, 2 * MIN_SLOT_BYTES, 2), (3, 6 * MIN_SLOT_BYTES, 3),
                                                   (4, 1 << 28, 2)])
def test_every_byte_of_its_chunks_lands(ckpt, threads, staging, slots):
    _, headers, full = ckpt
    reads, params = _eligible_reads(headers)
    after = {k: v.clone() for k, v in params.items()}
    host = HostCuda()
    job = _native_run(reads, after, threads=threads, staging=staging, host=host, slots_per_reader=slots)
    check(reads, params, after, full)
    assert sorted(job.loaded) == sorted(r.unit for r in reads)
    assert host.copies == len(job.chunks) and host.devices == {3}
    slot = -(-max(c.nbytes for c in job.chunks) // 4096) * 4096
    assert 0 < job.staging_bytes <= min(threads, len(job.chunks)) * slots * slot  # what the readers pinned
    if staging == 2 * MIN_SLOT_BYTES:
        assert host.copies > 15  # 128 KB chunks: the 1.2 MB tensor and the column shard cross many boundaries


def _short_copy(ckpt, tmp_path):
    """The checkpoint cut off half-way through ``wide``, and reads of every tensor from it."""
    path, headers, _ = ckpt
    cut_at = headers["wide"].begin + headers["wide"].nbytes // 2
    short = str(tmp_path / "short.safetensors")
    with open(path, "rb") as src, open(short, "wb") as dst:
        dst.write(src.read(cut_at))
    infos = {n: type(i)(name=i.name, file=short, dtype=i.dtype, shape=i.shape, begin=i.begin, end=i.end)
             for n, i in headers.items()}
    reads = [make_read(infos[n], k, n) for k, n in enumerate(sorted(infos, key=lambda n: infos[n].begin))]
    params = {r.param: torch.full(r.shape, POISON).to(r.tensor.dtype) for r in reads}
    return short, reads, params


def test_a_truncated_file_is_named_and_nothing_counts(ckpt, tmp_path):
    short, reads, params = _short_copy(ckpt, tmp_path)
    host = HostCuda()
    with pytest.raises(CheckpointError, match="is it truncated") as err:
        _native_run(reads, params, threads=2, staging=4 * MIN_SLOT_BYTES, host=host)
    assert err.value.tensor == "wide" and err.value.file == short


def test_a_failed_copy_is_named_and_nothing_counts(ckpt):
    _, headers, _ = ckpt
    reads, params = _eligible_reads(headers)
    host = HostCuda(fail_copy=5)
    with pytest.raises(DistloadError, match="cudaMemcpyAsync failed: an illegal memory access") as err:
        _native_run(reads, params, threads=2, staging=4 * MIN_SLOT_BYTES, host=host)
    assert err.value.tensor in {r.tensor.name for r in reads} and f"error {ILLEGAL_ADDRESS}" in str(err.value)
    assert host.copies < 5 + 2 * 2  # the readers stopped: at most one more chunk each


def test_a_peers_failure_stops_the_readers_and_nothing_counts(ckpt):
    _, headers, _ = ckpt
    reads, params = _eligible_reads(headers)
    host = HostCuda(copy_seconds=0.01)
    calls = []

    def peer_failed():
        calls.append(1)
        if len(calls) == 2:
            raise DistloadError("rank 1 failed")

    ex_job = _native_run(reads, params, threads=2, staging=4 * MIN_SLOT_BYTES, host=host,
                         abort_check=peer_failed, tick=0.02)
    assert ex_job.stopped and str(ex_job._error) == "rank 1 failed"
    assert not [u for u in ex_job.loaded if reads[u].nbytes]  # no unit with bytes counts
    assert host.copies < len(ex_job.chunks) / 2  # it stopped, rather than finishing the load


def test_no_compiler_says_why(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.compiler() is None
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native._load()


def test_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTLOAD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(native.NativeUnavailable, match="failed to build"):
        native._load()
    assert not list(tmp_path.rglob("*.so*"))  # no partial library left behind
