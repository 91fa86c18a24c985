import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline dataset copies: $FASTROBUST_DATA, else <repo>/../shared/data; skip when absent."""
    env = os.environ.get("FASTROBUST_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path} (set FASTROBUST_DATA to the folder holding them)")
    return path
