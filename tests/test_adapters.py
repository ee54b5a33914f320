"""The adapter plumbing every method shares (methods/adapters.py), on SeLoRA's layer and the small models of
test_selora.py: injection, optimizer-state resizing, saving and loading, merging."""
import pytest
import torch
from torch import nn

from methods import adapters
from methods.adapters import inject, load_adapters, merge, resize_parameter, save_adapters, trainable_fraction
from selora import SeLoRA, SeLoRALinear
from test_selora import MLP, Block, batch, make, randomise


def test_resize_keeps_the_leading_block_and_refuses_unknown_state():
    p = nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.Adam([p])
    p.grad = torch.randn(4, 3)
    optimizer.step()
    m = optimizer.state[p]["exp_avg"].clone()
    resize_parameter(p, p.detach()[:, :2].clone(), optimizer)  # truncation, as a shrinking method does
    assert p.shape == (4, 2) and p.grad is None and torch.equal(optimizer.state[p]["exp_avg"], m[:, :2])
    with pytest.raises(ValueError, match="not in the optimizer"):
        resize_parameter(nn.Parameter(torch.zeros(2)), torch.zeros(3), optimizer)
    optimizer.state[p]["row_var"] = torch.zeros(4)
    with pytest.raises(ValueError, match="'row_var'.*not element-wise"):
        resize_parameter(p, torch.zeros(4, 3), optimizer)


def test_inject_wraps_every_linear_or_the_matching_ones():
    model = Block()
    ads = inject(model, SeLoRALinear)
    assert list(ads) == ["to_q", "to_k", "to_v", "to_out", "ff1", "ff2"]
    assert inject(model, SeLoRALinear) == {}  # the linear layers inside adapters are not wrapped again
    trainable, total, percent = trainable_fraction(model)
    lora = sum(d_in + d_out for d_in, d_out in [(8, 8)] * 4 + [(8, 12), (12, 8)])  # rank 1: d_in + d_out
    assert trainable == lora and total == 4 * (64 + 8) + (96 + 12) + 96 + lora
    assert percent == pytest.approx(100 * lora / total)
    assert all(p.requires_grad == (n.endswith((".A", ".B"))) for n, p in model.named_parameters())
    model = Block()
    assert list(inject(model, SeLoRALinear, ["to_*", "ff2"])) == ["to_q", "to_k", "to_v", "to_out", "ff2"]
    nested = nn.ModuleDict({"down": Block(), "up": Block()})
    assert list(inject(nested, SeLoRALinear, ["up.to_q", "*ff1"])) == ["down.ff1", "up.to_q", "up.ff1"]
    with pytest.raises(ValueError, match="'to_x' matches no nn.Linear of Block"):
        inject(Block(), SeLoRALinear, ["to_q", "to_x"])


def test_save_load_same_outputs_and_ranks(tmp_path):
    model, ads = make("block", dtype=torch.float32)
    for a in ads.values():
        a.scale.fill_(2.0)
    randomise(ads, grow=(0, 3, 9))
    control = SeLoRA(ads)
    control.last_step = 120
    path = tmp_path / "adapters.safetensors"
    save_adapters(ads, path, {**control.metadata(), "base_model": "tiny-block"})
    x, _ = batch("block", 2, dtype=torch.float32)
    fresh = Block()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".base." in k})
    loaded, meta = load_adapters(fresh, path, SeLoRALinear)
    assert {n: a.rank for n, a in loaded.items()} == {n: a.rank for n, a in ads.items()}
    assert sorted({a.rank for a in loaded.values()}) == [1, 4, 10]
    assert torch.equal(fresh(x), model(x)) and float(loaded["to_k"].scale) == 2.0
    assert (meta["lambda"], meta["t"], meta["step"], meta["base_model"], meta["method"]) == ("1.1", "40", "120", "tiny-block", "selora")
    assert all(a.A.requires_grad and not a.base.weight.requires_grad for a in loaded.values())
    with pytest.raises(ValueError, match="holds selora adapters, asked to load them as other"):
        load_adapters(Block(), path, type("Other", (SeLoRALinear,), {"method": "other"}))
    with pytest.raises(ValueError, match="has no layer 'to_q'"):
        load_adapters(MLP(), path, SeLoRALinear)
    with pytest.raises(ValueError, match="metadata key 'ranks'"):
        save_adapters(ads, tmp_path / "x.safetensors", {"ranks": "{}"})


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_merge_equals_the_unmerged_forward(dtype, tol):
    model, ads = make("block", dtype=dtype)
    randomise(ads, grow=(1, 9))
    x, _ = batch("block", 3, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        for layer, adapter in ads.items():
            parent, _, attr = layer.rpartition(".")
            setattr(model.get_submodule(parent), attr, merge(adapter))
        after = model(x)
    assert not any(isinstance(m, adapters.Adapter) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in ads)
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)


def test_low_precision_base_keeps_fp32_adapters():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = SeLoRALinear(base)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.B.normal_()
    assert layer.A.dtype == layer.B.dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    expected = base(x).float() + 8.0 * (x.float() @ layer.A @ layer.B)
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


