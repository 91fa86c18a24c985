import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline dataset copies: $FASTROBUST_DATA, else <repo>/../shared/data; skip when absent."""
    env = os.environ.get("FASTROBUST_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path} (set FASTROBUST_DATA to the folder holding them)")
    return path


@pytest.fixture(scope="session")
def cifar_subset(shared_data):
    """The real CIFAR-10 subset of the end-to-end tests: 2,000 training, 200 validation, 500 test images."""
    from fastrobust.data import load_dataset

    return load_dataset("cifar10", shared_data, val_size=200, train_subset=2000, test_subset=500)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the cores are shared); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
