"""SeLoRA's expansion test as the authors' script runs it: train.py --expansion-test script.

`selora.py` is the paper's rule: one backward, a fresh Kaiming K per test, eq. 3's per-sample Fisher of the
original and the expanded layer at the same weights, expansion when the ratio exceeds lambda = 1.1. The
script (`selora_for_open_source.py` in github.com/Yuchen20/SeLoRA, commit cc0fc44; "script:N" is its line)
decides differently, and this module repeats its decision exactly, every line citing the script's:

- recorded: the sum of squared .grad of A and B from the training step's backward of the batch-mean loss,
  at the weights before optimizer.step() (script:270-278, 616-627);
- after optimizer.step(), on every 40th step (script:629, 634, 713), a second forward and backward of the same
  batch (same noisy latents, t and noise) through the "temp" weights: A and B after the step, plus a candidate
  row of A and a zero column of B (script:258-261, 639-647); train.py calls it through `second_pass`;
- the candidate row is zero until the layer first grows (script:197, 216-222: `lora_A_temp` is made by
  new_zeros and `reset_parameters` never initialises it), so at a layer's first test the ratio is the squared
  gradient norm after one Adam step over the one before; after an expansion it is a Kaiming draw, fixed until
  the next expansion (script:318-319);
- the ratio is temp over recorded (script:292-295), and a layer grows when it is >= lambda, 1.3 in the
  script's call (script:494, 710; the Trainer's own default is 2, script:461);
- growth appends a fresh Kaiming row to A, not the tested candidate, and a zero column to B (script:301-312),
  and puts A and B into new param groups, so their Adam moments and step count start from zero (script:302,
  309, 323-324).

Our layout is the paper's (A is d_in x r, B is r x d_out; the script stores the transposes), so the script's
rows of `lora_A` are columns of our A. The temp weights are not materialised: their forward equals the model's
(B's new row is zero) and their gradients are those of A and B plus the candidate row of B, which `SeLoRA`'s
test step computes from each layer's input and output gradient (`per_sample_grads`, with `fisher="batch"`: the
square of their mean over the samples). Draws are seeded by (seed, step, layer) as in `SeLoRA`, so resumed and data-parallel runs
grow alike; the script's draws come from the global torch generator and cannot be repeated.

What does not carry over from the paper's rule: the two scores are one optimizer step apart, so the ratio is
not the FI-ratio of eq. 4-5 and can be below 1; lambda means something else (a gradient that grows by 30 %
in one step); and the reset of Adam's moments makes the next update of a grown layer about lr x sign(g) in
every entry, so the run does not continue as if the layer had always had the larger shape. The output is
still unchanged by the expansion itself, bit for bit (`SeLoRALinear.low_rank`).
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Iterator

import torch

from methods.adapters import draw_candidate
from selora import SeLoRA


class ScriptSeLoRA(SeLoRA):
    """`SeLoRA` with the authors' script's expansion test (module docstring); driven by the training loop as
    `SeLoRA` is, plus a second forward and backward of the same batch after optimizer.step() on test steps:

        with rule.capture(step, b): loss.backward()              # the step's own backward: recorded_grad
        rule.after_backward()
        optimizer.step()
        if rule.second_pass(step):
            with rule.capture(step, b): loss_again.backward()    # same batch, weights after the step
            rule.after_backward()
        rule.step()

    What it changes of `SeLoRA`: the candidate (`candidate`), which scores the ratio compares (the first pass's
    original over the second pass's expanded, `capture` and `step`), the threshold (`exceeds`: >=) and the growth
    (a fresh row, Adam's state reset: `step`).
    """
    expansion_test = "script"
    exceeds = staticmethod(operator.ge)  # script:494: grow when the ratio >= lambda

    def __init__(self, adapters, optimizer=None, total_steps=None, reduce=None, lam: float = 1.3, t: int = 40,
                 fisher: str = "batch", seed: int = 0, insist: bool = False, max_rank: int | None = None,
                 expansion_test: str = "script"):
        if fisher != "batch":
            raise ValueError(f"fisher={fisher!r}: the script's rule squares .grad of the batch-mean loss "
                             "(script:266-274), fisher='batch'; the per-sample Fisher is the paper rule's")
        super().__init__(adapters, optimizer, total_steps, reduce, lam, t, fisher, seed, insist, max_rank,
                         expansion_test)
        self._expanded_at: dict[str, int] = {}  # layer -> step of its last expansion, which drew its candidate
        self._recorded: dict[str, float] = {}  # the first pass's FI-score of each tested layer (recorded_grad)

    def second_pass(self, step: int) -> bool:
        return self.is_test_step(step)  # script:634

    def candidate(self, name: str) -> torch.Tensor:
        """The candidate row of the temp weights (our column of A)."""
        d_in = self.adapters[name].base.in_features
        if name not in self._expanded_at:  # script:197, 216-222: lora_A_temp's last row is never initialised
            return torch.zeros(d_in, 1)
        # script:318-319: redrawn Kaiming at each expansion; the forward overwrites all but it (script:258)
        return draw_candidate(d_in, self.seed, self._expanded_at[name], name + "/candidate")

    @contextmanager
    def capture(self, step: int, batch_size: int) -> Iterator[None]:
        """The step's own forward and backward as `SeLoRA.capture`; on a test step's second pass (script:639-647),
        the first pass's scores kept as recorded_grad (script:270-278) and each layer's candidate the script's."""
        if step == self._tested_step:
            self._recorded = {name: original for name, (original, _) in self._scores.items()}
            self._candidates = {name: self.candidate(name) for name in self._candidates}
        with super().capture(step, batch_size):
            yield

    def step(self) -> list[dict]:
        """`SeLoRA.step` on the script's numbers: each layer that both passes reached is tested on the ratio of the
        second pass's expanded score (script:274: lora_A_temp.grad and lora_B_temp.grad, with the candidate's row)
        over the first pass's (script:278), temp over recorded as get_ratio has it (script:292-295); a layer grows
        by a fresh Kaiming row of A, not the candidate tested, and a zero column of B (script:301-312), in new param
        groups, so its Adam moments and step count start from zero (script:302, 309, 323-324)."""
        step = self._tested_step
        if step is not None:
            self._scores = {name: (self._recorded[name], temp) for name, (_, temp) in self._scores.items()
                            if name in self._recorded}
            self._candidates = {name: draw_candidate(self.adapters[name].base.in_features, self.seed, step, name)
                                for name in self._scores}
        events = super().step()
        for event in events:
            if event.get("expanded"):
                layer = self.adapters[event["layer"]]
                if self.optimizer is not None:
                    for factor in (layer.A, layer.B):
                        self.optimizer.state.pop(factor, None)
                self._expanded_at[event["layer"]] = step  # script:318-319: the next candidate
        self._recorded = {}
        return events

    def state(self) -> dict[str, torch.Tensor]:
        """Each layer's last expansion step (0: never), which fixes its candidate: what a resumed run needs."""
        return {"expanded_at": torch.tensor([self._expanded_at.get(name, 0) for name in self.adapters])}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        steps = tensors.get("expanded_at")
        if set(tensors) != {"expanded_at"} or steps is None or steps.shape != (len(self.adapters),):
            raise ValueError(f"the script rule's state must be one tensor 'expanded_at' of {len(self.adapters)} "
                             f"steps, got {sorted(tensors)[:5]}")
        self._expanded_at = {name: int(s) for name, s in zip(self.adapters, steps.tolist()) if s > 0}
