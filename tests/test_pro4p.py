"""``fit="pro4p"``: Kron fits the factors of ``P`` itself. Against known answers (``C^{-1/2}`` from
whitening, ``|H|^{-1}`` from exact ``H v``, indefinite too), with dense and diagonal factors in fp32 and
fp64; its Procrustes step; fits undone on a non-finite pair; the option's check; states fitted under
another ``fit`` going on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import matrix_abs, matrix_power, random_symmetric, relative_identity_error

from hf_psgd import PSGD
from hf_psgd.optim.fitting import checked_update
from hf_psgd.optim.linalg import procrustes_step3_
from hf_psgd.optim.preconditioners.kron import Kron

#: the whitening problem: gradients C1^{1/2} (x) C2^{1/2} (x) D3 times white noise, shape (4, 3, 16);
#: with merge_dims=False, always_dense_size=0 its factors are dense, dense and diagonal
C1, C2 = random_symmetric(4, 0.5, 4.0, seed=3), random_symmetric(3, 0.5, 4.0, seed=4)
D3 = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
FACTORS = {"merge_dims": False, "always_dense_size": 0, "max_skew": 1.0}


def _kron(factors: list[torch.Tensor]) -> torch.Tensor:
    """The Kronecker product of dense and diagonal (vector) factors, in float64 on the CPU."""
    product = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        f = f.detach().double().cpu()
        product = torch.kron(product, f if f.ndim == 2 else torch.diag(f))
    return product


def _whiten(opt: PSGD, x: torch.nn.Parameter, steps: int, lr: float, seed: int = 0) -> None:
    """``steps`` fits at ``precond_lr=lr`` on gradients of covariance ``C1 (x) C2 (x) D3^2``."""
    s1, s2 = (matrix_power(c, 0.5).to(x) for c in (C1, C2))
    gen = torch.Generator().manual_seed(seed)
    opt.param_groups[0]["precond_lr"] = lr
    for _ in range(steps):
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
        x.grad = torch.einsum("ai,bj,ijk->abk", s1, s2, z) * D3.to(x)
        opt.step()


def _whitening_error(factors: list[torch.Tensor]) -> float:
    """RMS of ``P C^{1/2} - I``: 0 when ``P = C^{-1/2}``."""
    return relative_identity_error(_kron(factors) @ torch.kron(matrix_power(torch.kron(C1, C2), 0.5), torch.diag(D3)))


def _assert_cache_is_the_fitted_p(state: dict) -> None:
    """The cache is the stored factors (``P``'s own under pro4p) in its dtype; dense ones near symmetric."""
    assert state["stores_p"]
    for p, q in zip(state["P"], state["Q"]):
        assert torch.equal(p, q.to(p.dtype))
        if q.ndim == 2:
            assert (q - q.mT).abs().max() < 0.01 * q.abs().max()


def test_procrustes_step3_rotates_to_the_polar_factor() -> None:
    """From ``Q = U S`` (``S`` SPD, ``U`` a rotation by 0.66 rad) the steps reach ``S = (Q^T Q)^{1/2}`` (up to the
    truncation of the rotation, ``|a R|^6 / 64`` a step); a symmetric ``Q`` does not move."""
    s = random_symmetric(6, 0.5, 4.0, seed=5)
    skew = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = torch.linalg.matrix_exp(0.15 * (skew - skew.T)) @ s
    for _ in range(40):
        procrustes_step3_(q)
    assert (q - q.T).abs().max() < 1e-6
    torch.testing.assert_close(q, s, rtol=0, atol=2e-4)
    symmetric = s.clone()
    procrustes_step3_(symmetric)
    assert torch.equal(symmetric, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whitening_fits_inverse_sqrt_covariance(dtype: torch.dtype, device: torch.device) -> None:
    """``P -> C^{-1/2}`` with two dense factors and a diagonal one (fp32 with the default bf16 cache)."""
    x = torch.nn.Parameter(torch.zeros(4, 3, 16, dtype=dtype, device=device))
    opt = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, fit="pro4p", **FACTORS)
    _whiten(opt, x, 100, 0.2)
    _whiten(opt, x, 100, 0.05, seed=1)
    state = opt.state[x]
    assert [tuple(q.shape) for q in state["Q"]] == [(4, 4), (3, 3), (16,)]
    assert _whitening_error(state["P"]) < 0.1
    _assert_cache_is_the_fitted_p(state)


@pytest.mark.parametrize(("dtype", "indefinite"), [(torch.float64, False), (torch.float32, True)])
def test_hvp_fits_inverse_abs_hessian(dtype: torch.dtype, indefinite: bool) -> None:
    """Loss ``1/2 tr(X^T H1 X D2)`` has Hessian ``H1 (x) D2`` on ``vec(X)``; ``P -> |H|^{-1}`` with a dense and a
    diagonal factor (indefinite: both ``H1`` and ``D2`` have eigenvalues of both signs)."""
    h1 = random_symmetric(5, indefinite=indefinite, seed=1)
    d2 = torch.logspace(0, 1, 8, dtype=torch.float64) * (torch.tensor([1.0, -1.0]).repeat(4) if indefinite else 1)
    x = torch.nn.Parameter(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(dtype))
    opt = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, curvature="hvp", fit="pro4p", **FACTORS)
    a, b = h1.to(dtype), d2.to(dtype)
    for t in range(300):
        opt.param_groups[0]["precond_lr"] = 0.1 if t < 150 else 0.02
        opt.step(lambda: 0.5 * (x * (a @ x * b)).sum())
    state = opt.state[x]
    assert [tuple(q.shape) for q in state["Q"]] == [(5, 5), (8,)]
    error = relative_identity_error(_kron(state["P"]) @ matrix_abs(torch.kron(h1, torch.diag(d2))))
    assert error < (0.08 if indefinite else 0.02)
    _assert_cache_is_the_fitted_p(state)


def _fitted(state: dict) -> list[torch.Tensor]:
    return [t.clone() for t in (*state["Q"], *state["P"], state["lipschitz"])]


def test_a_non_finite_pair_leaves_the_state_as_it_was() -> None:
    """A NaN gradient masks the step (its fit undone); a fit on an ``h`` with an Inf, which comes out
    non-finite, is undone by the checked fit. The factors, the cache and the bounds stay bit for bit."""
    x = torch.nn.Parameter(torch.zeros(6, 4))
    opt = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, fit="pro4p", max_skew=math.inf)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x.grad = torch.randn(6, 4, generator=gen)
        opt.step()
    state = opt.state[x]
    before = _fitted(state)
    x.grad = torch.randn(6, 4, generator=gen)
    x.grad[1, 2] = float("nan")
    opt.step()
    h = torch.randn(6, 4, generator=gen)
    h[0, 3] = float("inf")
    checked_update(Kron, state, None, h, h, opt.param_groups[0], torch.tensor(True))
    assert (int(state["skipped_steps"]), int(state["rejected_fits"])) == (1, 2)
    assert all(torch.equal(now, old) for now, old in zip(_fitted(state), before))
    assert state["stores_p"]


def test_a_switch_of_fit_survives_a_rejected_first_fit() -> None:
    """The factors change form before the checked fit, not inside it: a Q0.5EQ1.5 state switched to pro4p whose
    first fit is undone (an all-zero gradient: a stall; with lr > 0, as lr 0 and zero gradients only initialise
    the state) keeps ``P`` and holds ``P``'s factors."""
    x = torch.nn.Parameter(torch.zeros(6, 4))
    opt = PSGD([x], lr=1e-3, momentum=0.0, precond_update_prob=1.0, max_skew=math.inf)
    for _ in range(5):
        x.grad = torch.randn(6, 4)
        opt.step()
    state = opt.state[x]
    squares = [q.mT @ q for q in state["Q"]]
    cache = [p.clone() for p in state["P"]]
    opt.param_groups[0]["fit"] = "pro4p"
    x.grad = torch.zeros(6, 4)
    opt.step()
    assert int(state["rejected_fits"]) == 1 and state["stores_p"]
    assert all(torch.equal(p, old) for p, old in zip(state["P"], cache))
    for q, square in zip(state["Q"], squares):
        torch.testing.assert_close(q, square)


def test_an_unknown_fit_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"fit='PRO4P' is invalid: expected one of \['eq', 'q0.5eq1.5', 'pro4p'\]"):
        PSGD([torch.nn.Parameter(torch.ones(2))], fit="PRO4P")


def _p_factors(state: dict) -> list[torch.Tensor]:
    """``P``'s factors (float64) from the stored ones: ``P``'s own under pro4p, else ``Q_i^T Q_i``."""
    factors = [q.double() for q in state["Q"]]
    return factors if state["stores_p"] else [q.mT @ q if q.ndim == 2 else q.square() for q in factors]


def _resumed(opt: PSGD, fit: str) -> tuple[PSGD, torch.nn.Parameter]:
    """A new optimizer loaded from ``opt``'s checkpoint (which brings its own ``fit`` back), switched to
    ``fit``; after one fit at a negligible step its ``P`` is the checkpoint's."""
    x = torch.nn.Parameter(torch.zeros(4, 3, 16))
    resumed = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, fit=fit, **FACTORS)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = _kron(_p_factors(resumed.state[x]))
    assert resumed.param_groups[0]["fit"] != fit
    resumed.param_groups[0]["fit"] = fit
    _whiten(resumed, x, 1, 1e-12)
    after = _kron(_p_factors(resumed.state[x]))
    torch.testing.assert_close(after / after.norm(), before / before.norm(), rtol=0, atol=1e-4)
    return resumed, x


def test_a_q05eq15_checkpoint_goes_on_under_pro4p() -> None:
    """A Q0.5EQ1.5 state switched to pro4p stores ``P_i = Q_i^T Q_i`` (``P`` unchanged) and fits on to ``C^{-1/2}``."""
    x = torch.nn.Parameter(torch.zeros(4, 3, 16))
    opt = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, fit="q0.5eq1.5", **FACTORS)
    _whiten(opt, x, 60, 0.2)
    resumed, y = _resumed(opt, "pro4p")
    state = resumed.state[y]
    _whiten(resumed, y, 100, 0.2, seed=1)
    _whiten(resumed, y, 100, 0.05, seed=2)
    assert _whitening_error(state["P"]) < 0.1
    _assert_cache_is_the_fitted_p(state)


@pytest.mark.parametrize("fit", ["eq", "q0.5eq1.5"])
def test_a_pro4p_checkpoint_goes_on_under_another_fit(fit: str) -> None:
    """Back from pro4p: ``Q_i = chol(P_i)^T`` (upper triangular, as EQ keeps it), ``P`` unchanged; the fit goes on
    to ``C^{-1/2}``."""
    x = torch.nn.Parameter(torch.zeros(4, 3, 16))
    opt = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, fit="pro4p", **FACTORS)
    _whiten(opt, x, 60, 0.2)
    resumed, y = _resumed(opt, fit)
    state = resumed.state[y]
    assert not state["stores_p"]
    if fit == "eq":
        assert all(torch.equal(q, q.triu()) for q in state["Q"] if q.ndim == 2)
    _whiten(resumed, y, 100, 0.2, seed=1)
    _whiten(resumed, y, 100, 0.05, seed=2)
    assert _whitening_error(state["P"]) < 0.1


@pytest.mark.parametrize("defect", ["singular", "indefinite"])
def test_a_pro4p_factor_that_rounding_left_not_positive_definite_converts_to_finite_factors(defect: str) -> None:
    """A stored ``P_i`` that is singular or slightly indefinite (rounding) still turns into finite, invertible
    upper-triangular ``Q_i`` whose ``Q_i^T Q_i`` is ``P_i`` on its positive spectrum; the fit goes on."""
    x = torch.nn.Parameter(torch.zeros(4, 3, 16))
    opt = PSGD([x], lr=0.0, momentum=0.0, precond_update_prob=1.0, fit="pro4p", **FACTORS)
    _whiten(opt, x, 5, 0.2)
    state = opt.state[x]
    vectors = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0))).Q
    values = torch.tensor([2.0, 1.0, 0.5, 0.0 if defect == "singular" else -1e-6])
    state["Q"][0].copy_((vectors * values) @ vectors.mT)
    opt.param_groups[0]["fit"] = "eq"
    Kron.conform_state(state, opt.param_groups[0])
    q = state["Q"][0]
    assert torch.isfinite(q).all() and torch.equal(q, q.triu()) and (q.diagonal() > 0).all()
    kept = (vectors * values.clamp_min(0)) @ vectors.mT
    torch.testing.assert_close(q.mT @ q, kept, atol=1e-5, rtol=0)
    _whiten(opt, x, 20, 0.2, seed=1)
    assert all(torch.isfinite(t).all() for t in state["Q"])
