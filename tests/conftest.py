import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pool():
    """Eight long-lived gloo workers shared by every multi-rank test."""
    from distload.testing import RankPool

    p = RankPool(8)
    yield p
    p.close()


@pytest.fixture(scope="session", autouse=True)
def _example_cache(tmp_path_factory):
    """Keeps the example checkpoint cache inside the test session."""
    os.environ["DISTLOAD_CACHE"] = str(tmp_path_factory.mktemp("distload-cache"))
