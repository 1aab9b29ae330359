"""The growth cap of Newton-type updates (``max_update_growth``): with exact ``H v`` (or finite differences),
``P ~ |H|^-1`` grows where the curvature vanishes, and one gradient spike there must not move the parameters
far; whitening is left alone."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_psgd import PSGD

CURVATURE = 1e-2  # a flat quadratic: P tends to 1 / (CURVATURE + damping)
#: next to no damping (the ``hvp`` default 1e-2 would halve ``P`` here): the growth cap is the only bound
UNDAMPED = 1e-9


def _step_sizes(growth: float | None, scales: list[float]) -> list[float]:
    """RMS of each step's parameter change on ``0.5 c |x|^2 + s_t b.x`` with exact ``H v``, ``s_t`` the
    ``scales`` (the gradient's size, one per step); ``growth`` the cap (``"default"``: the optimizer's)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.randn(8, 6, generator=generator))
    b = torch.randn(8, 6, generator=generator) * 1e-2
    cap = {} if growth == "default" else {"max_update_growth": growth}
    opt = PSGD([x], lr=0.3, curvature="hvp", precond_update_prob=1.0, max_update_rms=None, damping=UNDAMPED, **cap)
    sizes = []
    for scale in scales:

        def closure(scale: float = scale) -> torch.Tensor:
            return 0.5 * CURVATURE * x.square().sum() + scale * (b * x).sum()

        before = x.detach().clone()
        opt.step(closure)
        sizes.append((x.detach() - before).square().mean().sqrt().item())
    return sizes


SPIKE = [1.0] * 30 + [1e3] + [1.0] * 3  # one spike at step 30


def test_a_gradient_spike_moves_a_newton_step_at_most_the_growth_factor_times_the_recent_ones() -> None:
    capped, free = _step_sizes(2.0, SPIKE), _step_sizes(None, SPIKE)
    assert capped[:30] == free[:30]  # steady steps: the cap never acts
    assert free[30] > 50 * max(free[:30])  # without the cap the spike's step is far larger than any before
    # with it, at most twice the running RMS of the earlier steps, so at most twice the largest of them
    assert all(size <= 2.0 * max(capped[:step]) * 1.0001 for step, size in enumerate(capped[30:], start=30))
    assert capped[30] < free[30] / 20


def test_the_default_cap_holds_a_slow_compounding_that_twice_the_history_lets_through() -> None:
    """Gradients growing 9% per step for 30 steps (as a LoRA fine-tune's Newton steps grew at the 2.0 cap, about 9%
    per step for 30 steps, until its loss tripled). A cap of ``f`` times the EMA (beta 0.9) of the earlier steps lets
    sustained growth ``r`` per step through while ``r <= 0.9 + 0.1 f``: at 2.0 up to 10% per step, at the default
    1.3 up to 3%; over the last 20 steps the free steps grow more than 3x, the default's less than 1.035^20 = 2.0x."""
    ramp = [1.0] * 30 + [1.09**k for k in range(1, 31)]
    default, loose, free = _step_sizes("default", ramp), _step_sizes(2.0, ramp), _step_sizes(None, ramp)
    assert default[:30] == free[:30]
    assert free[-1] > 3 * free[-21] and loose[-1] > 0.9 * free[-1]
    assert default[-1] < 1.035**20 * default[-21]


def test_the_growth_cap_leaves_whitening_alone() -> None:
    generator = torch.Generator().manual_seed(1)
    gradients = [torch.randn(6, 5, generator=generator) * (1e3 if i == 4 else 1.0) for i in range(8)]
    x, y = torch.nn.Parameter(torch.zeros(6, 5)), torch.nn.Parameter(torch.zeros(6, 5))
    capped, free = PSGD([x], lr=0.1, max_update_growth=2.0), PSGD([y], lr=0.1, max_update_growth=None)
    for g in gradients:
        x.grad, y.grad = g.clone(), g.clone()
        capped.step(), free.step()
    assert torch.equal(x, y)
    assert torch.equal(capped.state[x]["update_rms"], torch.zeros(2))


def test_a_state_without_the_update_history_resumes_as_a_new_one() -> None:
    """A checkpoint saved before the growth cap (no ``update_rms``) loads; its history starts from zero."""
    x = torch.nn.Parameter(torch.randn(4, 3))

    def closure() -> torch.Tensor:
        return 0.5 * x.square().sum()

    opt = PSGD([x], lr=0.3, curvature="hvp", precond_update_prob=1.0)
    for _ in range(3):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0]["update_rms"]
    resumed = PSGD([x], lr=0.3, curvature="hvp", precond_update_prob=1.0)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[x]["update_rms"], torch.zeros(2))
    resumed.step(closure)
    history = resumed.state[x]["update_rms"]
    assert history[1].item() == 1.0 and history[0].item() > 0


def test_zero_updates_do_not_pin_a_block_at_zero() -> None:
    """A block whose first updates are zero (no gradient yet, as LoRA's ``A`` before ``B`` moves) is not capped
    at zero afterwards: its history starts at its first nonzero step."""
    x = torch.nn.Parameter(torch.zeros(4, 3))
    b = torch.full((4, 3), 1e-2)
    opt = PSGD([x], lr=0.3, curvature="hvp", precond_update_prob=1.0)
    for step in range(6):
        scale = 0.0 if step < 3 else 1.0

        def closure(scale: float = scale) -> torch.Tensor:
            return 0.5 * CURVATURE * x.square().sum() + scale * (b * x).sum()

        opt.step(closure)
        if step < 3:
            assert torch.equal(x, torch.zeros(4, 3)) and opt.state[x]["update_rms"][1].item() == 0.0
    assert x.detach().abs().min().item() > 0 and opt.state[x]["update_rms"][0].item() > 0


@pytest.mark.parametrize("value", [0.5, -1.0, float("nan"), float("inf"), "2", True])
def test_bad_max_update_growth_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="max_update_growth=.* is invalid"):
        PSGD([torch.nn.Parameter(torch.zeros(2))], max_update_growth=value)


def test_after_convergence_a_moved_optimum_is_reached_again() -> None:
    """Converged steps are tiny; when the objective's optimum jumps, capped steps grow back geometrically (about
    1.03x per step at the default) instead of jumping: slower than uncapped Newton (first within 2% of the jump
    after 214 steps, against 28 uncapped and 110 at a cap of 2.0), but never frozen."""
    target = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    x = torch.nn.Parameter(torch.zeros(8, 6))
    opt = PSGD([x], lr=0.3, curvature="hvp", precond_update_prob=1.0, max_update_rms=None, damping=UNDAMPED)
    distances = []
    for step in range(600):
        optimum = target if step < 150 else -target

        def closure(optimum: torch.Tensor = optimum) -> torch.Tensor:
            return 0.5 * CURVATURE * (x - optimum).square().sum()

        opt.step(closure)
        distances.append((x.detach() - optimum).square().mean().sqrt().item())
    assert distances[149] < 1e-3 < 1.0 < distances[150]  # converged, then the optimum moved by 2 |target|
    assert distances[-1] < 0.02 * distances[150]
