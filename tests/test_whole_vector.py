"""The whole-vector families (lra, xmat, dense): their steps against explicit matrices, their fits
against known answers (|H|^{-1}), fd against hvp, and their life as one block per param group."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import matrix_abs, random_symmetric, relative_identity_error, rosenbrock

from hf_psgd import PSGD
from hf_psgd.optim.preconditioners import LRA, Dense, Diag, XMat, get_preconditioner

F64 = torch.float64
#: Exact, noise-free H v: no smoothing of the step normaliser; fits every step; next to no damping (the
#: ``hvp`` default 1e-2 would fit ``|H + 0.01 I|^{-1}``, tested on its own below).
FIT_OPTIONS = {"precond_lr": 0.3, "lipschitz_beta": 0.0, "precond_update_prob": 1.0, "damping": 1e-9}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _preconditioner_matrix(opt: PSGD, group_index: int = 0) -> torch.Tensor:
    """``P`` of a group's block, column by column: ``P e_i``."""
    group = opt.param_groups[group_index]
    state = opt.state[group["params"][0]]
    family = get_preconditioner(group["preconditioner"])
    n = sum(p.numel() for p in group["params"])
    return torch.stack([family.precondition(state, e).reshape(-1) for e in torch.eye(n, dtype=F64)], dim=1)


def _fit_on_quadratic(h: torch.Tensor, preconditioner: str, schedule: list[tuple[int, float]], **options) -> PSGD:
    """Fit only (lr 0) on ``1/2 x^T H x`` with exact ``H v``; ``schedule``: (steps, precond_lr) phases."""
    x = torch.nn.Parameter(torch.randn(h.shape[0], dtype=F64, generator=_gen(5)))
    options = {**FIT_OPTIONS, **options}
    opt = PSGD([x], lr=0.0, momentum=0.0, preconditioner=preconditioner, curvature="hvp", **options)
    for steps, precond_lr in schedule:
        opt.param_groups[0]["precond_lr"] = precond_lr
        for _ in range(steps):
            opt.step(lambda x=x: 0.5 * x @ h @ x)
    return opt


# ------------------------------------------------------------------ one step against explicit matrices


def test_dense_step_is_the_triangular_lie_group_step() -> None:
    n = 6
    q = torch.randn(n, n, dtype=F64, generator=_gen(0)).triu() + 3 * torch.eye(n, dtype=F64)
    v, h = torch.randn(2, n, dtype=F64, generator=_gen(1))
    state = {"Q": q.clone(), "lipschitz": torch.zeros((), dtype=F64)}
    Dense.update(state, v, h, FIT_OPTIONS)

    a, b = q @ h, torch.linalg.solve(q.T, v)
    bound = torch.linalg.eigvalsh(torch.outer(a, a) + torch.outer(b, b)).max()
    expected = q - FIT_OPTIONS["precond_lr"] / bound * torch.triu(torch.outer(a, a) - torch.outer(b, b)) @ q
    torch.testing.assert_close(state["Q"], expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(n, dtype=F64, generator=_gen(2))
    torch.testing.assert_close(Dense.precondition(state, g), expected.T @ expected @ g, rtol=1e-12, atol=1e-12)


def _x_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.diag(a) + torch.diag(b).flip(1)


@pytest.mark.parametrize("n", [6, 7], ids=["even", "odd"])
def test_xmat_step_is_the_blockwise_lie_group_step(n: int) -> None:
    """X-shaped Q is block diagonal with 2 x 2 blocks (i, n-1-i); each block takes the GL(2) step
    ``Q_p <- Q_p - mu / lambda_max(A_p A_p^T + B_p B_p^T) (A_p A_p^T - B_p B_p^T) Q_p``."""
    a = 1 + torch.rand(n, dtype=F64, generator=_gen(0))
    b = 0.3 * torch.randn(n, dtype=F64, generator=_gen(1))
    if n % 2:
        b[n // 2] = 0
    v, h = torch.randn(2, n, dtype=F64, generator=_gen(2))
    state = {"a": a.clone(), "b": b.clone()}
    XMat.update(state, v, h, FIT_OPTIONS)

    q = _x_matrix(a, b)
    big_a, big_b = q @ h, torch.linalg.solve(q.T, v)
    mask = _x_matrix(torch.ones(n, dtype=F64), torch.ones(n, dtype=F64)) > 0
    gradient = (torch.outer(big_a, big_a) - torch.outer(big_b, big_b)) * mask
    total = (torch.outer(big_a, big_a) + torch.outer(big_b, big_b)) * mask
    steps = torch.empty(n, dtype=F64)
    for i in range(n):
        block = sorted({i, n - 1 - i})
        steps[i] = FIT_OPTIONS["precond_lr"] / torch.linalg.eigvalsh(total[block][:, block]).max()
    expected = q - steps.unsqueeze(1) * (gradient @ q)
    torch.testing.assert_close(_x_matrix(state["a"], state["b"]), expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(n, dtype=F64, generator=_gen(3))
    torch.testing.assert_close(XMat.precondition(state, g), expected.T @ expected @ g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fit_v", [True, False], ids=["V-step", "U-step"])
def test_lra_steps_are_lie_group_steps(fit_v: bool) -> None:
    """``d``: per-element normalised step on the right diagonal group; ``U`` (``V`` fixed) and ``V``
    (``U`` fixed): ``M <- (I - s G) M`` with ``G = E V V^T`` or ``U U^T E``, ``E = a a^T - b b^T``."""
    n, r, mu = 9, 3, FIT_OPTIONS["precond_lr"]
    d = 0.5 + torch.rand(n, dtype=F64, generator=_gen(0))
    u, w = 0.3 * torch.randn(2, n, r, dtype=F64, generator=_gen(1))
    v, h = torch.randn(2, n, dtype=F64, generator=_gen(2))
    state = {"d": d.clone(), "U": u.clone(), "V": w.clone(), "lipschitz": torch.zeros(2, dtype=F64)}
    state["fit_V_next"] = fit_v
    LRA.update(state, v, h, FIT_OPTIONS)

    m = torch.eye(n, dtype=F64) + u @ w.T
    q = m @ torch.diag(d)
    p = q.T @ q
    a, b = q @ h, torch.linalg.solve(q.T, v)
    p_h, inverse_p_v = p @ h, torch.linalg.solve(p, v)
    bound = (p_h.square() + v.square()).sqrt() * (h.square() + inverse_p_v.square()).sqrt()
    expected_d = d * (1 - mu * (h * p_h - v * inverse_p_v) / bound)
    e = torch.outer(a, a) - torch.outer(b, b)
    factor = u if fit_v else w
    lipschitz = a.norm() * (factor @ factor.T @ a).norm() + b.norm() * (factor @ factor.T @ b).norm()
    g = u @ u.T @ e if fit_v else e @ w @ w.T
    expected_m = (torch.eye(n, dtype=F64) - mu / lipschitz * g) @ m

    torch.testing.assert_close(state["d"], expected_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.eye(n, dtype=F64) + state["U"] @ state["V"].T, expected_m, rtol=1e-12, atol=1e-12)
    assert state["fit_V_next"] is not fit_v
    assert state["U"].norm().item() == pytest.approx(state["V"].norm().item())  # rebalanced
    x = torch.randn(n, dtype=F64, generator=_gen(3))
    q_new = expected_m @ torch.diag(expected_d)
    torch.testing.assert_close(LRA.precondition(state, x), q_new.T @ q_new @ x, rtol=1e-12, atol=1e-12)


def test_lra_fit_with_singular_low_rank_part_leaves_state_unchanged() -> None:
    """``U = e_0``, ``V = -e_0``: ``I + U V^T`` (and ``K = I + V^T U``) is singular."""
    n = 4
    u = torch.zeros(n, 1, dtype=F64)
    u[0] = 1.0
    state = {"d": torch.ones(n, dtype=F64), "U": u, "V": -u, "lipschitz": torch.ones(2, dtype=F64), "fit_V_next": True}
    before = {key: value.clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
    LRA.update(state, torch.ones(n, dtype=F64), torch.ones(n, dtype=F64), FIT_OPTIONS)
    assert all(torch.equal(state[key], value) for key, value in before.items())


def test_lra_rank_zero_is_the_diagonal_family() -> None:
    n = 8
    lra = LRA.init_state(torch.Size([n]), {"rank": 0, "seed": 0}, F64, torch.device("cpu"))
    diag = Diag.init_state(torch.Size([n]), {}, F64, torch.device("cpu"))
    scales = torch.logspace(-2, 2, n, dtype=F64)
    gen = _gen(0)
    for _ in range(50):
        v = torch.randn(n, dtype=F64, generator=gen)
        LRA.update(lra, v, scales * v, FIT_OPTIONS)
        Diag.update(diag, v, scales * v, FIT_OPTIONS)
    torch.testing.assert_close(lra["d"], diag["q"], rtol=1e-12, atol=0)
    assert lra["U"].shape == lra["V"].shape == (n, 0)


# ------------------------------------------------------------------ fits against known answers

ANNEALED = [(1000, 0.1), (1000, 0.02)]


@pytest.mark.parametrize("indefinite", [False, True], ids=["spd", "indefinite"])
def test_dense_hvp_fits_inverse_abs_hessian(indefinite: bool) -> None:
    h = random_symmetric(6, indefinite=indefinite, seed=1)
    schedule = ANNEALED + [(2000, 0.005)] if indefinite else ANNEALED
    opt = _fit_on_quadratic(h, "dense", schedule)
    error = relative_identity_error(_preconditioner_matrix(opt) @ matrix_abs(h))
    assert error < (0.08 if indefinite else 1e-3)


def test_hvp_default_damping_fits_the_inverse_of_the_damped_hessian() -> None:
    """With ``curvature="hvp"`` and ``damping=None`` the fitted pairs are ``(v, H v + 0.01 v)``:
    ``P -> (H + 0.01 I)^{-1}``, which bounds ``P`` by 100 where ``H`` has eigenvalues far below 0.01."""
    h = random_symmetric(6, 0.002, 0.1, seed=2)
    opt = _fit_on_quadratic(h, "dense", ANNEALED, damping=None)
    assert opt.param_groups[0]["damping"] == 0.01
    fitted = _preconditioner_matrix(opt)
    assert relative_identity_error(fitted @ (h + 0.01 * torch.eye(6, dtype=F64))) < 1e-3
    assert relative_identity_error(fitted @ h) > 0.3


def _outlier_hessian(n: int, outliers: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = I + B diag(outliers) B^T`` with orthonormal ``B`` (``n x k``); returns ``(H, B)``."""
    basis, _ = torch.linalg.qr(torch.randn(n, len(outliers), dtype=F64, generator=_gen(0)))
    return torch.eye(n, dtype=F64) + basis @ torch.diag(torch.tensor(outliers, dtype=F64)) @ basis.T, basis


@pytest.mark.parametrize("outliers", [[100.0, 30.0, 10.0], [100.0, 30.0, -10.0]], ids=["spd", "indefinite"])
def test_lra_captures_outlying_eigenvalues_with_enough_rank(outliers: list[float]) -> None:
    """``H`` = identity plus three outliers (``|H|`` eigenvalues 101, 31, 11 or 9 against 1): with
    rank 3, ``B^T P |H| B ~ I`` on the outliers' subspace; with rank 1 only the largest is caught."""
    h, basis = _outlier_hessian(40, outliers)
    on_outliers = {}
    for rank in (1, 3):
        opt = _fit_on_quadratic(h, "lra", ANNEALED, rank=rank)
        on_outliers[rank] = (basis.T @ _preconditioner_matrix(opt) @ matrix_abs(h) @ basis).diagonal()
    torch.testing.assert_close(on_outliers[3], torch.ones(3, dtype=F64), rtol=0, atol=0.08)
    assert abs(on_outliers[1][0] - 1) < 0.1 and (on_outliers[1][1:] > 2).all()


def _x_shaped_hessian(n: int, indefinite: bool) -> torch.Tensor:
    """Symmetric X-shaped ``H``: a random 2 x 2 block on every pair ``(i, n-1-i)`` (eigenvalue
    magnitudes in [1, 10], alternating blocks indefinite) and 3 (or -3) at the centre."""
    h = torch.zeros(n, n, dtype=F64)
    for i in range(n // 2):
        j = n - 1 - i
        block = random_symmetric(2, 1.0, 10.0, indefinite=indefinite and i % 2 == 0, seed=i)
        h[[i, i, j, j], [i, j, i, j]] = block.flatten()
    if n % 2:
        h[n // 2, n // 2] = -3.0 if indefinite else 3.0
    return h


@pytest.mark.parametrize("indefinite", [False, True], ids=["spd", "indefinite"])
def test_xmat_hvp_fits_inverse_abs_of_x_shaped_hessian(indefinite: bool) -> None:
    h = _x_shaped_hessian(7, indefinite)
    schedule = [(1000, 0.1), (3000, 0.001)] if indefinite else [(500, 0.1)]
    opt = _fit_on_quadratic(h, "xmat", schedule)
    fitted = _preconditioner_matrix(opt)
    assert relative_identity_error(fitted @ matrix_abs(h)) < (0.05 if indefinite else 1e-6)
    assert torch.equal(fitted != 0, _x_matrix(torch.ones(7), torch.ones(7)) != 0)  # P stays X-shaped


@pytest.mark.parametrize("preconditioner", ["dense", "lra", "xmat"])
def test_fd_and_hvp_fit_the_same_preconditioner(preconditioner: str) -> None:
    """On a smooth problem the finite-difference ``H v`` is exact to about ``sqrt(eps)``: parameters
    and fitted ``P`` after 30 steps agree closely (a wrong scale or sign in either would not)."""
    finals = {}
    for curvature in ("hvp", "fd"):
        x = torch.nn.Parameter(torch.tensor([-1.0, 1.0, 0.5, -0.5, 1.2, 0.8], dtype=F64))
        opt = PSGD(
            [x], lr=0.3, preconditioner=preconditioner, curvature=curvature, momentum=0.5, precond_lr=0.5, rank=2
        )
        for _ in range(30):
            opt.step(lambda x=x: rosenbrock(x))
        finals[curvature] = (x.detach().clone(), _preconditioner_matrix(opt))
    assert not torch.allclose(finals["hvp"][1], torch.eye(6, dtype=F64) * finals["hvp"][1][0, 0])  # P moved
    torch.testing.assert_close(finals["fd"][0], finals["hvp"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(finals["fd"][1], finals["hvp"][1], rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------ secant pairs


@pytest.mark.parametrize("preconditioner", ["dense", "kron"])
def test_secant_pairs_alone_fit_the_inverse_hessian_of_a_quadratic(preconditioner: str) -> None:
    """On ``1/2 x^T H x`` every secant pair is exact, ``y = H s``, also across a jump of ``x`` made
    outside the optimiser (which the test uses to vary the directions). Probes fit only on the first
    step (``precond_update_prob`` ~ 0): the secant pairs alone bring ``P H`` to ``I``; without them
    ``P`` keeps the scale of that single fit."""
    h = random_symmetric(5, 1.0, 20.0, seed=3)
    errors = {}
    for secant in (False, True):
        x = torch.nn.Parameter(torch.zeros(5, dtype=F64))
        opt = PSGD(
            [x],
            lr=0.3,
            momentum=0.0,
            preconditioner=preconditioner,
            curvature="hvp",
            precond_lr=0.3,
            lipschitz_beta=0.0,
            precond_update_prob=1e-9,
            max_update_rms=None,
            max_update_growth=None,
            damping=1e-9,
            max_skew=math.inf,
            secant_pairs=secant,
        )
        for step in range(600):
            if step % 5 == 0:
                x.data.copy_(torch.randn(5, dtype=F64, generator=_gen(step)))
            opt.step(lambda x=x: 0.5 * x @ h @ x)
        assert opt.state[x]["precond_updates"] == 1
        errors[secant] = relative_identity_error(_preconditioner_matrix(opt) @ h)
    assert errors[True] < 1e-3 < 0.3 < errors[False]


def test_secant_pairs_bring_dense_to_the_rosenbrock_target() -> None:
    """2-D Rosenbrock from (-1, 1), exact ``H v``, lr 1, no line search: with secant pairs dense reaches
    ``f < 1e-10`` within 50 iterations (the reproduction's target); from probes alone it does not."""
    iterations = {}
    for secant in (False, True):
        x = torch.nn.Parameter(torch.tensor([-1.0, 1.0], dtype=F64))
        opt = PSGD(
            [x],
            lr=1.0,
            momentum=0.0,
            preconditioner="dense",
            curvature="hvp",
            precond_lr=1.0,
            lipschitz_beta=0.0,
            precond_update_prob=1.0,
            max_update_rms=None,
            max_update_growth=None,
            secant_pairs=secant,
        )
        for iterations[secant] in range(1, 51):
            opt.step(lambda x=x: rosenbrock(x))
            if rosenbrock(x.detach()) < 1e-10:
                break
    assert iterations[True] < 50 and rosenbrock(x.detach()) < 1e-10
    assert iterations[False] == 50


# ------------------------------------------------------------------ one block per param group


def test_group_block_spans_all_parameters_of_the_group() -> None:
    """A weight (2 x 2) and a bias (2) form one 6-vector: dense fits ``|H|^{-1}`` of the Hessian over
    their concatenation (order: as listed in the group), and state lives with the first one."""
    h = random_symmetric(6, seed=7)
    weight = torch.nn.Parameter(torch.randn(2, 2, dtype=F64, generator=_gen(1)))
    bias = torch.nn.Parameter(torch.randn(2, dtype=F64, generator=_gen(2)))
    opt = PSGD([weight, bias], lr=0.0, momentum=0.0, preconditioner="dense", curvature="hvp", **FIT_OPTIONS)

    def loss() -> torch.Tensor:
        flat = torch.cat([weight.reshape(-1), bias])
        return 0.5 * flat @ h @ flat

    for _ in range(1500):
        opt.step(loss)
    assert set(opt.state) == {weight} and opt.state[weight]["Q"].shape == (6, 6)
    assert relative_identity_error(_preconditioner_matrix(opt) @ h) < 1e-3


@pytest.mark.parametrize("preconditioner", ["dense", "lra", "xmat"])
def test_guard_and_weight_decay_act_on_the_whole_block(preconditioner: str) -> None:
    """The update guard caps the RMS of the whole group's update (not of each tensor); decoupled
    weight decay and momentum apply as for the per-tensor families."""
    small = torch.nn.Parameter(torch.zeros(3))
    large = torch.nn.Parameter(torch.zeros(5))
    # precond_lr 1e-6: P stays ~I through the fit of the first step
    opt = PSGD(
        [small, large],
        lr=1.0,
        preconditioner=preconditioner,
        precond_init_scale=1.0,
        precond_lr=1e-6,
        max_update_rms=0.5,
        max_update_amplitude=None,
    )
    small.grad, large.grad = torch.full((3,), 1e-3), torch.full((5,), 1e6)
    opt.step()
    update = torch.cat([small.detach(), large.detach()])
    assert update.square().mean().sqrt().item() == pytest.approx(0.5, rel=1e-5)
    assert small.abs().max().item() < 1e-6  # per-tensor guarding would have scaled it to RMS 0.5
    assert opt.state[small]["momentum"].shape == (8,)

    decayed = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = PSGD([decayed], lr=0.1, weight_decay=0.5, preconditioner=preconditioner)
    decayed.grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(decayed.detach(), torch.full((4,), 2.0 * (1 - 0.1 * 0.5)))


@pytest.mark.parametrize("preconditioner", ["dense", "lra", "xmat"])
def test_non_finite_product_skips_the_block_step_exactly(preconditioner: str) -> None:
    x = torch.nn.Parameter(torch.tensor([-1.0, 1.0, 0.5], dtype=F64))
    y = torch.nn.Parameter(torch.tensor([0.3, 0.2], dtype=F64))
    opt = PSGD([x, y], lr=0.1, preconditioner=preconditioner, curvature="hvp", precond_update_prob=1.0)
    opt.step(lambda: rosenbrock(torch.cat([x, y])))
    counters = ("skipped_steps", "rejected_fits")
    kept = [k for k, t in opt.state[x].items() if isinstance(t, torch.Tensor) and k not in counters]
    before = [t.clone() for t in (x.detach(), y.detach(), *(opt.state[x][k] for k in kept))]
    opt.zero_grad()
    rosenbrock(torch.cat([x, y])).backward(create_graph=True)
    opt.accumulate_hvp({y: torch.full((2,), math.nan, dtype=F64)})
    opt.step()
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.statistics()
    after = [t for t in (x.detach(), y.detach(), *(opt.state[x][k] for k in kept))]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt.state[x]["skipped_steps"] == 1 and opt.state[x]["rejected_fits"] == 1


def test_dense_refuses_groups_above_max_dense_size_and_says_how_to_raise_it() -> None:
    x = torch.nn.Parameter(torch.zeros(30))
    opt = PSGD([x], preconditioner="dense", max_dense_size=20)
    x.grad = torch.ones(30)
    with pytest.raises(ValueError, match=r"n=30 .*max_dense_size=20.*max_dense_size=30"):
        opt.step()
    opt = PSGD([x], preconditioner="dense", max_dense_size=30)
    opt.step()
    assert opt.state[x]["Q"].shape == (30, 30)
