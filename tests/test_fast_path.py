"""SeLoRA's two test steps decide alike: the literal one every default run takes (selora.SeLoRA: hooks, one layer at
a time) and the fast one of --compile, torchrun and --fast-test-step (fast.fisher: probes, layers of equal shapes at
once, sums that processes can add). On the tiny SD 1.5 in float64, over several test steps of a training run that
grows, both give the same decisions, with FI-scores and FI-ratios equal within 1e-9 relative, under both growth
rules (issue 32)."""
from contextlib import nullcontext

import pytest
import torch

from methods import adapters
from model.sd15 import tiny_sd15
from training import diffusion, method_table

STEPS, T = 8, 2  # four test steps


def run(fast: bool, expansion_test: str) -> list[dict]:
    """The test events of STEPS training steps on the tiny model in float64, as train.py's loop takes them."""
    torch.manual_seed(0)
    sd = tiny_sd15(0)
    sd.unet.double(), sd.text_encoder.double()
    lam = 1.1 if expansion_test == "paper" else 1.0
    method = method_table.build("selora", fast, t=T, lam=lam, expansion_test=expansion_test,
                                fisher="sample" if expansion_test == "paper" else "batch")
    named = adapters.inject(sd.adaptable(), method.make_adapter)
    params = [p for a in named.values() for p in a.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    controller = method.controller(named, optimizer)
    generator = torch.Generator().manual_seed(1)
    events = []
    for step in range(1, STEPS + 1):
        batch = (torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64),
                 torch.randint(0, 1000, (3,), generator=generator),
                 torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64),
                 sd.tokenizer.encode(["left circle", "a red square", "right"])[0])
        diffusion.train_step(sd, batch, step, controller, optimizer, params, nullcontext())
        optimizer.step()
        if controller.second_pass(step):
            diffusion.second_pass(sd, batch, step, controller, params, nullcontext())
        events += controller.step()
    return events


@pytest.mark.parametrize("expansion_test", ["paper", "script"])
def test_the_literal_and_the_fast_test_step_decide_alike(expansion_test):
    literal, fast = run(False, expansion_test), run(True, expansion_test)
    assert len(literal) == 4 * 128 and {e["step"] for e in literal} == {2, 4, 6, 8}
    assert 0 < sum(e["expanded"] for e in literal) < len(literal)  # some layers grow, some do not
    assert [(e["step"], e["layer"], e["expanded"], e["rank"]) for e in fast] == \
        [(e["step"], e["layer"], e["expanded"], e["rank"]) for e in literal]
    for a, b in zip(literal, fast):
        assert b["score"] == pytest.approx(a["score"], rel=1e-9, abs=0)
        assert b["ratio"] == pytest.approx(a["ratio"], rel=1e-9, abs=0)
