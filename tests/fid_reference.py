"""Test helpers: pytorch-fid's Inception with random weights in its own key layout, and small image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict in the layout of pytorch-fid's pt_inception file (torchvision Inception3 names,
    1008 classes, no auxiliary classifier), scaled so activations stay O(1) through the 47 layers."""
    import torchvision

    template = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                               init_weights=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in template.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("conv.weight") or name == "fc.weight":
            fan_in = t[0].numel()
            state[name] = torch.randn(t.shape, generator=g) * (2 / fan_in) ** 0.5
        elif name.endswith("running_var") or name.endswith("bn.weight"):
            state[name] = 0.5 + torch.rand(t.shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            state[name] = 0.1 * torch.randn(t.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def inception_state():
    """Module fixture: `random_inception_state()`."""
    return random_inception_state(seed=1)


@pytest.fixture(scope="module")
def inception_file(inception_state, tmp_path_factory) -> Path:
    """Module fixture: that state saved as pytorch-fid saves its weights (a torch pickle)."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(inception_state, path)
    return path


def pytorch_fid_inception(state: dict[str, torch.Tensor], dims: int, monkeypatch):
    """pytorch-fid's InceptionV3 for `dims`, built offline: its weight download returns `state` instead."""
    import pytorch_fid.inception as pfi

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(state))
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()


def write_images(folder: Path, n: int, size=(64, 48), shift: float = 0.0, seed: int = 0) -> Path:
    """`n` smooth random RGB PNGs (a blurred noise field plus `shift` in [0, 1] units)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.random((size[1] // 8 + 1, size[0] // 8 + 1, 3))
        img = Image.fromarray((low * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.float64) + 255 * shift + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder
