"""The optimizer shell: arguments, param groups, schedules, closures, H v routes, guard, decay."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rosenbrock

from hf_psgd import PSGD, learning_rate_from_adamw
from hf_psgd.optim import CURVATURE_DEFAULTS
from hf_psgd.optim.preconditioners import kron
from hf_psgd.optim.schedules import DEFAULT_UPDATE_SCHEDULE, update_probability


def _param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("lr", -1.0, ">= 0"),
        ("momentum", 1.0, "[0, 1)"),
        ("weight_decay", -0.1, ">= 0"),
        ("curvature", "newton", "'whiten', 'hvp', 'fd'"),
        ("precond_lr", 0.0, "(0, 1]"),
        ("precond_lr", 1.5, "(0, 1]"),
        ("lipschitz_beta", 1.0, "[0, 1)"),
        ("precond_update_prob", 0.0, "(0, 1]"),
        ("precond_update_prob", {"flat": 3}, "unknown keys"),
        ("precond_update_prob", {"min_prob": 2.0}, "0 < min_prob <= 1"),
        ("precond_init_scale", 0.0, "None or a finite number > 0"),
        ("max_update_rms", -1.0, "None (no guard)"),
        ("damping", -1e-9, ">= 0"),
        ("whiten_momentum", "yes", "True or False"),
        ("secant_pairs", 1, "True or False"),
        ("precond_dtype", "int8", "float32"),
        ("max_dense_size", 2.5, "an int >= 0"),
        ("max_skew", -1, ">= 0"),
        ("rank", -1, "an int >= 0"),
        ("rank", 2.0, "an int >= 0"),
        ("seed", 1.5, "an int"),
    ],
)
def test_invalid_argument_names_argument_value_and_allowed(name: str, value, allowed: str) -> None:
    with pytest.raises(ValueError) as error:
        PSGD([_param(3)], **{name: value})
    message = str(error.value)
    assert name in message and repr(value) in message or name in message and "unknown keys" in message
    assert allowed in message


def test_secant_pairs_with_whitening_is_refused_with_the_curvatures_that_allow_it() -> None:
    expected = r"secant_pairs=True is invalid: expected False with curvature='whiten'.*'hvp'"
    with pytest.raises(ValueError, match=expected):
        PSGD([_param(3)], curvature="whiten", secant_pairs=True)
    PSGD([_param(3)], curvature="fd", secant_pairs=True)


def test_unknown_preconditioner_lists_known_families() -> None:
    with pytest.raises(
        ValueError, match=r"preconditioner='shampoo' is not a known family; choose one of .*'diag'.*'kron'"
    ):
        PSGD([_param(3)], preconditioner="shampoo")


def test_invalid_per_group_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="precond_lr=2.0"):
        PSGD([{"params": [_param(3)]}, {"params": [_param(2)], "precond_lr": 2.0}])


def test_param_groups_with_their_own_family_and_options() -> None:
    a, b = _param(4, 3), _param(5, seed=1)
    opt = PSGD([{"params": [a]}, {"params": [b], "preconditioner": "diag", "lr": 0.5}], lr=0.1)
    (a.sum() + (b * b).sum()).backward()
    opt.step()
    assert "Q" in opt.state[a] and "q" in opt.state[b]
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["precond_update_prob"] == DEFAULT_UPDATE_SCHEDULE


@pytest.mark.parametrize("curvature", ["whiten", "hvp", "fd"])
def test_step_returns_closure_loss_for_every_curvature(curvature: str) -> None:
    x = torch.nn.Parameter(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    opt = PSGD([x], curvature=curvature)

    def closure() -> torch.Tensor:
        loss = rosenbrock(x)
        if curvature == "whiten":  # the usual torch.optim closure; hvp / fd closures only return the loss
            opt.zero_grad()
            loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() == pytest.approx(4.0)
    assert x.grad is not None and not x.grad.requires_grad


def test_default_schedule_is_flat_then_decays_to_floor() -> None:
    assert update_probability(DEFAULT_UPDATE_SCHEDULE, 0) == 1.0
    assert update_probability(DEFAULT_UPDATE_SCHEDULE, 199) == 1.0
    assert update_probability(DEFAULT_UPDATE_SCHEDULE, 700) == pytest.approx(math.exp(-1.5))
    assert update_probability(DEFAULT_UPDATE_SCHEDULE, 1368) == pytest.approx(math.exp(-3.504))
    assert update_probability(DEFAULT_UPDATE_SCHEDULE, 1369) == 0.03
    assert update_probability(DEFAULT_UPDATE_SCHEDULE, 10_000) == 0.03
    assert update_probability(0.25, 7) == 0.25


def test_update_decisions_follow_the_probability_and_are_announced() -> None:
    """With p = 0.25 a block fits its preconditioner on steps 0, 4, 8, ... and
    will_update_preconditioner() says so beforehand."""
    x = _param(3, 2)
    opt = PSGD([x], precond_update_prob=0.25)
    announced, counts = [], []
    for _ in range(12):
        announced.append(opt.will_update_preconditioner())
        x.grad = torch.randn(3, 2)
        opt.step()
        counts.append(opt.state[x]["precond_updates"])
    assert announced == [i % 4 == 0 for i in range(12)]
    assert counts == [1 + i // 4 for i in range(12)]


def _quadratic(x: torch.Tensor) -> torch.Tensor:
    weights = torch.arange(1.0, x.numel() + 1, dtype=x.dtype).view_as(x)
    return (weights * x * x).sum() + (x.sum()) ** 2


def test_hvp_routes_closure_graph_and_handed_products_agree() -> None:
    """The same H v reaches the preconditioner whether PSGD differentiates a closure, reads a
    create_graph gradient, or gets the product handed over for the probes it announced."""
    finals = []
    for route in ("closure", "graph", "handed"):
        x = _param(4, 3)
        opt = PSGD([x], lr=0.05, curvature="hvp", precond_update_prob=0.5)
        for _ in range(6):
            if route == "closure":
                opt.step(lambda x=x: _quadratic(x))
                continue
            opt.zero_grad()
            needs_hvp = opt.will_update_preconditioner("hvp")
            if route == "graph":
                _quadratic(x).backward(create_graph=needs_hvp)
            else:
                (grad,) = torch.autograd.grad(_quadratic(x), [x], create_graph=needs_hvp)
                if needs_hvp:
                    probes = opt.hvp_probes()
                    (product,) = torch.autograd.grad(grad, [x], probes[x])
                    opt.accumulate_hvp({x: product})
                x.grad = grad.detach()
            opt.step()
        finals.append(x.detach().clone())
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(finals[2], finals[0], rtol=1e-6, atol=1e-7)


def test_hvp_without_graph_or_closure_says_what_to_do() -> None:
    x = _param(3)
    opt = PSGD([x], curvature="hvp")
    _quadratic(x).backward()
    with pytest.raises(RuntimeError, match=r"PSGDTrainer.*closure.*create_graph=True.*accumulate_hvp"):
        opt.step()


def test_fd_without_closure_says_what_to_do() -> None:
    x = _param(3)
    opt = PSGD([x], curvature="fd")
    _quadratic(x).backward()
    with pytest.raises(RuntimeError, match="curvature='fd' needs step\\(closure\\)"):
        opt.step()


def test_closure_that_calls_backward_with_hvp_is_explained() -> None:
    x = _param(3)
    opt = PSGD([x], curvature="hvp")

    def closure() -> torch.Tensor:
        loss = _quadratic(x)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must only return the loss"):
        opt.step(closure)


def test_fd_matches_hvp_and_restores_parameters_bitwise() -> None:
    """On a smooth problem the finite-difference fit follows the exact one closely, and the
    parameters seen after the step equal those of an hvp run (the perturbation was undone)."""
    finals = {}
    for curvature in ("hvp", "fd"):
        x = torch.nn.Parameter(torch.tensor([-1.0, 1.0, 0.5], dtype=torch.float64))
        opt = PSGD([x], lr=0.5, curvature=curvature, precond_update_prob=1.0, max_skew=math.inf)
        for _ in range(20):
            opt.step(lambda x=x: rosenbrock(x))
        finals[curvature] = (x.detach().clone(), opt.state[x]["P"][0].clone())
    torch.testing.assert_close(finals["fd"][0], finals["hvp"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(finals["fd"][1], finals["hvp"][1], rtol=1e-3, atol=1e-6)

    x = torch.nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float32))
    before = x.detach().clone()
    seen = []

    def closure() -> torch.Tensor:
        seen.append(x.detach().clone())
        return rosenbrock(x)

    opt = PSGD([x], lr=0.0, curvature="fd")
    opt.step(closure)
    assert len(seen) == 2 and not torch.equal(seen[1], before)
    assert torch.equal(x.detach(), before)


def test_update_guard_caps_update_rms_per_tensor_and_group() -> None:
    """Each tensor's update is capped at its group's ``max_update_rms``; a tensor below the cap, or in
    a group without the guard, moves exactly as with no guard at all."""

    def run(max_update_rms: float | None) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((10, 10), (4, 3), (6,))]
        groups = [{"params": params[:2], "max_update_rms": max_update_rms}, {"params": params[2:]}]
        opt = PSGD(
            groups, lr=1.0, momentum=0.0, precond_init_scale=1.0, precond_update_prob=1e-6, max_update_rms=None,
            adam_floor=None,
        )  # fmt: skip
        for p, value in zip(params, (1e6, 0.25, 1e6)):
            p.grad = torch.full(p.shape, value)
        opt.step()
        return [p.detach() for p in params]

    capped, small, free = run(0.5)
    unguarded = run(None)
    assert capped.square().mean().sqrt().item() == pytest.approx(0.5, rel=1e-5)
    assert unguarded[0].square().mean().sqrt().item() > 1e5
    assert torch.equal(small, unguarded[1]) and small.square().mean().sqrt().item() < 0.5
    assert torch.equal(free, unguarded[2])


def test_decoupled_weight_decay() -> None:
    x = torch.nn.Parameter(torch.full((3, 2), 2.0))
    opt = PSGD([x], lr=0.1, weight_decay=0.5)
    x.grad = torch.zeros(3, 2)
    opt.step()
    torch.testing.assert_close(x.detach(), torch.full((3, 2), 2.0 * (1 - 0.1 * 0.5)))


def test_statistics_report_fits_skips_probability_and_scale() -> None:
    x, y = _param(4, 3), _param(5, seed=1)
    opt = PSGD([{"params": [x]}, {"params": [y], "preconditioner": "diag"}], precond_update_prob=0.5)
    assert opt.statistics() == {
        "precond_updates": 0.0,
        "skipped_steps": 0.0,
        "update_prob": 0.0,
        "rejected_fits": 0.0,
        "clipped_updates": 0.0,
    }
    for _ in range(4):
        x.grad, y.grad = torch.randn(4, 3), torch.randn(5)
        opt.step()
    figures = opt.statistics()
    assert figures["precond_updates"] == 4.0 and figures["update_prob"] == 0.5 and figures["skipped_steps"] == 0.0
    kron_scale = torch.stack([(p.diagonal() if p.ndim == 2 else p).float().mean() for p in opt.state[x]["P"]]).prod()
    diag_scale = opt.state[y]["q"].square().mean()
    assert figures["precond_scale_min"] == pytest.approx(min(kron_scale, diag_scale).item())
    assert figures["precond_scale_max"] == pytest.approx(max(kron_scale, diag_scale).item())
    assert figures["precond_scale_median"] == pytest.approx(min(kron_scale, diag_scale).item())  # lower middle


def test_kron_with_bf16_storage_applies_its_factors_in_bf16() -> None:
    """``precond_dtype="bfloat16"``: the fit keeps the factors in bf16 and Kron applies the cached
    ``P_i`` with bf16 products; the result is ``P_0 G P_1`` of the stored factors to bf16 precision."""
    weight = _param(20, 20)
    opt = PSGD([weight], precond_dtype="bfloat16", precond_update_prob=1.0)
    for seed in range(3):
        weight.grad = torch.randn(20, 20, generator=torch.Generator().manual_seed(seed))
        opt.step()
    state = opt.state[weight]
    left, right = (p.float() for p in state["P"])
    assert state["Q"][0].dtype == torch.bfloat16 and left.ndim == right.ndim == 2
    g = torch.randn(20, 20, generator=torch.Generator().manual_seed(9))
    result = kron.Kron.precondition(state, g)
    expected = left @ g @ right
    assert result.dtype == torch.bfloat16
    assert ((result.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert not torch.equal(left, torch.eye(20) * left[0, 0])  # the fit moved P


def test_learning_rate_none_resolves_per_group_curvature_at_construction() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = PSGD([{"params": [a]}, {"params": [b], "curvature": "hvp"}])
    assert [g["lr"] for g in opt.param_groups] == [3e-3, 0.3]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert scheduler.get_last_lr() == [1.5e-3, 0.15]
    assert PSGD([a], lr=0.02, curvature="hvp").param_groups[0]["lr"] == 0.02
    with pytest.raises(ValueError, match=r"lr=-1.0 is invalid: expected None \(the curvature's default\)"):
        PSGD([a], lr=-1.0)


def test_learning_rate_from_adamw_doubles_whitening_rates_up_to_the_ceiling() -> None:
    """``min(2 a, 3e-3)`` with whitening; the Newton-type curvatures keep their own default whatever AdamW's."""
    assert [learning_rate_from_adamw(a) for a in (2e-5, 1e-3, 1.5e-3, 2e-3, 1e-2)] == [4e-5, 2e-3, 3e-3, 3e-3, 3e-3]
    assert learning_rate_from_adamw(1e-2, "hvp") == learning_rate_from_adamw(1e-5, "fd") == 0.3
    with pytest.raises(ValueError, match=r"adamw_lr=-0.001 is invalid: expected a finite number > 0"):
        learning_rate_from_adamw(-1e-3)
    with pytest.raises(ValueError, match=r"curvature='newton' is invalid: expected one of"):
        learning_rate_from_adamw(1e-3, "newton")


def test_fit_step_and_damping_none_resolve_per_group_curvature_at_construction() -> None:
    """``precond_lr`` and ``damping`` default per curvature like ``lr`` (whitening fits faster and undamped,
    Newton-type fits slower and damped); explicit values win; a loaded group keeps what it was saved with."""
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    groups = [{"params": [a]}, {"params": [b], "curvature": "hvp"}, {"params": [c], "curvature": "fd", "damping": 0.0}]
    opt = PSGD(groups, precond_lr=None)
    assert [(g["precond_lr"], g["damping"]) for g in opt.param_groups] == [(0.2, 1e-9), (0.1, 0.01), (0.1, 0.0)]
    assert CURVATURE_DEFAULTS["hvp"]["damping"] == opt.param_groups[1]["damping"]
    assert PSGD([a], precond_lr=0.05, curvature="hvp").param_groups[0]["precond_lr"] == 0.05
    saved = opt.state_dict()
    saved["param_groups"][0]["precond_lr"] = 0.1  # a checkpoint of 0.3, whose default was 0.1 everywhere
    restored = PSGD(groups)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["precond_lr"] == 0.1
    with pytest.raises(ValueError, match=r"damping=-1.0 is invalid: expected None \(the curvature's default\)"):
        PSGD([a], damping=-1.0)
