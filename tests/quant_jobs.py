"""Functions the quantization tests run on every rank (importable by pool workers)."""

from __future__ import annotations

import distload


def _plain(t):
    """A tensor as numpy; FP8 as its raw bytes and bf16 as float32 values, tagged with the dtype."""
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return ("fp8", str(t.dtype), t.view(torch.uint8).numpy().copy())
    if t.dtype == torch.bfloat16:  # numpy has no bf16 either: its values, exactly, as float32
        return ("bf16", str(t.dtype), t.float().numpy().copy())
    return t.numpy().copy()


def load_quantized(directory: str, options: dict, input_ids=None, device: str = "cpu") -> dict:
    """Loads with ``LoadConfig(device=device, **options)`` (``cuda``: this rank's GPU, with NCCL);
    returns whether ``load`` raised MissingWeightsError (and the report JSON), this rank's state with
    FP8 tensors as raw bytes, and, given ``input_ids``, its logits (None before the last pipeline stage)."""
    import torch

    try:
        loaded = distload.load(directory, distload.LoadConfig(device=device, **options),
                               keep_group=input_ids is not None)
    except distload.MissingWeightsError as err:
        return {"raised": True, "report": err.report.to_json()}
    with loaded:
        logits = None
        if input_ids is not None:
            with torch.no_grad():
                logits = loaded.model(input_ids.to(device))
        state = {name: _plain(t) for name, t in loaded.model.state_dict().items()}
        return {"raised": False, "report": loaded.report.to_json(), "state": state,
                "logits": None if logits is None else logits.float().cpu().numpy().copy()}


def load_error(directory: str, options: dict) -> str:
    """Loads and returns the DistloadError text ('' if it loaded)."""
    try:
        distload.load(directory, distload.LoadConfig(device="cpu", **options))
    except distload.DistloadError as err:
        return f"{type(err).__name__}: {err}"
    return ""


def load_with_failing_post_load(directory: str, options: dict, failing_rank: int) -> str:
    """Loads with ``failing_rank``'s online-FP8 post-load step raising; returns what ``load``
    raised on this rank ('' if it returned a model)."""
    import torch.distributed as dist

    from distload.quant.fp8 import OnlineFP8

    real = OnlineFP8.post_load

    def post_load(self, layer, attr, geometry):
        if dist.get_rank() == failing_rank:
            raise MemoryError("simulated: no memory for the FP8 copy")
        return real(self, layer, attr, geometry)

    OnlineFP8.post_load = post_load
    try:
        distload.load(directory, distload.LoadConfig(device="cpu", **options))
    except BaseException as err:  # the failing rank's own MemoryError, or a peer's failure
        return f"{type(err).__name__}: {err}"
    finally:
        OnlineFP8.post_load = real
    return ""


def load_dequantized(directory: str, options: dict) -> dict:
    """Loads with ``LoadConfig(device="cpu", **options)``; returns each quantized weight of this rank
    as its layer dequantizes it (float32, by parameter name)."""
    import torch

    from distload.quant.layer import Quantizable

    loaded = distload.load(directory, distload.LoadConfig(device="cpu", **options))
    out = {}
    for path, module in loaded.model.named_modules():
        if isinstance(module, Quantizable) and module.quant is not None:
            for attr in module.QUANTIZABLE:
                out[f"{path}.{attr}"] = module.matrix(attr, torch.float32).numpy().copy()
    return out
