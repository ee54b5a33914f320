"""The Inception v3 of FID: the TensorFlow 2015-12-05 network as pytorch-fid and torch-fidelity port it.

It differs from torchvision's Inception v3 in three places, all kept here because FID numbers depend on them:
the 3x3 average pools inside the A, C and first E blocks leave the zero padding out of the average
(TensorFlow's behaviour), the last E block pools its pool branch with a 3x3 max pool, and the classifier
has 1008 classes. Module names follow torchvision's, so pytorch-fid's weight file
`pt_inception-2015-12-05-6726825d.pth` loads by name (see `load_inception`).

FID features (pytorch-fid's `--dims`): 64 after the first max pool, 192 after the second, 768 after Mixed_6e
(what feeds the auxiliary classifier), 2048 after the last block; each averaged over space.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import load_file, load_strict

DIMS = (64, 192, 768, 2048)
SIZE = 299


class BatchNorm(nn.Module):
    """Batch normalisation with frozen statistics (eps 1e-3, as TensorFlow's Inception): inference only."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Conv(nn.Module):
    """Convolution without bias, batch norm, ReLU (torchvision's BasicConv2d)."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = BatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, whose border averages leave the padding out (TensorFlow's 'SAME')."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(b7)),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """Expanded filter bank; `max_pool` selects the FID network's max-pooled pool branch (Mixed_7c)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """FID Inception v3: `features(x, dims)` gives the spatially averaged activations FID uses."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)      # 299 -> 149
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)               # -> 147
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)    # max pool -> 73: 64 features
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)              # -> 71, max pool -> 35: 192 features
        self.Mixed_5b = InceptionA(192, pool_features=32)  # 256 channels
        self.Mixed_5c = InceptionA(256, pool_features=64)  # 288
        self.Mixed_5d = InceptionA(288, pool_features=64)  # 288
        self.Mixed_6a = InceptionB(288)                    # 768 x 17 x 17
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)            # 768 features
        self.Mixed_7a = InceptionD(768)                    # 1280 x 8 x 8
        self.Mixed_7b = InceptionE(1280, max_pool=False)   # 2048
        self.Mixed_7c = InceptionE(2048, max_pool=True)    # 2048 features
        self.fc = nn.Linear(2048, 1008)

    def features(self, x: torch.Tensor, dims: tuple[int, ...] = (2048,)) -> dict[int, torch.Tensor]:
        """Activations for each of `dims` as {dim: (N, dim)}; `x` is `preprocess`ed, (N, 3, 299, 299) in [-1, 1].

        Stops after the deepest block asked for.
        """
        unknown = set(dims) - set(DIMS)
        if unknown:
            raise ValueError(f"Inception feature dims {sorted(unknown)} unknown; choose from {DIMS}")
        stages = [
            (64, [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, nn.MaxPool2d(3, stride=2)]),
            (192, [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, nn.MaxPool2d(3, stride=2)]),
            (768, [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                   self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e]),
            (2048, [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]),
        ]
        out = {}
        for dim, layers in stages:
            for layer in layers:
                x = layer(x)
            if dim in dims:
                out[dim] = x.mean((2, 3))
            if len(out) == len(set(dims)):
                break
        return out

    def logits(self, pool: torch.Tensor) -> torch.Tensor:
        """The 1008-class logits from the 2048 pool features (for the Inception Score; FID does not use them)."""
        return self.fc(pool)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, 299, 299) in [-1, 1]: bilinear resize without antialiasing, as pytorch-fid."""
    x = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an Inception weight file: pytorch-fid's .pth (unpickled with weights_only=True) or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Inception weights file (pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth or a safetensors copy of it)")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure gets the same explanation
        raise ValueError(f"{path}: not a weights-only torch file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state_dict), got {type(state).__name__}")
    return state


def load_inception(path: str | os.PathLike) -> InceptionV3:
    """Build the FID Inception and load `path` strictly.

    The name map is the identity except that batch norm's `num_batches_tracked` counters (training
    bookkeeping, present or not depending on the torch version that saved the file) are dropped.
    """
    state = {k: v for k, v in load_state(path).items() if not k.endswith(".num_batches_tracked")}
    return load_strict(InceptionV3(), state, path).eval()
