"""CUDA paths: pinned host buffers, async host-to-device copies, NCCL collectives.

Marked ``gpu``; skipped cleanly where CUDA is not available (as in CI).
"""

import datetime
import os

import pytest
import torch

import distload

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_load_matches_cpu_load():
    directory = distload.example_checkpoint()
    on_cpu = distload.load(directory, distload.LoadConfig(device="cpu", dtype="float32"))
    on_gpu = distload.load(directory, distload.LoadConfig(device="cuda", dtype="float32"))
    assert on_gpu.report.complete
    cpu_params = dict(on_cpu.model.named_parameters())
    for name, param in on_gpu.model.named_parameters():
        assert param.device.type == "cuda", name
        assert torch.equal(param.cpu(), cpu_params[name]), name
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = on_cpu.model(ids)
    got = on_gpu.model(ids.cuda()).cpu()
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4


def test_nccl_group_of_one_runs_the_tracking_collectives(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60),
                            device_id=torch.device("cuda", 0))
    try:
        loaded = distload.load(distload.example_checkpoint(), distload.LoadConfig(device="cuda"),
                               world=distload.comm.WorldInfo(rank=0, world_size=1, local_rank=0))
        assert loaded.report.complete
        assert loaded.report.ranks[0].bytes_read > 0
        # a missing tensor goes through the second exchange as well
        cfg = distload.LoadConfig(device="cuda", skip_units={0: ("model.norm.weight",)})
        with pytest.raises(distload.MissingWeightsError) as err:
            distload.load(distload.example_checkpoint(), cfg,
                          world=distload.comm.WorldInfo(rank=0, world_size=1, local_rank=0))
        assert [e.name for e in err.value.report.findings.missing] == ["model.norm.weight"]
    finally:
        dist.destroy_process_group()


def test_pinned_reads_fill_bf16_parameters_exactly():
    from safetensors.torch import load_file

    directory = distload.example_checkpoint()
    loaded = distload.load(directory, distload.LoadConfig(device="cuda"))
    tensors = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, f)))
    norm = loaded.model.model.norm.weight
    assert norm.dtype == torch.bfloat16
    assert torch.equal(norm.cpu(), tensors["model.norm.weight"])
