"""``compile_kernels=True``: the families' preconditioning and checked fit through ``torch.compile`` give
the eager result within float tolerance (the compilation makes these tests slow)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_psgd import PSGD


@pytest.mark.slow
@pytest.mark.parametrize("preconditioner", ["kron", "diag"])
def test_compiled_kernels_match_eager(preconditioner: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))
    twin = copy.deepcopy(model)
    options = dict(lr=0.01, preconditioner=preconditioner, precond_update_prob=1.0)
    eager = PSGD(model.parameters(), **options)
    compiled = PSGD(twin.parameters(), compile_kernels=True, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)
        for network, optimizer in ((model, eager), (twin, compiled)):
            optimizer.zero_grad()
            (network(x) - y).square().mean().backward()
            optimizer.step()
    assert compiled._compiled  # the compiled path ran
    for a, b in zip(model.parameters(), twin.parameters()):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in eager.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(compiled.state[q][key], value, rtol=1e-5, atol=1e-6)


def test_compile_kernels_is_validated() -> None:
    with pytest.raises(ValueError, match="compile_kernels"):
        PSGD(nn.Linear(2, 2).parameters(), compile_kernels="yes")
