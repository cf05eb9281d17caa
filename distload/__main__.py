"""Command line: ``python -m distload [CHECKPOINT] ...`` (also under torchrun).

Exit codes of each process: 0 complete; 3 missing, inconsistent or mismatched
units (or unexpected ones under --strict), with the report still printed and
written; 1 any other DistloadError, as one line; 2 a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import DTYPES
from .quant.config import KV_CACHE_DTYPES, ONLINE
from .errors import ConfigError, DistloadError, LayoutError, MissingWeightsError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distload",
        description="Load a Hugging Face safetensors checkpoint into a tensor/data-parallel model and "
                    "prove, across all ranks, that every parameter was filled. Run it once per rank "
                    "(torchrun --nproc-per-node W -m distload ...), W = tp x pp x dp.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the bundled example)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel groups per stage (default 1)")
    p.add_argument("--expert-placement", choices=("linear", "round_robin"), default="linear")
    p.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="extra slots replicating the first R experts")
    p.add_argument("--expert-map", metavar="FILE",
                   help='per-layer expert -> slots JSON: {"layers": {"<layer>|default": {"<expert>": [slots]}}}')
    p.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: world / (tp x pp))")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON (rank 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available (NCCL), else cpu (gloo)")
    p.add_argument("--dtype", choices=sorted(DTYPES), metavar="DTYPE",
                   help="model dtype: bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument("--quantize", choices=ONLINE,
                   help="quantize an unquantized checkpoint's linear weights to FP8 (per channel) while loading")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="fp8: attention loads k_scale/v_scale (optional, default 1.0); auto (default): "
                        "only when config.json's quantization_config has a KV-cache scheme")
    p.add_argument("--track", choices=("on", "off"), help="merge every rank's record (default on)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="checkpoint names matching REGEX are never unexpected (repeatable)")
    p.add_argument("--strict", action="store_true", help="unexpected checkpoint tensors fail the load too")
    p.add_argument("--check-finite", action="store_true",
                   help="scan loaded pieces for NaN/Inf (reported as nonfinite; fails under --strict)")
    p.add_argument("--strict-dtype", action="store_true",
                   help="refuse checkpoint tensors of another dtype than the model's (default: cast, noted)")
    p.add_argument("--allow-pickle-format", action="store_true",
                   help="with no safetensors files, read .bin/.pt with torch.load(weights_only=True)")
    p.add_argument("--dry-run", action="store_true",
                   help="plan from the headers only, for --world ranks, on this machine (no process group, "
                        "no tensor data); exit 3 when units would be missing")
    p.add_argument("--world", type=int, default=None, metavar="N",
                   help="world size for --dry-run (default: WORLD_SIZE, else tp x dp)")
    p.add_argument("--read-threads", type=int, metavar="N",
                   help="reader threads per rank (default: the node's cores / its local ranks)")
    p.add_argument("--staging-mib", type=int, metavar="MIB",
                   help="host staging memory per rank, pinned on CUDA (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--failure-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a rank silent this long (killed, host gone) fails the job (default 30); "
                        "a rank that raises stops every rank at once")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on a usage error
    from . import api
    from .comm import world_from_env
    from .config import LoadConfig
    from .examples import example_checkpoint
    from .progress import Progress

    rank = int(os.environ.get("RANK", "0"))
    out = _Printer(rank == 0)
    extra = {key: value for key, value in (("num_read_threads", args.read_threads),
                                           ("staging_mib", args.staging_mib)) if value is not None}
    try:  # option values a parser cannot check (regexes, timeouts): usage errors, exit 2
        config = LoadConfig(extra_config=extra, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, expert_placement=args.expert_placement,
                            redundant_experts=args.redundant_experts, expert_map=args.expert_map,
                            device=args.device, dtype=args.dtype, quantize=args.quantize,
                            kv_cache_dtype=args.kv_cache_dtype,
                            track=None if args.track is None else args.track == "on",
                            ignore=tuple(args.ignore), strict=args.strict, failure_timeout=args.failure_timeout,
                            check_finite=args.check_finite, strict_dtype=args.strict_dtype,
                            allow_pickle_format=args.allow_pickle_format)
    except ConfigError as err:
        out.error(err)
        return EXIT_USAGE
    try:
        directory = args.checkpoint or example_checkpoint()
        if args.dry_run:
            from .dryrun import dry_run
            world = args.world or int(os.environ.get("WORLD_SIZE", "0")) or args.tp * args.pp * (args.dp or 1)
            report = dry_run(directory, config, world_size=world)
            out.report(report, args.json)
            return EXIT_OK if report.ok else EXIT_INCOMPLETE
        loaded = api.load(directory, config, world=world_from_env(),
                          progress=Progress() if rank == 0 and not args.quiet else None)
    except MissingWeightsError as err:
        out.report(err.report, args.json)
        return EXIT_INCOMPLETE
    except LayoutError as err:
        out.error(err)
        return EXIT_USAGE
    except DistloadError as err:
        out.error(err)
        return EXIT_ERROR
    out.report(loaded.report, args.json)
    return EXIT_OK


class _Printer:
    """Rank 0's output: the report and one-line errors."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def report(self, report, json_path: str | None) -> None:
        if not self.active:
            return
        print(report.format_text(), flush=True)
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(report.dumps() + "\n")

    def error(self, err: DistloadError) -> None:
        if self.active:
            print(f"distload: error: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
