"""The elementwise clip of whitened updates (``max_update_amplitude``): an elementwise ``P`` grows to its
damping bound where a gradient vanishes for long, and the element's returning gradient must not make the
guard shrink the step of the whole block."""

from __future__ import annotations

import pytest
import torch

from hf_psgd import PSGD
from hf_psgd.optim.update import clip_amplitudes_


def test_clip_amplitudes_clamps_every_element_and_reports_the_clipped_blocks() -> None:
    big = torch.tensor([50.0, -30.0, 0.5, -2.0])
    small, other = torch.tensor([1.0, -9.0]), torch.tensor([100.0])
    clipped = clip_amplitudes_([big, small, other], [10.0, 10.0, None])
    assert torch.equal(big, torch.tensor([10.0, -10.0, 0.5, -2.0]))
    assert torch.equal(small, torch.tensor([1.0, -9.0])) and torch.equal(other, torch.tensor([100.0]))
    assert bool(clipped[0]) and not bool(clipped[1]) and clipped[2] is None


def _returning_rows_step(preconditioner: str, **options: object) -> tuple[float, float, PSGD]:
    """A 64 x 8 table whose first and last rows get no gradient for 150 steps (absent tokens' embedding rows;
    XMat pairs each element with its mirror, so both must be absent), then one: the step of the always-present
    rows at the return, over their step just before (1 when the returning rows leave them alone), the largest
    step in the returning rows, and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.zeros(64, 8))
    opt = PSGD([table], lr=1e-2, preconditioner=preconditioner, precond_update_prob=1.0, **options)
    absent = torch.zeros(64, dtype=torch.bool)
    absent[[0, 63]] = True
    steps = []
    for step in range(152):
        grad = torch.randn(64, 8, generator=gen)
        if step < 151:
            grad[absent] = 0.0
        before = table.detach().clone()
        table.grad = grad
        opt.step()
        steps.append(table.detach() - before)
    present = steps[-1][~absent].norm() / steps[-2][~absent].norm()
    return float(present), float(steps[-1][absent].abs().max()), opt


@pytest.mark.parametrize("preconditioner", ["lra", "xmat"])
def test_a_returning_gradient_does_not_freeze_the_rest_of_the_block(preconditioner: str) -> None:
    present, returning, opt = _returning_rows_step(preconditioner)
    assert present > 0.5, f"the present rows' step shrank to {present:.2e} of the step before"
    assert returning <= 1e-2 * 10.0 * 1.1 + 1e-6, "a returning row moved more than lr times the clip"
    assert opt.statistics()["clipped_updates"] >= 1.0
    unclipped, _, opt = _returning_rows_step(preconditioner, max_update_amplitude=None)
    assert unclipped < 1e-2, f"without the clip the guard should freeze the block (got {unclipped:.2e})"
    assert opt.statistics()["clipped_updates"] == 0.0


def test_newton_steps_are_not_clipped() -> None:
    """With exact H v the update is in parameter units: the clip does not apply."""
    x = torch.nn.Parameter(torch.zeros(4))
    scale = torch.tensor([1e-2, 1.0, 1.0, 1.0])  # curvature 1e-4 on the first element: Newton steps of ~1e3
    opt = PSGD(
        [x],
        lr=1.0,
        preconditioner="lra",
        curvature="hvp",
        precond_init_scale=100.0,
        damping=1e-9,
        max_update_rms=None,
        max_update_growth=None,
    )
    largest = 0.0
    for _ in range(3):
        before = float(x.detach()[0])
        opt.step(lambda: 0.5 * ((scale * (x - 5e3)) ** 2).sum())
        largest = max(largest, abs(float(x.detach()[0]) - before))
    assert largest > 100.0 and opt.statistics()["clipped_updates"] == 0.0


@pytest.mark.parametrize(
    ("preconditioner", "clipped"), [("lra", True), ("xmat", True), ("kron", False), ("diag", False)]
)
def test_only_the_elementwise_group_families_are_clipped(preconditioner: str, clipped: bool) -> None:
    """``P = 1e4 I`` held (a negligible fit step) and a gradient of ones: a whitened step of 1e4 per element,
    clipped to 10 for LRA and XMat (a scale per element or pair of the whole group); Kron and Diag keep it."""
    x = torch.nn.Parameter(torch.zeros(6, 6))
    opt = PSGD(
        [x], lr=1e-3, preconditioner=preconditioner, momentum=0.0, precond_init_scale=100.0, precond_lr=1e-6,
        max_update_rms=None, adam_floor=None,
    )  # fmt: skip
    x.grad = torch.ones(6, 6)
    opt.step()
    largest = float(x.detach().abs().max()) / 1e-3
    assert (largest <= 10.0 + 1e-4) == clipped, f"largest step {largest:.3g} learning rates"
    assert opt.statistics()["clipped_updates"] == float(clipped)


def test_a_skipped_step_is_neither_applied_nor_counted_as_clipped() -> None:
    """An infinite gradient element masks the step: no parameter moves, and the clip its update (``P`` times
    the momentum of the steps before) would have needed is not counted."""
    x = torch.nn.Parameter(torch.zeros(36))
    opt = PSGD([x], lr=1e-3, preconditioner="lra", precond_init_scale=100.0, precond_lr=1e-6)
    x.grad = torch.ones(36)
    opt.step()
    assert opt.statistics()["clipped_updates"] == 1.0
    moved = x.detach().clone()
    grad = torch.ones(36)
    grad[0] = float("inf")
    x.grad = grad
    opt.step()
    assert torch.equal(x.detach(), moved) and int(opt.state[x]["skipped_steps"]) == 1
    assert opt.statistics()["clipped_updates"] == 1.0
    x.grad = torch.ones(36)
    opt.step()
    assert opt.statistics()["clipped_updates"] == 2.0


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "10"])
def test_bad_max_update_amplitude_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="max_update_amplitude=.* is invalid"):
        PSGD([torch.nn.Parameter(torch.zeros(2))], max_update_amplitude=value)
