"""Benchmark: kohya.export_kohya on the full-size SD 1.5 UNet and text encoder, rank-8 LoRA on every nn.Linear,
against the export it replaced (a float64 SVD of every layer's dense update), measured in the same run.

    python bench/export.py [--threads 1] [--repeat 3] [--svd-per-shape 1 | --svd-all]

Prints one JSON line per side and a last line with the ratio. Goal: the factor export under 5 s.
The SVD side takes many minutes on a CPU, so by default it factors `--svd-per-shape` layers of each distinct
(d_out, d_in) and extrapolates by how many layers have that shape (its line says so and how many were timed);
that counts the factorisation only, not the file writing, so it is a lower bound. `--svd-all` times the old
export end to end. The base layers' weights are allocated but never initialised: neither side reads them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from methods.adapters import inject  # noqa: E402
from methods.baselines import LoRALinear  # noqa: E402
from methods.kohya import export_kohya, kohya_module_name  # noqa: E402
from model import weights  # noqa: E402
from clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from sd_unet import UNet, UNetConfig, unet_diffusers_names  # noqa: E402

RANK = 8


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The replaced algorithm: (up [d_out, r], down [r, d_in]) with up @ down = r * delta (truncated SVD)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = (S[:rank] * rank).sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


def svd_export(adapters, unet_config, path) -> None:
    """The replaced export_kohya: a truncated SVD of every adapter's dense update."""
    tensors, unet_names = {}, unet_diffusers_names(unet_config)
    with torch.no_grad():
        for name, adapter in adapters.items():
            key = kohya_module_name(name, unet_names)
            up, down = low_rank_factors(adapter.delta_weight().float().cpu(), adapter.rank)
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    weights.save_file(tensors, path, {"ss_network_module": "networks.lora"})


def full_size_adapters() -> dict[str, LoRALinear]:
    """Rank-8 LoRA with random A and B on every nn.Linear of SD 1.5's UNet and text encoder."""
    with torch.device("meta"):
        model = nn.ModuleDict({"unet": UNet(UNetConfig()), "text_encoder": CLIPTextModel(CLIPTextConfig())})
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    adapters = inject(model, lambda base: LoRALinear(base, r=RANK, generator=g))
    with torch.no_grad():
        for a in adapters.values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.01)
    return adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--repeat", type=int, default=3, help="runs of the factor export; the median is reported")
    svd = p.add_mutually_exclusive_group()
    svd.add_argument("--svd-per-shape", type=int, default=1, help="SVD side: layers timed per distinct shape")
    svd.add_argument("--svd-all", action="store_true", help="SVD side: time the old export of every layer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    adapters = full_size_adapters()
    common = {"layers": len(adapters), "rank": RANK, "threads": args.threads, "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            export_kohya(adapters, UNetConfig(), Path(tmp) / "factors.safetensors")
            times.append(time.perf_counter() - start)
        new = statistics.median(times)
        print(json.dumps({"side": "factors", "seconds": round(new, 3), "runs": [round(t, 3) for t in times],
                          **common}), flush=True)

        if args.svd_all:
            start = time.perf_counter()
            svd_export(adapters, UNetConfig(), Path(tmp) / "svd.safetensors")
            old, how = time.perf_counter() - start, "measured: the old export of every layer"
            timed = len(adapters)
        else:
            by_shape = defaultdict(list)
            for a in adapters.values():
                by_shape[(a.base.out_features, a.base.in_features)].append(a)
            old, timed, per_shape = 0.0, 0, {}
            with torch.no_grad():
                for shape, layers in sorted(by_shape.items()):
                    sample = layers[:args.svd_per_shape]
                    start = time.perf_counter()
                    for a in sample:
                        low_rank_factors(a.delta_weight().float().cpu(), a.rank)
                    each = (time.perf_counter() - start) / len(sample)
                    per_shape[f"{shape[0]}x{shape[1]}"] = {"layers": len(layers), "seconds_each": round(each, 3)}
                    old += each * len(layers)
                    timed += len(sample)
            how = (f"extrapolated: {timed} of {len(adapters)} layers factored ({args.svd_per_shape} per distinct "
                   "shape), times the count of each shape; factorisation only, file writing not included")
            common = {**common, "per_shape": per_shape}
        print(json.dumps({"side": "svd", "seconds": round(old, 3), "how": how, "timed_layers": timed, **common}))
    print(json.dumps({"svd_over_factors": round(old / new, 1), "goal_factors_under_s": 5,
                      "goal_met": new < 5}))


if __name__ == "__main__":
    main()
