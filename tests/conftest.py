import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pool():
    """Eight long-lived gloo workers shared by every multi-rank test."""
    from distload.testing import RankPool

    p = RankPool(8, device="cpu")  # distload's own multi-rank tests are gloo tests
    yield p
    p.close()


@pytest.fixture(scope="session")
def gpu_pool():
    """One NCCL worker per visible GPU, each on its own device (``LOCAL_RANK``), for the
    ``cuda`` cases of tests/devices.py; skips without two GPUs."""
    from distload.testing import RankPool
    from tests.devices import visible_gpus

    if visible_gpus() < 2:
        pytest.skip(f"needs 2 CUDA devices, {visible_gpus()} visible")
    p = RankPool(visible_gpus(), device="cuda")
    yield p
    p.close()


@pytest.fixture
def ranks(request):
    """The pool a case of ``tests.devices.and_on_gpus`` names: ``cpu`` the gloo pool, ``cuda`` the
    NCCL pool; ``ranks.device`` is the device its jobs load on."""
    return request.getfixturevalue("gpu_pool" if request.param == "cuda" else "pool")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 4 logical CPUs, started once (about 3 s) for every Ray test;
    yields its address (for drivers in subprocesses). Skips when Ray is not installed."""
    import shutil

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    temp = f"/tmp/rayd-{os.getpid()}"  # short: Ray's unix socket paths must stay under 108 bytes
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _example_cache(tmp_path_factory):
    """Keeps the example checkpoint cache inside the test session."""
    os.environ["DISTLOAD_CACHE"] = str(tmp_path_factory.mktemp("distload-cache"))


@pytest.fixture(scope="session")
def example(_example_cache):
    """The bundled example checkpoint (tiny bf16 Llama, two shards and an index): read it, or
    copy it (``tests.hf_checkpoints.copy_checkpoint``) before changing anything."""
    import distload

    return distload.example_checkpoint()
