"""LoRA^2 (methods/lora2.py): the distribution over rank positions, the quantile rank, growth and truncation
that follow the rate, gradient to the rate, and the prior."""
import math

import pytest
import torch
from torch import nn

from methods.adapters import inject, merge
from methods.lora2 import LoRA2, LoRA2Linear, inverse_softplus, normaliser, param_groups, quantile_rank, rate_for_rank, resize
from test_selora import MLP, _one_thread  # noqa: F401  (the SeLoRA tests' small model, and their one-thread fixture)


def set_rate(layer, rate):
    with torch.no_grad():
        layer.rho.fill_(inverse_softplus(rate))


def randomise_B(layer, seed=0):
    with torch.no_grad():
        layer.B.copy_(0.3 * torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(seed), dtype=layer.B.dtype))


def test_weights_are_the_discretised_exponential_renormalised_over_the_truncated_support():
    layer = LoRA2Linear(nn.Linear(10, 8).double(), rank=5)
    for rate in (0.05, 0.7, 3.0):
        set_rate(layer, rate)
        cdf = [1 - math.exp(-rate * x) for x in range(6)]
        f = torch.tensor([cdf[i + 1] - cdf[i] for i in range(5)], dtype=torch.float64)
        torch.testing.assert_close(layer.weights(), f / f.sum(), rtol=1e-12, atol=1e-15)
        assert float(layer.rate.detach()) == pytest.approx(rate, rel=1e-12)
    assert torch.all(layer.weights()[:-1] > layer.weights()[1:])  # the first positions matter most


def test_layer_is_b_diag_f_a_and_starts_as_its_base():
    base = nn.Linear(10, 8).double()
    layer = LoRA2Linear(base, rank=4, scale=3.0)
    x = torch.randn(5, 10, dtype=torch.float64)
    assert torch.equal(layer(x), base(x)) and layer.rank == 4
    assert quantile_rank(float(layer.rate.detach())) == 4
    randomise_B(layer)
    dense = base.weight + 3.0 * (layer.A @ torch.diag(layer.weights()) @ layer.B).T
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merge(layer)(x), layer(x), rtol=1e-12, atol=1e-12)


def test_rank_is_the_k_quantile():
    for rate in (0.01, 0.1, 0.3, 0.5, 1.0, math.log(10) / 3, 2.5, 10.0):
        d = quantile_rank(rate)
        assert d == max(1, math.ceil(-math.log(0.1) / rate))
        # the smallest D whose discretised cdf F(D) = 1 - exp(-nu D) reaches 0.9
        assert 1 - math.exp(-rate * d) >= 0.9 - 1e-12 and (d == 1 or 1 - math.exp(-rate * (d - 1)) < 0.9)
    assert quantile_rank(0.01, max_rank=16) == 16 and quantile_rank(0.5, k=0.5) == 2
    for rank in range(1, 40):
        assert quantile_rank(rate_for_rank(rank)) == rank


def controlled(dtype=torch.float64, lr=0.0):
    torch.manual_seed(0)
    model = MLP(d=10, h=12, o=8).to(dtype)
    ads = inject(model, lambda base: LoRA2Linear(base, rank=3))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, ads, opt, LoRA2(ads, opt, max_rank=8)


def test_a_falling_rate_grows_the_rank_without_changing_the_output():
    model, ads, opt, control = controlled()
    x = torch.randn(6, 10, dtype=torch.float64)
    for i, a in enumerate(ads.values()):
        randomise_B(a, seed=i)
    with control.capture(1, 6):
        model(x).square().mean().backward()
    opt.step()  # lr 0: Adam holds state for the old shapes, the values do not move
    old = {n: (a.A.detach().clone(), a.B.detach().clone()) for n, a in ads.items()}
    set_rate(ads["l1"], 0.4)  # the rate falls: D = ceil(2.303 / 0.4) = 6
    with torch.no_grad():
        before = model(x)
    events = control.step()
    assert events == [{"step": 1, "layer": "l1", "rank": 6, "previous": 3, "rate": pytest.approx(0.4)}]
    a = ads["l1"]
    assert control.ranks() == {"l1": 6, "l2": 3}
    assert torch.equal(a.A[:, :3], old["l1"][0]) and torch.equal(a.B[3:], torch.zeros(3, 12, dtype=torch.float64))
    assert a.A[:, 3:].abs().min() > 0  # new columns are random, so gradient reaches the new rows of B
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-14)
    state = opt.state[a.B]
    assert state["exp_avg"].shape == (6, 12) and torch.equal(state["exp_avg"][3:], torch.zeros(3, 12, dtype=torch.float64))
    model(x).square().mean().backward()
    assert a.B.grad[3:].abs().min() > 0 and a.rho.grad is not None


def test_a_rising_rate_truncates_and_only_the_dropped_ranks_leave_the_output():
    model, ads, opt, control = controlled()
    layer = ads["l2"]
    set_rate(layer, 0.3)
    control.step()
    assert layer.rank == 8  # ceil(7.68) = 8, the cap
    randomise_B(layer, seed=4)
    h = torch.randn(5, 12, dtype=torch.float64)
    set_rate(layer, 0.9)  # D = 3
    with torch.no_grad():
        f_at_new_rate = layer.weights()
        expected = layer.base(h) + layer.scale * ((h @ layer.A[:, :3]) * f_at_new_rate[:3]) @ layer.B[:3]
    control.step()
    assert layer.rank == 3 and layer.A.shape == (12, 3) and layer.B.shape == (3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(h), expected, rtol=1e-12, atol=1e-12)


def test_resize_keeps_each_kept_rank_contribution():
    layer = LoRA2Linear(nn.Linear(6, 5).double(), rank=4)
    randomise_B(layer)
    with torch.no_grad():
        contribution = layer.weights()[:, None] * layer.B
    resize(layer, 7, torch.ones(6, 3, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(layer.weights()[:4, None] * layer.B[:4], contribution, rtol=1e-13, atol=1e-15)
    z = normaliser(float(layer.rate.detach()), 7) / normaliser(float(layer.rate.detach()), 4)
    assert z > 1
    with pytest.raises(ValueError, match="needs new A columns of shape"):
        resize(layer, 9, torch.ones(6, 1, dtype=torch.float64))


def test_gradient_reaches_the_rate_and_matches_finite_differences():
    torch.manual_seed(0)
    layer = LoRA2Linear(nn.Linear(6, 5).double(), rank=5)
    randomise_B(layer)
    x = torch.randn(4, 6, dtype=torch.float64)

    def loss():
        return layer(x).square().sum()
    loss().backward()
    grad = float(layer.rho.grad)
    eps = 1e-6
    with torch.no_grad():
        layer.rho += eps
        up = float(loss())
        layer.rho -= 2 * eps
        down = float(loss())
    assert abs(grad) > 1e-3
    assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-6)


def test_prior_is_the_gaussian_negative_log_prior_over_n_obs():
    model, ads, opt, _ = controlled()
    control = LoRA2(ads, opt, rate_prior_mean=2.0, rate_prior_scale=0.5, weight_prior_scale=3.0, n_obs=10.0)
    for i, a in enumerate(ads.values()):
        randomise_B(a, seed=i)
    rates = [float(a.rate.detach()) for a in ads.values()]
    squares = sum(float(a.A.detach().square().sum() + a.B.detach().square().sum()) for a in ads.values())
    by_hand = (sum((r - 2.0) ** 2 for r in rates) / (2 * 0.25) + squares / (2 * 9.0)) / 10.0
    assert float(control.penalty().detach()) == pytest.approx(by_hand, rel=1e-12)
    control.penalty().backward()
    assert all(float(a.rho.grad) < 0 for a in ads.values())  # rate below the prior mean: pushed up, rank down
    assert LoRA2(ads).rate_prior_mean == pytest.approx(2 * math.log(10))  # default: the rate of rank 1


def test_training_moves_ranks_with_the_rates_and_keeps_adam_consistent():
    """With the prior pulling every rate up (rank down) and a large learning rate, ranks shrink over
    training, every step's ranks are the quantiles of the rates, and backward never fails even though the
    loop keeps the previous loss alive."""
    model, ads, opt, control = controlled(lr=0.05)
    control.rate_prior_mean, control.n_obs = 6.0, 1.0
    g = torch.Generator().manual_seed(0)
    seen, loss = set(), None
    for step in range(1, 41):
        x = torch.randn(8, 10, generator=g, dtype=torch.float64)
        with control.capture(step, 8):
            loss = model(x).square().mean() + control.penalty()
            opt.zero_grad()
            loss.backward()
        opt.step()
        control.step()
        for a in ads.values():
            assert a.rank == quantile_rank(float(a.rate.detach()), 0.9, 8)
            assert opt.state[a.A]["exp_avg"].shape == a.A.shape
        seen.add(tuple(control.ranks().values()))
    assert len(seen) > 1 and all(r == 1 for r in control.ranks().values())


def test_param_groups_give_the_rates_their_own_learning_rate():
    model, ads, _, _ = controlled()
    opt = torch.optim.Adam(param_groups(ads, lr=1e-4, rate_lr=1e-2))
    held = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert held[1] == {id(a.rho) for a in ads.values()} and [g["lr"] for g in opt.param_groups] == [1e-4, 1e-2]
    assert held[0] | held[1] == {id(p) for p in model.parameters() if p.requires_grad}


def test_configuration_errors():
    ads = inject(MLP(d=10, h=12, o=8), LoRA2Linear)
    with pytest.raises(ValueError, match="k \\(the quantile\\) must be in \\(0, 1\\)"):
        LoRA2(ads, k=1.0)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRA2Linear(nn.Linear(3, 3), rank=0)
    with pytest.raises(ValueError, match="LoRA2 controls LoRA2Linear adapters only"):
        LoRA2({"x": nn.Linear(3, 3)})
