"""The executor's chunked reads: every byte lands where its read says, at chunk boundaries, odd
sizes, column shards (mapped and read), casts, FP8 and scales, comparisons; a failure mid-read
counts nothing loaded; staging stays within its budget. CUDA cases are marked ``gpu``.

Reads are built here from the format ``Read`` documents (runs, stride, count), and the oracle
is torch's own ``narrow`` of the tensor as safetensors reads it.
"""

from __future__ import annotations

import math
import os
import random
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from distload.checkpoint.header import read_header
from distload.chunks import cut, segments
from distload.config import LoadConfig
from distload.errors import CheckpointError, ConfigError
from distload.execute import MIN_SLOT_BYTES, Executor, _Job
from distload.fileio import HUGE_PAGE_BYTES, STRIDED_RUN_BYTES, CheckpointFile
from distload.plan import RankPlan, Read
from distload.prepare import materialize, tensor_at, tensors_at

POISON = -7.0  # what unwritten parameter memory holds; never a checkpoint value here

TENSORS = {  # name -> (dtype, shape)
    "odd": (torch.bfloat16, (37, 53)),
    "big": (torch.float32, (1000, 301)),
    "wide": (torch.bfloat16, (6, 80000)),  # a column shard's rows above STRIDED_RUN_BYTES: read calls
    "fp8": (torch.float8_e4m3fn, (64, 128)),
    "fp8.scale": (torch.float32, (1,)),
    "scalar": (torch.float32, ()),
    "ints": (torch.int8, (17, 9)),
    "stack": (torch.bfloat16, (4, 24, 10)),
}


def _values(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if dtype == torch.int8:
        return torch.randint(-100, 100, shape, generator=g, dtype=torch.int8)
    return (torch.rand(shape, generator=g) * 8 + 1).to(dtype)  # in [1, 9): never POISON, never NaN


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("exec") / "model.safetensors")
    save_file({n: _values(n, d, s) for n, (d, s) in TENSORS.items()}, path)
    return path, read_header(path), load_file(path)


def make_read(info, unit: int, param: str, *, dim: int | None = None, span: tuple[int, int] = (0, 0),
              at: int = 0, slot: int | None = None, verify: bool = False) -> Read:
    """A read of ``info`` (its ``span`` along ``dim``, or whole) placed at ``at`` along ``dim``."""
    if dim is None:
        return Read(unit=unit, param=param, tensor=info, offset=info.begin, run=info.nbytes, stride=info.nbytes,
                    count=1, shape=info.shape, dim=None, dest=(0, 0), slot=slot, verify=verify)
    inner = math.prod(info.shape[dim + 1:]) * info.itemsize
    run, stride, count = (span[1] - span[0]) * inner, info.shape[dim] * inner, math.prod(info.shape[:dim])
    if run == stride:
        run, count = run * count, 1
    piece = (*info.shape[:dim], span[1] - span[0], *info.shape[dim + 1:])
    return Read(unit=unit, param=param, tensor=info, offset=info.begin + span[0] * inner, run=run, stride=stride,
                count=count, shape=piece, dim=dim, dest=(at, at + span[1] - span[0]), slot=slot, verify=verify)


def expected(full: dict, read: Read) -> torch.Tensor:
    t = full[read.tensor.name]
    if read.dim is None:
        return t
    start = (read.offset - read.tensor.begin) // (math.prod(read.tensor.shape[read.dim + 1:]) * read.tensor.itemsize)
    return t.narrow(read.dim, start, read.dest[1] - read.dest[0])


def placed(params: dict, read: Read) -> torch.Tensor:
    dest = params[read.param]
    if read.slot is not None:
        dest = dest[read.slot]
    return dest if read.dim is None else dest.narrow(read.dim, read.dest[0], read.dest[1] - read.dest[0])


def case(headers: dict, *, cast: bool = False) -> tuple[list[Read], dict[str, torch.Tensor]]:
    """Reads of every kind into fresh poisoned parameters: whole tensors, row and column shards
    into fused parameters, an expert slot, FP8 and its scale."""
    h = headers
    wide_dtype = torch.float32 if cast else torch.bfloat16
    params = {
        "odd": torch.full((37, 53), POISON, dtype=torch.float32 if cast else torch.bfloat16),
        "fused": torch.full((1000 + 37, 301), POISON),  # big's rows, then rows no read touches
        "cols": torch.full((1000, 150 + 120), POISON),  # two column shards of big side by side
        "wide": torch.full((6, 40000 + 1), POISON, dtype=wide_dtype),
        "fp8": torch.zeros((32, 128), dtype=torch.float8_e4m3fn),
        "fp8.scale": torch.full((1,), POISON),
        "scalar": torch.full((), POISON),
        "ints": torch.zeros((17, 9), dtype=torch.int8),
        "stack": torch.full((3, 4, 24, 10), POISON, dtype=torch.bfloat16),
    }
    reads = [
        make_read(h["odd"], 0, "odd"),
        make_read(h["big"], 1, "fused", dim=0, span=(0, 1000), at=0),
        make_read(h["big"], 2, "cols", dim=1, span=(151, 301), at=0),      # odd column shard: mapped
        make_read(h["big"], 3, "cols", dim=1, span=(0, 120), at=150),
        make_read(h["wide"], 4, "wide", dim=1, span=(40000, 80000), at=1),  # runs of 80 KB: read calls
        make_read(h["fp8"], 5, "fp8", dim=0, span=(32, 64), at=0),
        make_read(h["fp8.scale"], 6, "fp8.scale"),
        make_read(h["scalar"], 7, "scalar"),
        make_read(h["ints"], 8, "ints"),
        make_read(h["stack"], 9, "stack", dim=2, span=(0, 5), at=5, slot=2),  # an expert slot's strided shard
    ]
    params["fused"][1000:] = 5.0  # rows no read touches
    return reads, params


def _run(reads, params, device, **kw):
    device = device.removesuffix("-torch")
    params = {k: v.to(device) for k, v in params.items()}
    result = Executor(device=torch.device(device), **kw).run(
        RankPlan(rank=0, reads=tuple(reads), defaults=(), zero=(), owned=tuple(r.unit for r in reads)), params)
    return result, {k: v.cpu() for k, v in params.items()}


def check(reads, before, after, full):
    """Every read's destination holds its piece; every other byte is as it was."""
    untouched = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in before.items()}
    for r in reads:
        got = placed(after, r)
        want = expected(full, r).to(got.dtype)
        assert torch.equal(got.float() if got.dtype.itemsize == 1 else got,
                           want.float() if want.dtype.itemsize == 1 else want), r.tensor.name
        placed(untouched, r).fill_(False)
    for name, mask in untouched.items():
        a, b = before[name], after[name]
        if a.dtype.itemsize == 1:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a[mask], b[mask]), f"{name}: bytes outside every read changed"


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU), pytest.param("cuda-torch", marks=GPU)]
"""``cuda-torch``: CUDA with the copies made through torch's calls, not the runtime library's"""


@pytest.fixture(autouse=True)
def _copies_by_torch(request, monkeypatch):
    """``cuda-torch`` cases run the fallback copies (as where the runtime library is not found)."""
    if "cuda-torch" in request.node.name:
        import distload.device_copies
        monkeypatch.setattr(distload.device_copies, "runtime_library", lambda: None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads,staging", [(1, 2 * MIN_SLOT_BYTES), (3, 6 * MIN_SLOT_BYTES), (4, 1 << 28)])
@pytest.mark.parametrize("cast", [False, True])
def test_every_byte_lands_where_its_read_says(ckpt, device, threads, staging, cast):
    _, headers, full = ckpt
    reads, params = case(headers, cast=cast)
    result, after = _run(reads, params, device, num_threads=threads, staging_bytes=staging)
    check(reads, params, after, full)
    assert sorted(result.loaded) == sorted(r.unit for r in reads)
    assert result.bytes_read == sum(r.nbytes for r in reads)
    assert result.staging_bytes <= staging
    assert ("bfloat16 -> float32" in result.casts) == cast


def test_small_staging_cuts_reads_at_many_boundaries(ckpt):
    """With a 64 KiB slot the 1.2 MB tensor and the column shards cross many chunk boundaries, and
    the strided rows stay whole runs."""
    _, headers, _ = ckpt
    reads, params = case(headers)
    ex = Executor(device=torch.device("cpu"), num_threads=1, staging_bytes=MIN_SLOT_BYTES)
    job = _Job(ex, reads, params, {})
    per_read = {r.tensor.name + str(r.unit): sum(c.read == i for c in job.chunks) for i, r in enumerate(reads)}
    assert per_read["big1"] > 10 and per_read["big2"] > 2
    assert reads[4].run > STRIDED_RUN_BYTES > reads[2].run  # both column paths are exercised


def test_cpu_reads_land_in_parameters_without_staging(ckpt):
    _, headers, _ = ckpt
    reads, params = case(headers)
    contiguous = [r for r in reads if r.param in ("odd", "fused", "fp8", "fp8.scale", "scalar", "ints")]
    result, _ = _run(contiguous, params, "cpu", num_threads=2)
    assert result.staging_bytes == 0
    result, _ = _run(reads, params, "cpu", num_threads=4)  # side-by-side column shards are strided: staged
    largest = headers["big"].nbytes // 2  # a 150-column shard of big, rounded to pages below
    assert 0 < result.staging_bytes <= 8 * (largest + 4096)  # slots fit their chunks, not the 256 MiB budget


@pytest.mark.parametrize("device", DEVICES)
def test_compared_reads_flag_only_differences(ckpt, device):
    _, headers, full = ckpt
    info = headers["big"]
    same = full["big"][:, :150].clone()
    other = same.clone()
    other[999, 149] += 1  # the last byte of the last chunk differs
    reads = [make_read(info, 0, "same", dim=1, span=(0, 150), verify=True),
             make_read(info, 1, "other", dim=1, span=(0, 150), verify=True)]
    result, after = _run(reads, {"same": same, "other": other}, device, num_threads=2, staging_bytes=1 << 18)
    assert sorted(result.loaded) == [0, 1] and result.mismatched == (1,)
    assert torch.equal(after["other"], other)  # compared, never written


@pytest.mark.parametrize("device", DEVICES)
def test_a_failure_mid_read_counts_nothing_of_that_read(ckpt, tmp_path, device):
    path, headers, _ = ckpt
    cut_at = headers["wide"].begin + headers["wide"].nbytes // 2  # safetensors puts it after five others
    short = str(tmp_path / "short.safetensors")
    with open(path, "rb") as src, open(short, "wb") as dst:
        dst.write(src.read(cut_at))
    infos = {n: type(i)(name=i.name, file=short, dtype=i.dtype, shape=i.shape, begin=i.begin, end=i.end)
             for n, i in headers.items()}
    before = [n for n, i in infos.items() if i.end <= cut_at]
    reads = [make_read(infos[n], k, n) for k, n in enumerate(sorted(infos, key=lambda n: infos[n].begin))]
    on = torch.device(device.removesuffix("-torch"))
    params = {r.param: torch.empty(r.shape, dtype=r.tensor.dtype, device=on) for r in reads}
    ex = Executor(device=on, num_threads=1, staging_bytes=2 * MIN_SLOT_BYTES)
    for attempt in range(2):  # the second: torch's own one-time pinned buffers exist by then
        files = {short: CheckpointFile(reads[0])}
        job = _Job(ex, reads, params, files)
        pinned_before = _pinned_bytes(on)
        try:
            with pytest.raises(CheckpointError) as err:
                job.run(None, None)
        finally:
            files[short].close()
    assert _pinned_bytes(on) == pinned_before  # the pool went back, not into torch's cache of freed blocks
    assert err.value.tensor == "wide" and err.value.file == short
    assert "is it truncated?" in str(err.value)
    loaded = {r.tensor.name for r in reads if r.unit in job.loaded}
    assert "wide" not in loaded and loaded <= set(before) and "big" in loaded  # whole earlier reads only


def _pinned_bytes(device: torch.device) -> int:
    """Pinned host memory torch's allocator holds, in use or cached (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("allocated_bytes.all.current", 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where pinned memory cannot be had")
def test_a_cuda_read_step_without_pinned_memory_raises_why(ckpt):
    """Where the staging pool cannot be pinned (no accelerator here), the read step raises the
    allocator's reason before any read, rather than returning a result with nothing loaded."""
    _, headers, _ = ckpt
    reads, params = case(headers)
    ex = Executor(device=torch.device("cuda"), num_threads=2)
    with pytest.raises(RuntimeError, match="pin"):
        ex.run(RankPlan(rank=0, reads=tuple(reads), defaults=(), zero=(), owned=()), params)
    assert not [t for t in threading.enumerate() if t.name.startswith("distload-read")]


def test_a_truncated_file_is_named_on_the_mapped_path_too(ckpt, tmp_path):
    path, headers, _ = ckpt
    info = headers["big"]
    short = str(tmp_path / "short.safetensors")
    with open(path, "rb") as src, open(short, "wb") as dst:
        dst.write(src.read(info.begin + 100))
    info = type(info)(name="big", file=short, dtype=info.dtype, shape=info.shape, begin=info.begin, end=info.end)
    read = make_read(info, 0, "p", dim=1, span=(0, 10))
    with pytest.raises(CheckpointError, match="before the tensor's data") as err:
        _run([read], {"p": torch.empty(1000, 10)}, "cpu", num_threads=1)
    assert err.value.file == short and err.value.tensor == "big"


@pytest.mark.parametrize("seed", range(20))
def test_chunks_tile_every_read_in_whole_runs(ckpt, seed):
    rng = random.Random(seed)
    _, headers, _ = ckpt
    name = rng.choice(["odd", "big", "wide", "stack", "fp8"])
    info = headers[name]
    dim = rng.randrange(len(info.shape))
    size = info.shape[dim]
    a = rng.randrange(size)
    read = make_read(info, 0, "p", dim=dim, span=(a, rng.randrange(a + 1, size + 1)))
    for flat in (True, False):
        chunk_bytes = rng.choice([1, 7, 4096, 1 << 20])
        chunks = cut(0, read, chunk_bytes, flat=flat)
        assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]] and chunks[-1].stop == read.nbytes
        for c in chunks:
            if flat and read.count > 1 and read.run <= chunk_bytes:
                assert c.start % read.run == 0 and c.stop % read.run == 0
            assert c.nbytes <= max(chunk_bytes, info.itemsize)
        # the segments of all chunks are exactly the piece's file bytes, in order
        want = [read.offset + i * read.stride + j for i in range(read.count) for j in range(read.run)]
        got = [off + j for c in chunks for off, _, n in segments(read, c.start, c.stop) for j in range(n)]
        if read.nbytes <= 200_000:
            assert got == want


def test_populate_faults_pages_in_and_leaves_bytes_alone():
    from distload.fileio import populate
    t = torch.full((1 << 20,), 3, dtype=torch.uint8)
    populate(t[5:-5])  # unaligned ends: only whole pages inside are touched
    assert bool((t == 3).all())
    fresh = torch.empty(1 << 22, dtype=torch.uint8)
    populate(fresh)
    fresh.fill_(1)
    assert int(fresh.sum()) == 1 << 22


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of this process's mapping that holds ``address`` (``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="a kernel without transparent huge pages")
@pytest.mark.parametrize("huge", [True, False])
def test_fresh_cpu_parameters_ask_for_huge_pages_and_their_bytes_land(tmp_path, huge):
    weight = _values("huge", torch.float32, (3, 1 << 20))  # 12 MiB: whole 2 MiB pages inside it
    path = str(tmp_path / "huge.safetensors")
    save_file({"w": weight}, path)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.empty(weight.shape, device="meta"))
    materialize(model, torch.device("cpu"), huge_pages=huge)
    first_huge_page = -(-model.w.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    assert ("hg" in _vm_flags(first_huge_page)) is huge  # asked for before anything touched it
    params = {"w": model.w.data}
    read = make_read(read_header(path)["w"], 0, "w")
    result = Executor(device=torch.device("cpu"), num_threads=2).run(
        RankPlan(rank=0, reads=(read,), defaults=(), zero=(), owned=(0,)), params)
    assert tuple(result.loaded) == (0,) and torch.equal(model.w.data, weight)


def test_huge_pages_is_on_by_default_and_must_be_true_or_false():
    assert LoadConfig().huge_pages is True and LoadConfig(extra_config={"huge_pages": False}).huge_pages is False
    with pytest.raises(ConfigError, match="huge_pages must be true or false, got 1"):
        LoadConfig(extra_config={"huge_pages": 1})


def test_tensors_at_finds_what_tensor_at_finds_in_one_walk():
    class Head(torch.nn.Module):
        def __init__(self, tied: torch.nn.Parameter) -> None:
            super().__init__()
            self.weight = tied
            self.register_buffer("scale", torch.ones(2))
            self.plain = torch.zeros(3)  # an attribute no walk lists

    embed = torch.nn.Embedding(4, 2)
    model = torch.nn.Module()
    model.embed, model.head = embed, Head(embed.weight)
    names = ["head.plain", "head.weight", "embed.weight", "head.scale"]
    found = tensors_at(model, names)
    assert list(found) == names
    assert all(found[n] is tensor_at(model, n) for n in names)
    with pytest.raises(AttributeError):
        tensors_at(model, ["head.missing"])
