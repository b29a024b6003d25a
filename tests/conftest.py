import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PRUNEKIT_EVAL_CACHE", "off")  # no lm-eval results cached in the user's folder; tests that
# exercise the cache (tests/test_fastlm.py) point it at their own tmp_path
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the workers share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random model folder per supported family."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny.make_model(f, root / f) for f in tiny.FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def pytest_collection_modifyitems(config, items):
    """The real-model and slow tests first (stable otherwise): with ``pytest -n 2 --dist worksteal`` (make test)
    the two workers then start on the long modules and finish together."""
    def weight(item) -> int:
        return 0 if item.get_closest_marker("real") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=weight)
