"""The executor's test cases, shared by its tests (tests/test_execute.py, test_native_reader.py,
test_readahead.py): one checkpoint of every kind of tensor, reads built from the format ``Read``
documents (runs, stride, count), and the oracle, torch's own ``narrow`` of the tensor as
safetensors reads it.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from distload.checkpoint.header import read_header
from distload.plan import Read

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
    """``(path, header, tensors)`` of one safetensors file holding every tensor of TENSORS."""
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
