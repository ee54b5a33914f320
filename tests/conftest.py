"""Shared test set-up: make the flat top-level modules importable, fix seeds, and give in-process runs of train.py's
embedded default 96 phantoms instead of 2000 (the mechanics are the same; test_tiny_sd's check of what the default
teaches runs it as it is)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fewer_phantoms(request, monkeypatch):
    if "embedded_default_as_is" not in request.keywords:
        import train
        monkeypatch.setitem(train.EMBEDDED, "images", 96)
