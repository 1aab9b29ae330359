"""Adam's floor of the update size (``adam_floor``): with whitening, a block's update ``P m`` is lifted
to the RMS of Adam's step ``m / sqrt(v)`` (one second moment per block) where it is smaller."""

from __future__ import annotations

import math

import pytest
import torch

from hf_psgd import PSGD
from hf_psgd.optim.update import ADAM_BETA2, adam_floors


def _rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def test_floors_follow_a_bias_corrected_second_moment_and_skip_masked_steps() -> None:
    """Against the formula computed by hand over three steps, the second masked (a NaN gradient)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,)]
    energies = [torch.zeros(2) for _ in shapes]
    means: list[list[float]] = [[] for _ in shapes]
    for step, keep in enumerate((True, False, True)):
        gradients = [torch.randn(shape, generator=generator) * (step + 1) for shape in shapes]
        directions = [torch.randn(shape, generator=generator) for shape in shapes]
        if not keep:
            gradients[0][0, 0] = math.nan
        norms = [g.norm() for g in gradients]
        floors = adam_floors(energies, norms, directions, torch.tensor(keep))
        for block, (g, m, floor) in enumerate(zip(gradients, directions, floors)):
            if keep:
                means[block].append(g.square().mean().item())
            kept = means[block]
            weights = [(1 - ADAM_BETA2) * ADAM_BETA2 ** (len(kept) - 1 - i) for i in range(len(kept))]
            second_moment = sum(w * v for w, v in zip(weights, kept)) / sum(weights)
            assert floor.item() == pytest.approx(_rms(m) / math.sqrt(second_moment), rel=1e-5)
    assert all(bool(e.isfinite().all()) for e in energies)


def test_a_consistent_gradient_gets_adams_step_size_instead_of_whitenings() -> None:
    """A rank-one gradient with a little noise (fine-tuning's regime): whitening alone steps at RMS about
    0.28 here (``s / |s|`` is small per element); with the floor the step's RMS is the given fraction of
    Adam's, about 1."""
    signal = torch.outer(torch.linspace(1, 2, 32), torch.linspace(-1, 1, 24)) * 1e-3

    def last_step_rms(adam_floor: float | None) -> float:
        generator = torch.Generator().manual_seed(0)
        x = torch.nn.Parameter(torch.zeros(32, 24))
        opt = PSGD([x], lr=1.0, precond_update_prob=1.0, adam_floor=adam_floor)
        before = x.detach().clone()
        for _ in range(60):
            before = x.detach().clone()
            x.grad = signal + 0.05 * signal.abs().mean() * torch.randn(32, 24, generator=generator)
            opt.step()
        return _rms(x.detach() - before)

    assert last_step_rms(1.0) == pytest.approx(1.0, rel=2e-2)
    assert last_step_rms(0.8) == pytest.approx(0.8, rel=2e-2)
    assert last_step_rms(None) < 0.3


def test_the_cap_wins_over_the_floor_and_a_spike_does_not_lift_later_steps() -> None:
    """``max_update_rms`` bounds the lifted step; a gradient 1e6 times larger for one step raises the
    second moment, so later floors are lower, never higher."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.zeros(16, 8))
    opt = PSGD([x], lr=1.0, momentum=0.0, max_update_rms=0.5)
    sizes = []
    for step in range(6):
        before = x.detach().clone()
        x.grad = torch.randn(16, 8, generator=generator) * (1e6 if step == 3 else 1.0)
        opt.step()
        sizes.append(_rms(x.detach() - before))
    assert max(sizes) <= 0.5 * (1 + 1e-5)
    energy = opt.state[x]["grad_energy"]
    assert (energy[0] / energy[1]).item() > 1e6  # the spike is in the second moment: later floors shrink


def test_a_long_run_of_zero_gradients_then_a_gradient_gives_a_bounded_finite_step() -> None:
    """After 300 zero gradients the second moment has decayed while the momentum of the returning
    gradient has not (Adam's own large first step back); the cap bounds the lifted step, nothing is NaN."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.zeros(12, 10))
    opt = PSGD([x], lr=1.0, max_update_rms=1.1)
    for step in range(320):
        before = x.detach().clone()
        x.grad = torch.randn(12, 10, generator=generator) if step < 10 or step >= 310 else torch.zeros(12, 10)
        opt.step()
        size = _rms(x.detach() - before)
        assert math.isfinite(size) and size <= 1.1 * (1 + 1e-5), (step, size)
    energy = opt.state[x]["grad_energy"]
    assert bool(energy.isfinite().all()) and energy[0].item() > 0


@pytest.mark.parametrize("options", [{"adam_floor": None}, {"adam_floor": 0.0}, {"curvature": "hvp"}])
def test_no_floor_without_the_option_or_with_exact_hvp(options: dict) -> None:
    x = torch.nn.Parameter(torch.randn(6, 5))

    def closure() -> torch.Tensor:
        return x.square().sum() * 1e-3

    opt = PSGD([x], lr=0.1, precond_update_prob=1.0, **options)
    for _ in range(3):
        if options.get("curvature") == "hvp":
            opt.step(closure)
        else:
            opt.zero_grad()
            closure().backward()
            opt.step()
    assert torch.equal(opt.state[x]["grad_energy"], torch.zeros(2))


@pytest.mark.parametrize("value", [-0.5, float("nan"), "0.5", True])
def test_bad_adam_floor_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="adam_floor=.* is invalid"):
        PSGD([torch.nn.Parameter(torch.zeros(2))], adam_floor=value)
