"""The command line's options and environment, checked in one place before anything is read.

``parse`` turns argv and the launcher's variables into one frozen ``Invocation`` or
raises ``ConfigError`` (a usage error: exit 2, one line). The launchers built on the
CLI use it too, so an option means the same everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Mapping

from ._version import __version__
from .config import DTYPES, EXTRA_CONFIG_KEYS, LoadConfig
from .errors import ConfigError
from .quant.config import KV_CACHE_DTYPES, ONLINE

MAX_WORLD = 1 << 20
"""the most ranks a job (or a dry run) may have: beyond any cluster, and a dry run of it
still plans in seconds"""

RANK_FIELD = "{rank}"
"""in a --json path: every rank writes its own file there"""


class UsageError(ConfigError):
    """An option or launcher variable is unusable (exit 2)."""


class _JsonPathError(UsageError):
    """The --json path itself is unusable."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that usage errors take the one-line path."""

    def error(self, message: str):  # argparse's hook for a bad command line
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    """The CLI's parser (no prefix abbreviations: ``--tr`` is not ``--track``)."""
    p = _Parser(
        prog="python -m distload", allow_abbrev=False,
        description="Load a Hugging Face safetensors checkpoint into a tensor/data-parallel model and "
                    "prove, across all ranks, that every parameter was filled. Run it once per rank "
                    "(torchrun --nproc-per-node W -m distload ...), W = tp x pp x dp.")
    p.add_argument("--version", action="version", version=f"distload {__version__}")
    p.add_argument("checkpoint", nargs="?",
                   help="checkpoint directory, or a Hugging Face repo id found in the local Hugging Face cache "
                        "(default: the bundled example)")
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, default=1,
                   help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", "--pipeline-parallel-size", "-pp", dest="pp", type=int, default=1,
                   help="pipeline stages (default 1)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel groups per stage (default 1; with --enable-expert-parallel, every "
                        "rank of a stage)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="experts split over all tp x dp ranks of a stage, one whole expert per rank group "
                        "(vLLM's flag): ep = tp x dp")
    p.add_argument("--expert-placement", choices=("linear", "round_robin"), default="linear")
    p.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="extra slots replicating the first R experts")
    p.add_argument("--expert-map", metavar="FILE",
                   help='per-layer expert -> slots JSON: {"layers": {"<layer>|default": {"<expert>": [slots]}}}')
    p.add_argument("--dp", "--data-parallel-size", "-dp", dest="dp", type=int, default=None,
                   help="data-parallel replicas (default: world / (tp x pp))")
    p.add_argument("--json", metavar="PATH",
                   help="write the report (or the failure) as JSON, on every exit; written by the reporting "
                        "rank, or by every rank when PATH contains {rank}")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available (NCCL), else cpu (gloo)")
    p.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), metavar="DTYPE",
                   help="model dtype: bfloat16, float16 or float32; auto (default): the checkpoint's")
    p.add_argument("--quantize", choices=ONLINE,
                   help="quantize an unquantized checkpoint's linear weights to FP8 (per channel) while loading")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="fp8: attention loads k_scale/v_scale (optional, default 1.0); auto (default): "
                        "only when config.json's quantization_config has a KV-cache scheme")
    p.add_argument("--rules", metavar="FILE",
                   help="load a model type without a built-in model: a JSON file of checkpoint-name patterns and "
                        "how each tensor splits (replicate, a dim, fused parts, experts, optional tensors), into "
                        "per-rank sharded state dicts")
    p.add_argument("--track", choices=("on", "off"), help="merge every rank's record (default on)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="checkpoint names matching REGEX are never unexpected (repeatable)")
    p.add_argument("--strict", action="store_true", help="unexpected checkpoint tensors fail the load too")
    p.add_argument("--check-finite", action="store_true",
                   help="scan loaded pieces for NaN/Inf (reported as nonfinite; fails under --strict)")
    p.add_argument("--strict-dtype", action="store_true",
                   help="refuse checkpoint tensors of another dtype than the model's (default: cast floats, noted)")
    p.add_argument("--verify-checksums", action="store_true",
                   help="hash config.json, the index and every weight file beside the reads, against the Hugging "
                        "Face cache's blob names or the checkpoint's distload-manifest.json (python -m "
                        "distload.manifest CKPT writes one); a file that differs fails the load (exit 3)")
    p.add_argument("--allow-pickle-format", action="store_true",
                   help="with no safetensors files, read .bin/.pt with torch.load(weights_only=True)")
    p.add_argument("--dry-run", action="store_true",
                   help="plan from the headers only, for --world ranks, on this machine (no process group, "
                        "no tensor data); exit 3 when units would be missing")
    p.add_argument("--world", type=int, default=None, metavar="N",
                   help="world size for --dry-run (default: WORLD_SIZE, else tp x pp x dp)")
    p.add_argument("--model-loader-extra-config", metavar="JSON",
                   help="loader extra-config as a JSON object (vLLM's flag); keys: " + ", ".join(EXTRA_CONFIG_KEYS))
    p.add_argument("--read-threads", type=int, metavar="N",
                   help="reader threads per rank (default: the node's cores / its local ranks)")
    p.add_argument("--staging-mib", type=int, metavar="MIB",
                   help="host staging memory per rank, pinned on CUDA (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--failure-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a rank silent this long (stopped, killed, host gone) fails the job (default 30, "
                        "at least 1); a rank that raises stops every rank at once")
    return p


@dataclass(frozen=True, kw_only=True, slots=True)
class Invocation:
    """One run of the CLI, checked: what to load, how, and where the verdict goes."""

    checkpoint: str | None
    """the checkpoint directory; None: the bundled example"""
    config: LoadConfig
    """the load's options"""
    json_path: str | None
    """this rank's --json file (None: no JSON)"""
    json_per_rank: bool
    """the --json path names the rank: every rank writes its own verdict, not only the reporting one"""
    dry_run_world: int | None
    """ranks to plan for with --dry-run; None: a real load"""
    quiet: bool
    """no progress output"""
    rank: int
    """this process's global rank (0 in a dry run)"""
    world_size: int
    """ranks in the job (the planned world in a dry run)"""


def parse(argv: list[str] | None, environ: Mapping[str, str] = os.environ, *,
          local_device: bool = True) -> Invocation:
    """Checks the command line and the launcher's variables; returns the run they describe.

    Args:
        local_device: the ranks run on this machine, so ``--device cuda`` needs CUDA here
            (a Ray driver passes False: its actors run elsewhere).

    Raises:
        UsageError: naming the option or variable that is unusable, and why.
    """
    args = parser().parse_args(argv)
    try:
        return _checked(args, environ, local_device)
    except ConfigError as err:  # the verdict still replaces an earlier run's --json, if it can
        if args.json and not isinstance(err, _JsonPathError):
            with contextlib.suppress(ConfigError):
                err.json_path = _json_path(args.json, _env_rank(environ))
        raise


def _checked(args: argparse.Namespace, environ: Mapping[str, str], local_device: bool) -> Invocation:
    if args.checkpoint is not None and not args.checkpoint.strip():
        raise UsageError("the checkpoint argument is empty (an unset shell variable?); name a directory, "
                         "or leave it out to load the bundled example")
    config = _load_config(args)
    if args.world is not None and not args.dry_run:
        raise UsageError("--world sets the planned world of --dry-run; a real load takes its world from "
                         "the launcher (WORLD_SIZE)")
    if args.dry_run and config.verify_enabled:
        raise UsageError("--verify-checksums hashes the files a load reads, and --dry-run reads no tensor data; "
                         "verify with a load")
    if args.dry_run:
        rank, world = 0, _dry_run_world(args, environ)
    else:
        rank, world = _launch_world(environ)
        if config.device == "cuda" and local_device:
            _require_cuda()
    json_path = _json_path(args.json, rank) if args.json else None
    return Invocation(checkpoint=args.checkpoint, config=config, json_path=json_path,
                      json_per_rank=bool(args.json) and RANK_FIELD in args.json,
                      dry_run_world=world if args.dry_run else None, quiet=args.quiet, rank=rank, world_size=world)


def json_target(path: str, rank: int) -> str:
    """The file a rank writes for a --json ``path`` ({rank} filled in)."""
    return path.replace(RANK_FIELD, str(rank))


def _load_config(args: argparse.Namespace) -> LoadConfig:
    extra = _extra_config(args.model_loader_extra_config)
    for key, value, flag in (("num_read_threads", args.read_threads, "--read-threads"),
                             ("staging_mib", args.staging_mib, "--staging-mib")):
        if value is not None:
            if key in extra:
                raise UsageError(f"{flag} and --model-loader-extra-config both set {key}; give it once")
            extra[key] = value
    if args.verify_checksums and "verify_checksums" in extra:
        raise UsageError("--verify-checksums and --model-loader-extra-config both set verify_checksums; give it once")
    if args.enable_expert_parallel and args.ep is not None:
        raise UsageError("--ep and --enable-expert-parallel both set the expert-parallel size; give one")
    return LoadConfig(extra_config=extra, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep or 1,
                      expert_parallel=args.enable_expert_parallel,
                      expert_placement=args.expert_placement, redundant_experts=args.redundant_experts,
                      expert_map=args.expert_map, device=args.device, dtype=None if args.dtype == "auto" else args.dtype, quantize=args.quantize,
                      kv_cache_dtype=args.kv_cache_dtype, track=None if args.track is None else args.track == "on",
                      ignore=tuple(args.ignore), strict=args.strict, failure_timeout=args.failure_timeout,
                      check_finite=args.check_finite, strict_dtype=args.strict_dtype,
                      allow_pickle_format=args.allow_pickle_format, verify_checksums=args.verify_checksums,
                      rules=_rules(args.rules))


def _rules(path: str | None) -> str | None:
    """A --rules file, checked on its own before anything is read (its match with the checkpoint is
    checked by the load)."""
    if path is not None:
        from .rules import read_rules
        try:
            read_rules(path)
        except ConfigError as err:
            raise UsageError(str(err)) from None
    return path


def _extra_config(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UsageError(f"--model-loader-extra-config is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--model-loader-extra-config must be a JSON object, got {text!r}")
    return value


def _dry_run_world(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.world is not None:
        return _world_size("--world", args.world)
    if environ.get("WORLD_SIZE"):
        return _world_size("WORLD_SIZE", _integer("WORLD_SIZE", environ["WORLD_SIZE"]))
    return _world_size("the world of --tp x --pp x --dp", args.tp * args.pp * (args.dp or 1))


def _launch_world(environ: Mapping[str, str]) -> tuple[int, int]:
    """Reads torchrun's variables; a job of several ranks needs its rendezvous address."""
    world = _world_size("WORLD_SIZE", _integer("WORLD_SIZE", environ.get("WORLD_SIZE", "1")))
    rank = _integer("RANK", environ.get("RANK", "0"))
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} does not fit WORLD_SIZE={world} (ranks are 0 to {world - 1})")
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if environ.get(name) is not None and _integer(name, environ[name]) < (0 if name == "LOCAL_RANK" else 1):
            raise UsageError(f"{name}={environ[name]} must be {'0 or more' if name == 'LOCAL_RANK' else 'positive'}")
    if world > 1:
        if not environ.get("MASTER_ADDR"):
            raise UsageError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: start the ranks with torchrun, "
                             "or set MASTER_ADDR and MASTER_PORT to rank 0's address")
        port = _integer("MASTER_PORT", environ.get("MASTER_PORT", ""))
        if not 0 < port < 65536:
            raise UsageError(f"MASTER_PORT={port} is not a TCP port (1 to 65535)")
    return rank, world


def _env_rank(environ: Mapping[str, str]) -> int:
    try:
        return int(environ.get("RANK", "0"))
    except ValueError:
        return 0


def _integer(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"{name}={text!r} is not an integer") from None


def _world_size(what: str, world: int) -> int:
    if not 1 <= world <= MAX_WORLD:
        raise UsageError(f"{what} {world} is not a world size distload plans for (1 to {MAX_WORLD} ranks)")
    return world


def _require_cuda() -> None:
    import torch
    if not torch.cuda.is_available():
        raise UsageError("--device cuda, but this machine has no usable CUDA device "
                         "(torch.cuda.is_available() is False); use --device cpu")


def _json_path(path: str, rank: int) -> str:
    """Checks that this rank's --json file can be written, before anything is loaded (which rank
    writes it is decided at exit: the reporting one, or each when the path names the rank)."""
    target = os.path.abspath(json_target(path, rank))
    if not os.path.basename(target) or os.path.isdir(target):
        raise _JsonPathError(f"--json {path} names a directory; give a file path such as {os.path.join(path, 'report.json')}")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise _JsonPathError(f"--json {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _JsonPathError(f"--json {path}: directory {parent} is not writable")
    return target
