"""LoRA, DyLoRA and AdaLoRA (methods/baselines.py): each method's defining property on small torch models,
and AdaLoRA against peft's `adalora` tuner (the test-only oracle) step by step."""
import math

import pytest
import torch
from torch import nn

from methods.adapters import inject, merge, resize_parameter, select_parameter
from methods.baselines import (AdaLoRA, AdaLoRALinear, DyLoRA, DyLoRALinear, LoRALinear, budget_schedule, draw_rank,
                       orthogonal_gradient, orthogonal_regulariser)
from test_selora import MLP, _one_thread  # noqa: F401  (the SeLoRA tests' small model, and their one-thread fixture)


def fill(param, seed, scale=0.3):
    with torch.no_grad():
        param.copy_(scale * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed), dtype=param.dtype))


# ---------------------------------------------------------------- LoRA

def test_lora_is_a_dense_update_of_rank_r():
    base = nn.Linear(12, 10).double()
    layer = LoRALinear(base, r=3, alpha=6.0)
    x = torch.randn(5, 12, dtype=torch.float64)
    assert torch.equal(layer(x), base(x)) and torch.equal(layer.B, torch.zeros(3, 10, dtype=torch.float64))
    bound = math.sqrt(6 / 12)
    assert 0.5 * bound < layer.A.abs().max() <= bound
    fill(layer.B, 1)
    dense = base.weight + 2.0 * (layer.A @ layer.B).T  # alpha / r = 2
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias, rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3
    torch.testing.assert_close(merge(layer)(x), layer(x), rtol=1e-12, atol=1e-12)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B"}
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        LoRALinear(base, r=0)


# ---------------------------------------------------------------- DyLoRA

@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_dylora_at_rank_b_is_the_lora_of_its_first_b_ranks_with_scale_alpha_over_b(b):
    base = nn.Linear(7, 5).double()
    dy = DyLoRALinear(base, r=4, alpha=8.0)
    fill(dy.B, 2)
    lora = LoRALinear(base, r=b, alpha=8.0)
    with torch.no_grad():
        lora.A.copy_(dy.A[:, :b])
        lora.B.copy_(dy.B[:b])
    assert float(lora.scale) == 8.0 / b
    dy.set_rank(b)
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(dy(x), lora(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(merge(dy)(x), lora(x), rtol=1e-12, atol=1e-12)
    dy.set_rank(None)  # inference default: the full rank
    torch.testing.assert_close(dy(x), x @ (base.weight + 2.0 * (dy.A @ dy.B).T).T + base.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_dylora_gradient_reaches_only_the_right_ranks(mode):
    dy = DyLoRALinear(nn.Linear(7, 5).double(), r=4, mode=mode)
    fill(dy.B, 3)
    x = torch.randn(3, 7, dtype=torch.float64)
    for b in range(1, 5):
        dy.zero_grad()
        dy.set_rank(b)
        dy(x).square().sum().backward()
        trained = [b - 1] if mode == "frozen" else list(range(b))
        for i in range(4):
            assert (dy.A.grad[:, i].abs().sum() > 0) == (i in trained), (b, i)
            assert (dy.B.grad[i].abs().sum() > 0) == (i in trained), (b, i)


def test_dylora_controller_samples_one_uniform_b_per_step_for_all_layers():
    model = MLP().double()
    ads = inject(model, lambda base: DyLoRALinear(base, r=4))
    control = DyLoRA(ads, seed=5)
    counts = [0] * 5
    for step in range(1, 401):
        with control.capture(step, batch_size=2):
            ranks = {a.b for a in ads.values()}
            assert ranks == {draw_rank(5, step, 4)}
            counts[ranks.pop()] += 1
        assert all(a.b is None for a in ads.values())  # full rank outside training steps
    assert counts[0] == 0 and all(70 <= c <= 130 for c in counts[1:]), counts  # 100 expected each
    assert draw_rank(5, 17, 4) == draw_rank(5, 17, 4) and len({draw_rank(s, 1, 4) for s in range(40)}) == 4
    with pytest.raises(ValueError, match="rank b must be in 1..4"):
        ads["l1"].set_rank(5)
    with pytest.raises(ValueError, match="mode must be one of"):
        DyLoRALinear(nn.Linear(3, 3), mode="nested")


# ---------------------------------------------------------------- AdaLoRA: the layer and the regulariser

def test_adalora_layer_is_p_lambda_q_and_starts_as_its_base():
    base = nn.Linear(8, 6).double()
    layer = AdaLoRALinear(base, init_r=5, alpha=10.0)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(layer(x), base(x)) and torch.equal(layer.E, torch.zeros(5, dtype=torch.float64))
    assert 0.01 < float(layer.A.detach().std()) < 0.03 and 0.01 < float(layer.B.detach().std()) < 0.03
    fill(layer.E, 4)
    P, Q = layer.B.T, layer.A.T
    dense = base.weight + 2.0 * P @ torch.diag(layer.E) @ Q  # alpha / init_r = 2
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias, rtol=1e-12, atol=1e-12)


def test_orthogonal_regulariser_is_zero_for_orthonormal_factors_and_the_frobenius_mean_otherwise():
    model = MLP(d=8, h=9, o=6).double()
    ads = inject(model, lambda base: AdaLoRALinear(base, init_r=4))
    for a in ads.values():
        with torch.no_grad():
            qb, _ = torch.linalg.qr(torch.randn(a.B.shape[1], 4, dtype=torch.float64))
            qa, _ = torch.linalg.qr(torch.randn(a.A.shape[0], 4, dtype=torch.float64))
            a.A.copy_(qa)
            a.B.copy_(qb.T)
    assert float(orthogonal_regulariser(ads).detach()) < 1e-14
    for i, a in enumerate(ads.values()):
        fill(a.A, 10 + i)
        fill(a.B, 20 + i)
    eye = torch.eye(4, dtype=torch.float64)
    with torch.no_grad():
        by_hand = sum(float(torch.sqrt(((a.A.T @ a.A - eye) ** 2).sum()) + torch.sqrt(((a.B @ a.B.T - eye) ** 2).sum()))
                      for a in ads.values()) / 4
    assert float(orthogonal_regulariser(ads).detach()) == pytest.approx(by_hand, rel=1e-12) and by_hand > 0.1
    control = AdaLoRA(ads, total_steps=100, orth_reg_weight=0.25)
    assert float(control.penalty().detach()) == pytest.approx(0.25 * by_hand, rel=1e-12)
    assert control.penalty().requires_grad


def test_orthogonal_gradient_is_the_norms_gradient_and_zero_at_an_orthonormal_factor():
    P = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(4, dtype=torch.float64)
    torch.linalg.matrix_norm(P.mT @ P - eye).sum().backward()
    torch.testing.assert_close(orthogonal_gradient(P.detach()), P.grad, rtol=1e-12, atol=1e-14)
    exact = torch.eye(7, 4, dtype=torch.float64)[None]  # P^T P = I exactly: M = 0, where the norm has no gradient
    assert torch.equal(orthogonal_gradient(exact), torch.zeros_like(exact))


# ---------------------------------------------------------------- AdaLoRA: budget and masking

def test_budget_follows_the_cubic_schedule():
    # init 12 -> target 6, T = 30, tinit = 5, tfinal = 8: the cubic runs over steps 6..22
    def closed_form(t):
        return int(6 * (1 - (t - 5) / 17) ** 3 + 6)
    assert [budget_schedule(t, 12, 6, 30, 5, 8, 3) for t in (1, 5)] == [(12, False)] * 2
    for t, expected in [(6, 11), (9, 8), (12, 7), (22, 6)]:
        assert budget_schedule(t, 12, 6, 30, 5, 8, 3)[0] == closed_form(t) == expected
    assert [budget_schedule(t, 12, 6, 30, 5, 8, 3)[1] for t in range(6, 13)] == [True, False, False, True, False, False, True]
    assert budget_schedule(23, 12, 6, 30, 5, 8, 3) == (6, True)


def test_budget_schedule_equals_peft():
    from peft import AdaLoraConfig, get_peft_model
    for tinit, tfinal, delta_t, total in [(5, 8, 3, 30), (0, 0, 1, 17), (40, 100, 10, 500)]:
        config = AdaLoraConfig(target_modules=["l1", "l2"], init_r=6, target_r=4, tinit=tinit, tfinal=tfinal,
                               deltaT=delta_t, total_step=total)
        allocator = get_peft_model(MLP(), config).base_model.rankallocator
        ours = [budget_schedule(t, 12, 8, total, tinit, tfinal, delta_t) for t in range(1, total + 1)]
        assert ours == [allocator.budget_schedule(t) for t in range(1, total + 1)]


def test_the_lowest_importance_triplets_are_masked():
    model = MLP().double()
    ads = inject(model, lambda base: AdaLoRALinear(base, init_r=5))
    control = AdaLoRA(ads, total_steps=100, target_r=2)
    g = torch.Generator().manual_seed(0)
    for name, a in ads.items():
        fill(a.E, 7)
        for key in ("A", "E", "B"):
            p = getattr(a, key)
            control.ema[f"{name}.{key}.sensitivity"] = torch.rand(p.shape, generator=g, dtype=p.dtype)
            control.ema[f"{name}.{key}.uncertainty"] = torch.rand(p.shape, generator=g, dtype=p.dtype)
    before = {name: a.E.detach().clone() for name, a in ads.items()}
    scores = control.triplet_scores()
    s = {name: control.ema[f"{name}.E.sensitivity"] * control.ema[f"{name}.E.uncertainty"]
         + (control.ema[f"{name}.A.sensitivity"] * control.ema[f"{name}.A.uncertainty"]).mean(0)
         + (control.ema[f"{name}.B.sensitivity"] * control.ema[f"{name}.B.uncertainty"]).mean(1) for name in ads}
    for name in ads:
        torch.testing.assert_close(scores[name], s[name], rtol=0, atol=0)
    control.mask_to_budget(6)  # 10 triplets, 4 masked
    everything = sorted((float(v), name, i) for name in ads for i, v in enumerate(s[name]))
    lowest = {(name, i) for _, name, i in everything[:4]}
    for name, a in ads.items():
        for i in range(5):
            if (name, i) in lowest:
                assert a.E[i] == 0 and not control.kept[name][i]
            else:
                assert a.E[i] == before[name][i] and control.kept[name][i]
    assert sum(control.ranks().values()) == 6


def adalora_pair(init_r=6, target_r=3, tinit=5, tfinal=8, delta_t=3, total=30):
    """Our AdaLoRA and peft's on copies of one MLP, with identical starting factors and scale."""
    from peft import AdaLoraConfig, get_peft_model
    torch.manual_seed(0)
    ours = MLP().double()
    theirs = MLP().double()
    theirs.load_state_dict(ours.state_dict())
    ads = inject(ours, lambda base: AdaLoRALinear(base, init_r=init_r, alpha=8.0))
    config = AdaLoraConfig(target_modules=["l1", "l2"], init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                           deltaT=delta_t, total_step=total, lora_alpha=8, lora_dropout=0.0, beta1=0.85, beta2=0.85)
    peft_model = get_peft_model(theirs, config).double()
    for name, a in ads.items():
        fill(a.E, hash(name) % 100, scale=0.5)
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].copy_(a.A.T)
            layer.lora_B["default"].copy_(a.B.T)
            layer.lora_E["default"].copy_(a.E[:, None])
            layer.ranknum["default"].fill_(init_r - 1e-5)  # peft scales by alpha / (ranknum + 1e-5); ours alpha / init_r
        # peft 0.21.2 re-creates ranknum as a trainable Parameter when it moves it to a float64 base layer's
        # dtype, so an optimizer over all trainable parameters would train it; it is meant constant
        layer.ranknum["default"].requires_grad_(False)
    return ours, ads, peft_model


def test_adalora_trains_masks_and_truncates_like_peft():
    """Same data, same Adam: outputs, EMA importances, masks and ranks agree with peft at every step
    (orth_reg_weight 0: peft adds its regulariser only when the model output has a .loss)."""
    total = 30
    ours, ads, peft_model = adalora_pair(total=total)
    opt_ours = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    control = AdaLoRA(ads, opt_ours, total_steps=total, target_r=3, tinit=5, tfinal=8, delta_t=3, orth_reg_weight=0.0)
    allocator = peft_model.base_model.rankallocator
    g = torch.Generator().manual_seed(1)
    ranks_seen = []
    for step in range(1, total + 1):
        x, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
        with control.capture(step, 4):
            loss = (ours(x) - y).square().mean() + control.penalty()
            opt_ours.zero_grad()
            loss.backward()
        opt_ours.step()
        control.step()
        loss_theirs = (peft_model(x) - y).square().mean()
        opt_theirs.zero_grad()
        loss_theirs.backward()
        opt_theirs.step()
        peft_model.base_model.update_and_allocate(step)
        torch.testing.assert_close(loss, loss_theirs, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-10, atol=1e-12)
        if step < total - 8:
            for name in ads:
                key = f"{name}.lora_E.default"
                torch.testing.assert_close(control.ema[f"{name}.E.sensitivity"], allocator.exp_avg_ipt[key].flatten(),
                                           rtol=1e-8, atol=1e-14)
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern:
            ranks_seen.append(control.ranks())
            if step <= total - 8:
                assert control.ranks() == {n: sum(pattern[f"{n}.lora_E.default"]) for n in ads}
    final = {n: sum(peft_model.peft_config["default"].rank_pattern[f"{n}.lora_E.default"]) for n in ads}
    assert sum(final.values()) == 6 and {n: a.rank for n, a in ads.items()} == final
    assert all(a.A.shape[1] == a.E.shape[0] == a.B.shape[0] == final[n] for n, a in ads.items())
    assert len({tuple(r.values()) for r in ranks_seen}) > 2  # the budget shrank over several maskings


def test_adalora_penalty_equals_peft_regulariser():
    from types import SimpleNamespace
    ours, ads, peft_model = adalora_pair()
    for i, a in enumerate(ads.values()):
        fill(a.A, 30 + i)
    for name, a in ads.items():
        with torch.no_grad():
            peft_model.base_model.model.get_submodule(name).lora_A["default"].copy_(a.A.T)
    inner = peft_model.base_model.model
    inner.forward = lambda x: SimpleNamespace(loss=torch.zeros((), dtype=torch.float64))
    theirs = peft_model.base_model(torch.zeros(1, 6)).loss
    ours_penalty = AdaLoRA(ads, total_steps=30, orth_reg_weight=0.5).penalty()
    torch.testing.assert_close(ours_penalty, theirs, rtol=1e-12, atol=1e-12)


def test_adalora_configuration_errors():
    ads = inject(MLP(), AdaLoRALinear)
    with pytest.raises(ValueError, match="needs the run's total_steps"):
        AdaLoRA(ads)
    with pytest.raises(ValueError, match="leave no budgeting phase"):
        AdaLoRA(ads, total_steps=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="target_r=7 must be in 0..init_r"):
        AdaLoRA(ads, total_steps=10, target_r=7)
    control = AdaLoRA(ads, total_steps=100)
    assert (control.tinit, control.tfinal, control.delta_t, control.target_r, control.init_r) == (10, 20, 10, 4, 6)


# ---------------------------------------------------------------- plumbing added for these methods

def test_select_parameter_keeps_the_chosen_slices_and_their_adam_moments():
    p = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(4, 6, dtype=torch.float64)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    values = p.detach().clone()
    select_parameter(p, 1, torch.tensor([0, 2, 5]), opt)
    assert torch.equal(p, values[:, [0, 2, 5]]) and p.grad is None and opt.param_groups[0]["params"][0] is p
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p][key], before[key][:, [0, 2, 5]])
    assert torch.equal(opt.state[p]["step"], before["step"])


@pytest.mark.parametrize("change", ["resize", "select"])
def test_a_changed_parameter_trains_while_the_previous_graph_is_still_alive(change):
    """A loop that still holds last step's loss keeps autograd's accumulator for the old shape alive."""
    p = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(2, 3)
    old_loss = (x @ p).sum()
    old_loss.backward()
    if change == "resize":
        resize_parameter(p, torch.randn(3, 6))
    else:
        select_parameter(p, 1, torch.tensor([1, 3]))
    (x @ p).sum().backward()
    assert p.grad.shape == p.shape and old_loss.grad_fn is not None
