"""The fitted preconditioner against known answers: |H|^{-1} (hvp), C^{-1/2} (whitening), Rosenbrock."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import matrix_abs, matrix_power, random_symmetric, relative_identity_error, rosenbrock

from hf_psgd import PSGD
from hf_psgd.optim.preconditioners.kron import Kron


def _fit_only(param: torch.nn.Parameter, **options) -> PSGD:
    """A PSGD that only fits its preconditioner (lr 0, no momentum) every step, next to no damping unless
    given (exact ``H v`` then fits ``|H|^{-1}``; the ``hvp`` default 1e-2 would fit ``|H + 0.01 I|^{-1}``)."""
    return PSGD([param], lr=0.0, momentum=0.0, precond_update_prob=1.0, **{"damping": 1e-9, **options})


def _kron_preconditioner(opt: PSGD, param: torch.Tensor) -> torch.Tensor:
    left, right = opt.state[param]["P"]
    return torch.kron(left, right)


FITS = pytest.mark.parametrize("fit", ["eq", "q0.5eq1.5"])


@FITS
@pytest.mark.parametrize("indefinite", [False, True], ids=["spd", "indefinite"])
def test_kron_hvp_fits_inverse_abs_hessian(indefinite: bool, fit: str) -> None:
    """Loss 1/2 tr(X^T H1 X H2) has Hessian H1 (x) H2 on vec(X); P must tend to |H|^{-1}."""
    m, n = 5, 4
    h1 = random_symmetric(m, indefinite=indefinite, seed=1)
    h2 = random_symmetric(n, seed=2)
    x = torch.nn.Parameter(torch.randn(m, n, dtype=torch.float64))
    opt = _fit_only(x, curvature="hvp", precond_lr=0.1, max_skew=math.inf, fit=fit)
    for t in range(2000):
        if t == 1000:
            opt.param_groups[0]["precond_lr"] = 0.02
        opt.zero_grad()
        (0.5 * (x * (h1 @ x @ h2)).sum()).backward(create_graph=True)
        opt.step()
    error = relative_identity_error(_kron_preconditioner(opt, x) @ matrix_abs(torch.kron(h1, h2)))
    assert error < (0.08 if indefinite else 1e-2)
    assert x.grad is not None and not x.grad.requires_grad  # the graph was released


def test_diag_hvp_fits_inverse_abs_diagonal_hessian() -> None:
    diagonal = torch.tensor([3.0, -0.5, 10.0, 0.2, -2.0, 1.0], dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = _fit_only(x, preconditioner="diag", curvature="hvp", precond_lr=0.2)
    for _ in range(1500):
        opt.step(lambda: 0.5 * (diagonal * x * x).sum())
    fitted = opt.state[x]["q"].square()
    torch.testing.assert_close(fitted * diagonal.abs(), torch.ones(6, dtype=torch.float64), rtol=1e-3, atol=0)


@pytest.mark.parametrize(("fit", "fit_dtype"), [("eq", None), ("q0.5eq1.5", None), ("q0.5eq1.5", "bfloat16")])
def test_kron_whitening_fits_inverse_sqrt_covariance(fit: str, fit_dtype: str | None, device: torch.device) -> None:
    """Gradients G = C1^{1/2} Z C2^{1/2} (Z white) have covariance C1 (x) C2: P -> C^{-1/2} (also with the
    fit's products over the block in bf16)."""
    m, n = 4, 3
    c1, c2 = random_symmetric(m, 0.5, 4.0, seed=3), random_symmetric(n, 0.5, 4.0, seed=4)
    s1, s2 = matrix_power(c1, 0.5).to(device), matrix_power(c2, 0.5).to(device)
    x = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64, device=device))
    opt = _fit_only(x, curvature="whiten", precond_lr=0.1, max_skew=math.inf, fit=fit, fit_dtype=fit_dtype)
    gen = torch.Generator().manual_seed(0)
    for t in range(6000):
        opt.param_groups[0]["precond_lr"] = 0.1 if t < 2000 else 0.01
        x.grad = s1 @ torch.randn(m, n, generator=gen, dtype=torch.float64).to(device) @ s2
        opt.step()
    target = matrix_power(torch.kron(c1, c2), 0.5)
    assert relative_identity_error(_kron_preconditioner(opt, x).cpu() @ target) < 0.1


@pytest.mark.parametrize("damping", [0.1, 0.0])
def test_kron_whitening_damping_bounds_null_directions(damping: float) -> None:
    """Gradients S Z with rows 4, 5 of S zero: ``P -> (S S^T + damping^2 I)^{-1/2} (x) I``, so the
    null rows reach ``1 / damping``; without damping they grow past it."""
    m, n = 6, 4
    scales = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.0, 0.0], dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = _fit_only(x, curvature="whiten", precond_lr=0.1, max_skew=math.inf, damping=damping)
    gen = torch.Generator().manual_seed(0)
    for t in range(6000):
        opt.param_groups[0]["precond_lr"] = 0.1 if t < 4000 else 0.02
        x.grad = scales[:, None] * torch.randn(m, n, generator=gen, dtype=torch.float64)
        opt.step()
    fitted = _kron_preconditioner(opt, x)
    null_rows = fitted.diagonal()[4 * n :]
    if damping:
        target = torch.kron(torch.diag((scales.square() + damping**2).rsqrt()), torch.eye(n, dtype=torch.float64))
        assert relative_identity_error(fitted @ torch.linalg.inv(target)) < 0.1
        torch.testing.assert_close(null_rows * damping, torch.ones_like(null_rows), rtol=0.1, atol=0)
    else:
        assert null_rows.min() > 1.5 / 0.1


def test_kron_inverse_gram_and_damping_terms() -> None:
    """The probe term ``Q^{-T} Q^{-1}`` against an explicit inverse, and the whitening fit's probe and
    damping terms (EQ) against their closed forms ``E[B_(i) B_(i)^T]`` and
    ``damping^2 E[(Q v)_(i) (Q v)_(i)^T] = damping^2 Q_i Q_i^T prod_{j!=i} |Q_j|_F^2``."""
    gen = torch.Generator().manual_seed(0)
    left = torch.eye(5) + 0.3 * torch.randn(5, 5, generator=gen).triu()
    right = 0.5 + torch.rand(3, generator=gen)
    for q in (left, right):  # the family works on stacks of blocks: a batch of one
        inverse = torch.linalg.inv(q) if q.ndim == 2 else torch.diag(q.reciprocal())
        expected = inverse.mT @ inverse
        fitted = Kron._inverse_gram(q.unsqueeze(0))[0]
        torch.testing.assert_close(fitted if q.ndim == 2 else torch.diag(fitted), expected, rtol=1e-4, atol=1e-5)
    factors, damping = [left.unsqueeze(0), right.unsqueeze(0)], 1e-3
    terms_b, terms_damping = Kron._probe_terms(factors, factors, [None], torch.Size([5, 3]), damping, symmetric=False)
    factors = [left, right]
    grams = [q @ q.mT if q.ndim == 2 else q.square() for q in factors]
    norms = [gram.trace() if gram.ndim == 2 else gram.sum() for gram in grams]
    inverse_grams = [Kron._inverse_gram(q.unsqueeze(0))[0] for q in factors]
    inverse_norms = [gram.trace() if gram.ndim == 2 else gram.sum() for gram in inverse_grams]
    for i in range(2):
        torch.testing.assert_close(terms_damping[i][0], damping**2 * grams[i] * norms[1 - i])
        torch.testing.assert_close(terms_b[i][0], inverse_grams[i] * inverse_norms[1 - i])


def test_diag_whitening_fits_inverse_rms() -> None:
    """Per element P -> E[g^2]^{-1/2}; the fit is noisy, so compare its geometric time average."""
    scales = torch.tensor([0.1, 1.0, 10.0, 3.0], dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = _fit_only(x, preconditioner="diag", curvature="whiten", precond_lr=0.02)
    gen = torch.Generator().manual_seed(0)
    log_sum = torch.zeros(4, dtype=torch.float64)
    for t in range(4000):
        x.grad = scales * torch.randn(4, generator=gen, dtype=torch.float64)
        opt.step()
        if t >= 2000:
            log_sum += opt.state[x]["q"].square().log()
    fitted = (log_sum / 2000).exp()
    torch.testing.assert_close(fitted * scales, torch.ones(4, dtype=torch.float64), rtol=0.08, atol=0)


@FITS
@pytest.mark.parametrize("route", ["closure", "graph"])
def test_rosenbrock_hvp_reaches_1e_10_without_line_search(route: str, fit: str) -> None:
    """EQ at the fit's largest step, 1; Q0.5EQ1.5 at 0.3 (with steps of 1 its full, untriangular updates can
    leave the group: there it diverges, at 0.5 it stalls near 1e-7)."""
    x = torch.nn.Parameter(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    opt = PSGD(
        [x],
        lr=1.0,
        curvature="hvp",
        momentum=0.0,
        precond_lr=1.0 if fit == "eq" else 0.3,
        lipschitz_beta=0.0,
        precond_update_prob=1.0,
        max_update_rms=None,
        max_update_growth=None,
        max_skew=math.inf,
        fit=fit,
    )
    for _ in range(500):
        if route == "closure":
            opt.step(lambda: rosenbrock(x))
        else:
            opt.zero_grad()
            rosenbrock(x).backward(create_graph=True)
            opt.step()
        if rosenbrock(x.detach()) < 1e-10:
            break
    assert rosenbrock(x.detach()) < 1e-10, f"f = {rosenbrock(x.detach()).item():.3e} after 500 iterations"


def test_kron_eq_factors_stay_in_their_groups() -> None:
    """Over a long noisy run, EQ's dense factors stay upper triangular with a positive diagonal and
    diagonal factors stay positive; everything finite."""
    x = torch.nn.Parameter(torch.zeros(6, 40))
    opt = PSGD([x], lr=0.0, precond_update_prob=1.0, precond_lr=0.5, fit="eq", always_dense_size=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        x.grad = torch.randn(6, 40, generator=gen) * torch.logspace(-3, 3, 40)
        opt.step()
    dense, diagonal = opt.state[x]["Q"]
    assert dense.shape == (6, 6) and diagonal.shape == (40,)
    assert torch.equal(dense, dense.triu())
    assert (dense.diagonal() > 0).all() and (diagonal > 0).all()
    assert all(torch.isfinite(t).all() for t in (dense, diagonal, *opt.state[x]["P"]))


def test_q05eq15_factors_stay_symmetric_positive_definite_and_take_over_eq_factors() -> None:
    """Q0.5EQ1.5 keeps dense factors symmetric positive definite; switched on after EQ fits (a triangular
    factor), its Procrustes rotations make the factor symmetric without changing ``P``."""
    x = torch.nn.Parameter(torch.zeros(6, 40, dtype=torch.float64))
    opt = PSGD([x], lr=0.0, precond_update_prob=1.0, precond_lr=0.5, max_skew=math.inf, fit="eq")
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, 40, dtype=torch.float64)
    for t in range(600):
        if t == 300:
            before = [p.clone() for p in opt.state[x]["P"]]
            opt.param_groups[0].update(fit="q0.5eq1.5", precond_lr=1e-12)  # rotations only, for 60 fits
        if t == 360:
            for p, old in zip(opt.state[x]["P"], before):
                torch.testing.assert_close(p / p.norm(), old / old.norm(), rtol=0, atol=3e-4)  # |aR|^4 / 4 a step
            assert all((q - q.mT).abs().max() < 1e-6 * q.abs().max() for q in opt.state[x]["Q"])
            opt.param_groups[0]["precond_lr"] = 0.5
        x.grad = torch.randn(6, 40, generator=gen, dtype=torch.float64) * scales
        opt.step()
    for q in opt.state[x]["Q"]:  # each fit's step is not symmetric; one rotation a fit keeps it nearly so
        assert (q - q.mT).abs().max() < 0.01 * q.abs().max()
        assert torch.linalg.eigvalsh((q + q.mT) / 2).min() > 0
