"""Blocks of equal shape preconditioned and fitted together: Kron in one batched product per dim (per
product of the fit), Diag in multi-tensor operations; preconditioning equals one block at a time bit for
bit (so a block's update does not depend on which blocks a process owns), fits within the rounding of
batched products; a step over several equal layers runs one matrix product per distinct shape and dim."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_psgd import PSGD
from hf_psgd.optim.options import validate_group
from hf_psgd.optim.preconditioners import get_preconditioner

#: (260, 260): larger than BATCHED_NUMEL_LIMIT, preconditioned alone where it needs no copy
SHAPES = [(8,), (8,), (8, 6), (8, 6), (8, 6), (12, 8), (16, 6, 5, 5), (16, 6, 5, 5), (5,), (), (260, 260), (260, 260)]


def _group(options: dict) -> dict:
    """PSGD's defaults with ``precond_lr`` 0.5 and ``options``, resolved as a param group is (``None`` values:
    the curvature's defaults)."""
    group = {**{name: default for name, (default, _) in PSGD.option_specs().items()}, "precond_lr": 0.5, **options}
    validate_group(group)
    return group


def _states(family: str, options: dict, dtype: torch.dtype = torch.float32) -> tuple[list[dict], list[torch.Tensor]]:
    """A block of every shape in ``SHAPES`` with its own fitted (random) preconditioner and gradient."""
    kind = get_preconditioner(family)
    group = _group(options)
    states, gradients = [], []
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        state = kind.init_state(torch.Size(shape), group, dtype, torch.device("cpu"))
        for _ in range(3):
            h = torch.randn(shape, generator=generator)
            kind.update(state, None if kind.integrates_probe else torch.randn(shape, generator=generator), h, group)
        states.append(state)
        gradients.append(torch.randn(shape, generator=generator))
    return states, gradients


@pytest.mark.parametrize(
    ("family", "options", "dtype"),
    [
        ("kron", {}, torch.float32),
        ("kron", {"max_skew": float("inf")}, torch.float32),  # dense factors on every dim, vectors included
        ("kron", {"always_dense_size": 0, "merge_dims": False}, torch.float32),  # dense and diagonal factors
        ("kron", {}, torch.bfloat16),
        ("kron", {"apply_dtype": "bfloat16"}, torch.float32),  # bf16 products on fp32 factors
        ("kron", {"apply_dtype": "float32"}, torch.float32),  # no cast: the (260, 260) blocks go alone, as views
        ("kron", {"fit": "eq"}, torch.float64),
        ("kron", {"fit": "pro4p"}, torch.float32),  # the fitted factors are P's: the cache is their cast
        ("kron", {"fit": "pro4p", "always_dense_size": 0}, torch.float64),
        ("diag", {}, torch.float32),
    ],
)
def test_batched_preconditioning_equals_one_block_at_a_time(family: str, options: dict, dtype: torch.dtype) -> None:
    """Bit for bit on one thread (the products of a block do not depend on its batch); within rounding on
    more, where a CPU kernel may split batches of different sizes differently across threads."""
    kind = get_preconditioner(family)
    states, gradients = _states(family, options, dtype)
    threads = torch.get_num_threads()
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        try:
            one_by_one = [kind.precondition(state, g) for state, g in zip(states, gradients)]
            batched = kind.precondition_many(states, gradients)
        finally:
            torch.set_num_threads(threads)
        assert len(batched) == len(one_by_one)
        for single, together in zip(one_by_one, batched):
            assert together.shape == single.shape and together.dtype == single.dtype
            if count == 1:
                assert torch.equal(together, single)
            else:
                tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
                torch.testing.assert_close(together, single, rtol=tolerance, atol=tolerance * single.abs().max().item())


class MatrixProducts(TorchDispatchMode):
    """Counts the matrix products dispatched (``mm``, ``bmm``) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_step_over_equal_layers_runs_one_product_per_shape_and_dim() -> None:
    """Four equal 16 x 16 layers (one dense factor per dim): an apply-only step runs 2 products, not 8."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16, bias=False) for _ in range(4)))
    optimizer = PSGD(model.parameters(), lr=0.01, precond_update_prob=1.0)
    x = torch.randn(32, 16)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    for group in optimizer.param_groups:
        group["precond_update_prob"] = 0.0
    optimizer.step()  # the update credit left from the fits runs out
    with MatrixProducts() as products:
        optimizer.step()
    assert products.count == 2


def _pairs(kind: type, whiten: bool, generator: torch.Generator) -> tuple[list, list]:
    """A pair ``(v, h)`` for every shape in ``SHAPES`` (``v`` None where whitening integrates it out)."""
    integrated = whiten and kind.integrates_probe
    vs = [None if integrated else torch.randn(shape, generator=generator) for shape in SHAPES]
    return vs, [torch.randn(shape, generator=generator) for shape in SHAPES]


@pytest.mark.parametrize(
    ("family", "options", "dtype", "whiten"),
    [
        ("kron", {}, torch.float32, True),
        ("kron", {}, torch.float64, False),
        ("kron", {"max_skew": float("inf"), "damping": 1e-3}, torch.float64, True),
        ("kron", {"always_dense_size": 0, "merge_dims": False}, torch.float32, False),
        ("kron", {}, torch.bfloat16, True),
        ("kron", {"fit": "eq"}, torch.float64, True),
        ("kron", {"fit": "eq"}, torch.float64, False),
        ("kron", {"fit": "pro4p"}, torch.float64, False),
        ("diag", {}, torch.float32, False),
    ],
)
def test_batched_fits_equal_one_block_at_a_time(family: str, options: dict, dtype: torch.dtype, whiten: bool) -> None:
    """Blocks of equal factor shapes are fitted as one stack: every block's state ends as when it is fitted
    alone (within the rounding of batched products), a rejected block (non-finite ``h``, or not accepted)
    keeps its state bit for bit and does not stop the others of its stack."""
    kind = get_preconditioner(family)
    group = _group(options)
    together, _ = _states(family, options, dtype)
    alone, _ = _states(family, options, dtype)
    before, _ = _states(family, options, dtype)
    vs, hs = _pairs(kind, whiten, torch.Generator().manual_seed(1))
    hs[3] = hs[3].clone().fill_(float("nan"))  # one of three (8, 6) blocks: its fit comes out non-finite
    accept = [torch.tensor(i != 6) for i in range(len(SHAPES))]  # one of two (16, 6, 5, 5) blocks refused
    kept = kind.update_checked_many(together, vs, hs, group, accept)
    for i, state in enumerate(alone):
        assert bool(kind.update_checked_many([state], [vs[i]], [hs[i]], group, [accept[i]])[0]) == bool(kept[i])
    assert [bool(k) for k in kept] == [i not in (3, 6) for i in range(len(SHAPES))]
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]  # threads split batches
    for i, (batched, single, old) in enumerate(zip(together, alone, before)):
        triples = list(zip(*(kind.fitted_tensors(state) for state in (batched, single, old))))
        for a, b, _ in triples:
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * max(b.abs().max().item(), 1e-30))
        unchanged = [torch.equal(a, c) for a, _, c in triples]
        assert all(unchanged) if i in (3, 6) else not all(unchanged)
