"""The kohya format (methods/kohya.py): every method's factors are its update, the export writes them at the rank really
used without forming a dense matrix, a file read back gives the adapted model's outputs, bad files are refused,
and sample.py --adapter takes a kohya file. diffusers' reading of the same files is in test_pipeline.py."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode

from methods.adapters import Adapter, inject, merge, save_adapters
from methods.baselines import AdaLoRALinear, DyLoRALinear, LoRALinear
from methods.kohya import export_kohya, load_kohya, read_kohya
from methods.lora2 import LoRA2Linear
from model import weights
from model.sd15 import load_embedded, tiny_sd15
from training.method_table import METHODS
import sample
from selora import SeLoRALinear, expand
from test_selora import _one_thread  # noqa: F401  (tiny tensors: one thread avoids synchronisation costs)


def adapter_at(method: str, base: nn.Linear, k: int, g: torch.Generator, std: float = 0.1) -> Adapter:
    """An adapter of `method` with random factors whose rank in use is k (0..3), each method leaving ranks unused
    in its own way: SeLoRA a just-added zero row of B, DyLoRA the ranks beyond b = k, AdaLoRA masked E_i = 0.
    k = 0: B (AdaLoRA: E) stays zero, as in a fresh adapter."""
    def rand(shape):
        return torch.randn(shape, generator=g) * std
    if method == "lora":
        a = LoRALinear(base, r=max(k, 1), generator=g)
    elif method == "selora":
        a = SeLoRALinear(base, generator=g)
        for _ in range(k):
            expand(a, rand((base.in_features, 1)))
    elif method == "dylora":
        a = DyLoRALinear(base, r=3, generator=g)
        a.set_rank(max(k, 1))
    elif method == "adalora":
        a = AdaLoRALinear(base, init_r=4, generator=g)
    else:
        a = LoRA2Linear(base, rank=max(k, 1), generator=g)
    with torch.no_grad():
        a.A.copy_(rand(a.A.shape))
        if method == "adalora":
            a.B.copy_(rand(a.B.shape))
            a.E[torch.randperm(4, generator=g)[:k]] = (1.0 + rand(k)).to(a.E)  # the others stay 0: masked
        elif k > 0:
            a.B[:k].copy_(rand((k, base.out_features)))  # SeLoRA's last row, just added, stays 0
        if method == "lora2":
            a.rho += rand(())
    return a


def adapt(sd, method: str, seed: int = 0, ranks=(1, 2, 3, 0)) -> tuple[dict[str, Adapter], dict[str, int]]:
    """Adapters of `method` on every linear layer of `sd`, ranks in use cycling through `ranks`; and those ranks."""
    g, cycle = torch.Generator().manual_seed(seed), itertools.cycle(ranks)
    used = {}

    def make(base):
        used[base] = next(cycle)
        return adapter_at(method, base, used[base], g)
    named = inject(sd.adaptable(), make)
    return named, {name: used[a.base] for name, a in named.items()}


def outputs(sd, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder context, UNet noise prediction) on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sd.text_encoder.config.vocab_size, (2, 77), generator=g)
    x = torch.randn(2, sd.unet.config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        ctx = sd.text_encoder(ids)
        return ctx, sd.unet(x, torch.tensor([10, 700]), ctx)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("method", METHODS)
def test_factors_are_the_update_each_forward_applies(method):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 12, dtype=torch.float64, generator=g)
    for k in (1, 2, 3):
        layer = adapter_at(method, nn.Linear(12, 10).double(), k, g).eval()
        A, B, scale = layer.factors()
        assert A.shape[1] == B.shape[0] and A.shape[0] == 12 and B.shape[1] == 10
        with torch.no_grad():
            torch.testing.assert_close(layer(x) - layer.base(x), scale * (x @ A @ B), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(merge(layer)(x), layer(x), rtol=1e-12, atol=1e-12)  # via delta_weight


class NoDenseMatrix(TorchFunctionMode):
    """Fails on any torch call that returns a matrix (off the meta device) with two sides wider than `rank`."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.dim() >= 2 \
                    and sorted(t.shape)[-2] > self.rank:
                raise AssertionError(f"{func} made a {tuple(t.shape)} tensor")
        return out


@pytest.mark.parametrize("method", METHODS)
def test_export_then_import_reproduces_the_adapted_model(method, tmp_path, monkeypatch):
    sd = tiny_sd15(0)
    base_ctx, base_eps = outputs(sd)
    named, used = adapt(sd, method)
    ctx, eps = outputs(sd)
    assert rel_err(base_ctx, ctx) > 1e-3 and rel_err(base_eps, eps) > 1e-3  # the adapters do change the model

    def no_dense(self):
        raise AssertionError("export_kohya called delta_weight")
    monkeypatch.setattr(Adapter, "delta_weight", no_dense)
    path = tmp_path / "lora.safetensors"
    with NoDenseMatrix(rank=4):
        export_kohya(named, sd.unet.config, path)
    monkeypatch.undo()

    fresh = tiny_sd15(0)
    loaded, merged = load_kohya(fresh.adaptable(), path)
    assert merged == [] and all(isinstance(a, LoRALinear) for a in loaded.values())
    assert {name: a.rank for name, a in loaded.items()} == {name: k for name, k in used.items() if k > 0}
    assert all(a.scale == 1 / a.rank for a in loaded.values())  # alpha = 1
    got_ctx, got_eps = outputs(fresh)
    assert rel_err(got_ctx, ctx) < 1e-5 and rel_err(got_eps, eps) < 1e-5


def test_up_and_down_have_equal_norms_per_rank(tmp_path):
    sd = tiny_sd15(0)
    g = torch.Generator().manual_seed(0)
    named = inject(sd.adaptable(), lambda base: LoRALinear(base, r=2, alpha=1e-3, generator=g), ["attn1.to_q"])
    with torch.no_grad():
        a = named["unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
        a.A.mul_(1e3)
        a.B.copy_(torch.randn(a.B.shape, generator=g) * 1e-5)
    export_kohya(named, sd.unet.config, tmp_path / "x.safetensors")
    (down, up, alpha), = [v for k, v in read_kohya(tmp_path / "x.safetensors").items() if k.endswith("attn1_to_q")]
    torch.testing.assert_close(down.norm(dim=1), up.norm(dim=0), rtol=1e-5, atol=0)
    assert alpha == 1.0
    torch.testing.assert_close(up.double() @ down.double() / 2, a.delta_weight().double(), rtol=1e-5, atol=1e-12)


def kohya_file(path, r=2, alpha=None, kernel=()):
    """A hand-made kohya file for one text-encoder and one UNet projection, as kohya's scripts name them;
    kernel=(1, 1): with the 4-D shapes of a 1x1 conv LoRA."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, d_in, d_out in (("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
                                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32)):
        tensors[f"{module}.lora_down.weight"] = torch.randn(r, d_in, *kernel, generator=g)
        tensors[f"{module}.lora_up.weight"] = torch.randn(d_out, r, *kernel, generator=g)
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
    weights.save_file(tensors, path)
    return tensors


def test_default_alpha_is_r_and_1x1_kernels_of_linear_layers_are_read_as_matrices(tmp_path):
    plain = kohya_file(tmp_path / "plain.safetensors", r=4)
    loaded, _ = load_kohya(tiny_sd15(0).adaptable(), tmp_path / "plain.safetensors")
    assert len(loaded) == 2 and all(a.scale == 1.0 for a in loaded.values())
    te = loaded["text_encoder.encoder.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(te.B.T, plain["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"])
    kohya_file(tmp_path / "conv.safetensors", r=4, alpha=2.0, kernel=(1, 1))
    conv, _ = load_kohya(tiny_sd15(0).adaptable(), tmp_path / "conv.safetensors")
    assert all(a.scale == 0.5 for a in conv.values())
    for name, a in conv.items():
        torch.testing.assert_close(a.A, loaded[name].A, rtol=0, atol=0)


def bad(tensors, key, value=None):
    """tensors with `key` replaced by value (removed if None)."""
    changed = dict(tensors)
    changed.pop(key)
    return changed if value is None else {**changed, key: value}


Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.mark.parametrize("change, key, message", [
    (lambda t: bad(t, f"{Q}.lora_up.weight"), f"{Q}.lora_up.weight", "is missing"),
    (lambda t: bad(t, f"{Q}.lora_down.weight", torch.zeros(2, 31)), f"{Q}.lora_down.weight",
     r"lora_up @ lora_down is 32 x 31, but 'text_encoder.encoder.layers.0.self_attn.q_proj' has a 32 x 32 weight"),
    (lambda t: bad(t, f"{Q}.lora_down.weight", torch.zeros(3, 32)), f"{Q}.lora_down.weight", r"are not \[r, d_in\]"),
    (lambda t: {**t, f"{Q}.hada_w1_a": torch.zeros(2, 32)}, f"{Q}.hada_w1_a", "LoHa, LoKr"),
    (lambda t: {**t, f"{Q}.alpha": torch.ones(2)}, f"{Q}.alpha", "expected a scalar"),
    (lambda t: {**t, "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 32),
                "lora_unet_nowhere.lora_up.weight": torch.zeros(32, 2)}, "lora_unet_nowhere", "no SD 1.5 module"),
    (lambda t: {**t, f"{CONV}.lora_down.weight": torch.zeros(2, 32, 3, 3),
                f"{CONV}.lora_up.weight": torch.zeros(32, 2, 1, 1)}, f"{CONV}.lora_down.weight", r"3x3 conv LoRA"),
    (lambda t: {**t, f"{CONV}.lora_down.weight": torch.zeros(2, 32, 1, 1),
                f"{CONV}.lora_up.weight": torch.zeros(32, 2, 1, 1)}, f"{CONV}.lora_down.weight",
     r"is a \(3, 3\) conv"),
])
def test_bad_files_are_refused_naming_file_and_key_before_the_model_changes(tmp_path, change, key, message):
    path = tmp_path / "bad.safetensors"
    weights.save_file(change(kohya_file(tmp_path / "good.safetensors")), path)
    sd = tiny_sd15(0)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        load_kohya(sd.adaptable(), path)
    assert str(path) in str(err.value) and f"'{key}" in str(err.value)
    assert not any(isinstance(m, Adapter) for m in sd.adaptable().modules())
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())


def test_sample_takes_a_kohya_file_and_refuses_a_bad_one(tmp_path, capsys):
    sd = load_embedded()  # the model sample.py uses without --model
    named, _ = adapt(sd, "selora", ranks=(1, 2, 3))
    save_adapters(named, tmp_path / "ours.safetensors")
    export_kohya(named, sd.unet.config, tmp_path / "lora.kohya.safetensors")
    args = ["--prompt", "a small opacity", "--steps", "3", "--size", "32", "--seed", "1"]
    images = {}
    for name, adapter in (("none", None), ("ours", "ours.safetensors"), ("kohya", "lora.kohya.safetensors")):
        extra = ["--adapter", str(tmp_path / adapter)] if adapter else []
        assert sample.main(args + ["--out", str(tmp_path / name)] + extra) == 0
        images[name] = np.asarray(Image.open(tmp_path / name / "00000.png")).astype(int)
    assert np.abs(images["kohya"] - images["ours"]).max() <= 1  # 8-bit rounding at most
    assert np.abs(images["none"] - images["ours"]).max() > 5
    weights.save_file({f"{Q}.lora_down.weight": torch.zeros(2, 32)}, tmp_path / "bad.safetensors")
    assert sample.main(args + ["--out", str(tmp_path / "bad"), "--adapter", str(tmp_path / "bad.safetensors")]) == 2
    assert f"key '{Q}.lora_up.weight' is missing" in capsys.readouterr().err
