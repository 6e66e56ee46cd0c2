from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .helpers import SHARED_DATA

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
