"""PURE: which checkpoint dtypes may fill which parameter dtypes (casts only between floating types).

A copy into a parameter of another dtype converts values, so it is sound only where both
dtypes hold the same kind of number: 16- to 64-bit floats cast into one another (a note in
the report says so). An integer's or bool's bits read as a float (or the reverse) are
garbage that still "loads"; FP8 values mean nothing without the scales beside them. Both are
refused before any byte is read. ``--strict-dtype`` refuses every cast.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .checkpoint.header import TensorInfo
from .errors import PlanError
from .spec import ParamSpec


def kind(dtype: torch.dtype) -> str:
    """The kind of number ``dtype`` holds: ``floating`` (16 to 64 bits), ``FP8`` (8-bit floats),
    ``bool``, ``integer`` or ``complex``.

    Example:
        >>> kind(torch.bfloat16), kind(torch.float8_e4m3fn), kind(torch.uint32)
        ('floating', 'FP8', 'integer')
    """
    if dtype.is_floating_point:
        return "floating" if dtype.itemsize > 1 else "FP8"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def cast_refusal(stored: torch.dtype, wanted: torch.dtype, *, strict_dtype: bool = False) -> str | None:
    """Says why a checkpoint tensor of dtype ``stored`` may not fill a parameter of dtype ``wanted``.

    Args:
        stored: the checkpoint tensor's dtype.
        wanted: the parameter's dtype.
        strict_dtype: refuse every cast (``--strict-dtype``).

    Returns:
        None when the copy is allowed (the same dtype, or a cast between floating types);
        otherwise the reason, to follow the two dtypes in a message.

    Example:
        >>> cast_refusal(torch.float32, torch.bfloat16) is None
        True
        >>> cast_refusal(torch.int64, torch.bfloat16)
        'integer tensors are not cast to floating types (only floating types are cast into one another)'
    """
    if stored == wanted:
        return None
    if strict_dtype:
        return "--strict-dtype refuses to cast"
    have, want = kind(stored), kind(wanted)
    if want in ("bool", "integer", "complex"):
        return f"{want} parameters need the identical dtype"
    if have in ("bool", "integer", "complex"):
        return f"{have} tensors are not cast to floating types (only floating types are cast into one another)"
    if have == "FP8":  # its scales are other tensors: a cast gives unscaled values
        return "FP8 tensors are read only into parameters of the same FP8 dtype"
    if want == "FP8":
        return "FP8 parameters are read only from tensors of the same FP8 dtype"
    return None


def refuse_casts(params: Iterable[tuple[ParamSpec, torch.dtype]], tensors: Mapping[str, TensorInfo], *,
                 strict_dtype: bool = False) -> None:
    """Checks every checkpoint tensor a parameter reads (or verifies against) for a refused cast.

    Args:
        params: each parameter's spec and its dtype in the model.
        tensors: the checkpoint's headers, by name (names absent from it are skipped).
        strict_dtype: refuse every cast (``--strict-dtype``).

    Raises:
        PlanError: naming the tensor, its file, both dtypes and the parameter.

    Example:
        >>> from distload.spec import Source
        >>> info = TensorInfo(name="w", file="m.safetensors", dtype=torch.int64, shape=(2,), begin=8, end=24)
        >>> spec = ParamSpec(name="w", shape=(2,), sources=(Source(name="w", shape=(2,)),))
        >>> refuse_casts([(spec, torch.int64)], {"w": info})  # the same dtype: nothing to refuse
    """
    for spec, wanted in params:
        for name in _names(spec):
            info = tensors.get(name)
            if info is None:
                continue
            why = cast_refusal(info.dtype, wanted, strict_dtype=strict_dtype)
            if why is not None:
                raise PlanError(f"checkpoint dtype {_name(info.dtype)} differs from the model's {_name(wanted)} "
                                f"(parameter {spec.name}); {why}", file=info.file, tensor=name)


def _names(spec: ParamSpec) -> Iterable[str]:
    """Every checkpoint name ``spec`` reads or verifies (each expert's, for expert-stacked ones)."""
    for src in (*spec.sources, *spec.verify):
        yield src.name
    if spec.experts is not None:
        e = spec.experts
        for x in range(e.placement.num_experts):
            for part in e.parts:
                yield e.name(part, x)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
