"""A tiny transformer LM trains with every family x curvature source, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyTransformer, copy_task_batch, lm_loss

from hf_psgd import PRECONDITIONERS, PSGD

STEPS = 60
#: Whitening steps are Adam-like (unit RMS); hvp / fd steps are Newton-like, hence a larger lr.
LEARNING_RATES = {"whiten": 1e-2, "hvp": 0.3, "fd": 0.3}
#: Required ratio of the last to the first losses. Dense fits one n x n triangular Q (n = 3,920 here)
#: from one probe per step: in 60 steps it has barely left its initial scale, so it only has to
#: train; tests/test_whole_vector.py checks what it fits. XMat (one diagonal plus anti-diagonal over the
#: whole model) is the slowest of the rest: 0.750 of its first loss with hvp / fd (0.7497 undamped).
LOSS_RATIO = {"dense": 0.98, "xmat": 0.8}


def _train(preconditioner: str, curvature: str, dtype: torch.dtype = torch.float32, **options) -> tuple[float, float]:
    torch.manual_seed(0)
    model = TinyTransformer().to(dtype)
    opt = PSGD(
        model.parameters(), lr=LEARNING_RATES[curvature], preconditioner=preconditioner, curvature=curvature, **options
    )
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        batch = copy_task_batch(gen)
        if curvature == "whiten":
            opt.zero_grad()
            loss = lm_loss(model, batch)
            loss.backward()
            opt.step()
        else:
            loss = opt.step(lambda batch=batch: lm_loss(model, batch))
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


@pytest.mark.parametrize("curvature", ["whiten", "hvp", "fd"])
@pytest.mark.parametrize(
    "preconditioner",
    # dense: O(n^2) per step on n = 3,920 (about 0.4 s a step on 2 CPU cores)
    [pytest.param(name, marks=pytest.mark.slow) if name == "dense" else name for name in sorted(PRECONDITIONERS)],
)
def test_tiny_transformer_loss_falls(preconditioner: str, curvature: str) -> None:
    first, last = _train(preconditioner, curvature)
    ratio = LOSS_RATIO.get(preconditioner, 0.75)
    assert last < ratio * first, f"{preconditioner}/{curvature}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("precond_dtype", [None, "bfloat16"])
def test_bf16_parameters_train(precond_dtype: str | None) -> None:
    first, last = _train("kron", "whiten", dtype=torch.bfloat16, precond_dtype=precond_dtype)
    assert last < 0.75 * first
