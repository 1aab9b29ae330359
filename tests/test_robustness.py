"""Adversarial sequences: a finite gradient spike, a long stall of zero gradients, bad fits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_psgd import PSGD

#: a shape every family accepts, small enough for a fit every step
SHAPES = {"kron": (48, 48), "diag": (48, 48), "lra": (300,), "xmat": (300,), "dense": (96,)}
FAMILIES = sorted(SHAPES)


def _fit_scales(opt: PSGD, p: torch.Tensor) -> torch.Tensor:
    """The fit's step ``precond_lr / L`` (per running bound) where the family keeps one, else the
    preconditioner's scale ``tr(P) / n`` (the per-element families normalise each step alone)."""
    state = opt.state[p]
    if "lipschitz" in state:
        return opt.param_groups[0]["precond_lr"] / state["lipschitz"].double().reshape(-1)
    family = opt.param_groups[0]["preconditioner"]
    from hf_psgd.optim import get_preconditioner

    return get_preconditioner(family).mean_diagonal(state).double().reshape(1)


def _state_tensors(state: dict) -> list[torch.Tensor]:
    values = [t for v in state.values() for t in (v if isinstance(v, list) else [v])]
    return [t for t in values if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("spike", [1e2, 1e7])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_gradient_spike_slows_the_fit_but_never_freezes_or_poisons_it(family: str, spike: float) -> None:
    """30 fits on gradients of scale 1e-4, one of scale ``spike``, 50 more: the state stays finite,
    the fit keeps moving, and its step is back within 10x of its value before the spike."""
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(SHAPES[family]))
    opt = PSGD([p], preconditioner=family, precond_update_prob=1.0, max_dense_size=128)

    def step(scale: float) -> None:
        p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.step()

    for _ in range(30):
        step(1e-4)
    before = _fit_scales(opt, p)
    step(spike)
    assert all(t.isfinite().all() for t in _state_tensors(opt.state[p])) and p.isfinite().all()
    for _ in range(49):
        step(1e-4)
    frozen = [t.clone() for t in _state_tensors(opt.state[p])]
    step(1e-4)
    after = _fit_scales(opt, p)
    assert all(t.isfinite().all() for t in _state_tensors(opt.state[p])) and p.isfinite().all()
    assert any(not torch.equal(a, b) for a, b in zip(frozen, _state_tensors(opt.state[p]))), "the fit froze"
    ratio = after / before
    assert ((ratio > 0.1) & (ratio < 10)).all(), f"fit step after / before the spike: {ratio.tolist()}"


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 6, generator=gen)
    y = torch.sin(x @ torch.randn(6, 1, generator=gen))
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)), x, y


@pytest.mark.parametrize("damping", [None, 0.0])
@pytest.mark.parametrize("curvature", ["whiten", "hvp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_stall_of_zero_gradients_does_not_inflate_the_preconditioner(
    family: str, curvature: str, damping: float | None
) -> None:
    """100 steps of training, 300 steps of ``loss * 0``, then 30 more: the worst loss after the
    stall is at most twice the loss before it (AdamW's stays level), with the default damping and
    with none."""
    model, x, y = _regression()
    lr = 0.3 if curvature == "hvp" else 3e-3
    options = {} if damping is None else {"damping": damping}
    opt = PSGD(model.parameters(), lr=lr, preconditioner=family, curvature=curvature, **options)

    def loss_fn(scale: float = 1.0) -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y) * scale

    def step(scale: float) -> None:
        if curvature == "hvp":
            opt.step(lambda: loss_fn(scale))
        else:
            opt.zero_grad()
            loss_fn(scale).backward()
            opt.step()

    for _ in range(100):
        step(1.0)
    with torch.no_grad():
        before = loss_fn().item()
    for _ in range(300):
        step(0.0)
    assert opt.statistics()["rejected_fits"] > 0, "the stall's fits were not counted"
    worst = 0.0
    for _ in range(30):
        step(1.0)
        with torch.no_grad():
            worst = max(worst, loss_fn().item())
    assert math.isfinite(worst) and worst <= 2 * before, f"loss {before:.4g} before the stall, worst {worst:.4g} after"
