"""Bad input is refused where it is given, with one line that names the value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_psgd import PSGD

FAMILIES = ["kron", "diag", "lra", "xmat", "dense"]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("family", FAMILIES)
def test_complex_parameters_are_refused_with_the_real_view_as_the_way_out(family: str) -> None:
    with pytest.raises(ValueError) as error:
        PSGD([nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))], preconditioner=family)
    assert "complex" in _one_line(error) and "view_as_real" in str(error.value)


@pytest.mark.parametrize("name", ["lr", "weight_decay", "damping", "precond_init_scale", "max_update_rms"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_numbers_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name}={value!r} is invalid: expected .*finite"):
        PSGD([nn.Parameter(torch.zeros(3))], **{name: value})


@pytest.mark.parametrize(
    ("schedule", "key"),
    [
        ({"decay": math.nan}, "decay"),
        ({"flat_steps": math.nan}, "flat_steps"),
        ({"flat_steps": math.inf}, "flat_steps"),
        ({"decay": "abc"}, "decay"),
        ({"min_prob": None}, "min_prob"),
        (math.nan, "precond_update_prob"),
    ],
)
def test_bad_schedule_values_name_the_key(schedule, key: str) -> None:
    with pytest.raises(ValueError) as error:
        PSGD([nn.Parameter(torch.zeros(3))], precond_update_prob=schedule)
    message = _one_line(error)
    assert message.startswith("precond_update_prob") and key in message


@pytest.mark.parametrize("name", ["precond_dtype", "communication_dtype"])
def test_a_bad_dtype_is_named_under_its_own_option(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}=torch.int8 is invalid: expected None or one of"):
        PSGD([nn.Parameter(torch.zeros(3))], **{name: torch.int8})


def test_unknown_options_and_param_group_keys_are_refused_with_the_closest_name() -> None:
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=r"unknown option 'rnak' \(did you mean 'rank'\?\)"):
        PSGD([p], rnak=3)
    with pytest.raises(TypeError, match=r"unknown param group key 'lrr' \(did you mean 'lr'\?\)"):
        PSGD([{"params": [p], "lrr": 0.1}])
    with pytest.raises(ValueError, match=r"param group without 'params'"):
        PSGD([{"lr": 0.1}])


def test_a_parameter_listed_twice_is_refused() -> None:
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        PSGD([p, p])


def test_sparse_gradients_are_refused_in_one_line() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = PSGD(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as error:
        opt.step()
    assert "sparse" in _one_line(error) and "sparse=False" in str(error.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_parameter_without_gradient_never_moves_and_freezing_one_mid_run_works(family: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    first, last = model[0], model[2]
    opt = PSGD(model.parameters(), lr=0.05, weight_decay=0.1, preconditioner=family, precond_update_prob=1.0)
    x = torch.randn(16, 4)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()
    last.bias.grad = None  # an unused parameter: no gradient this step
    before = last.bias.detach().clone()
    moving = first.weight.detach().clone()
    opt.zero_grad()
    model(x).square().mean().backward()
    last.bias.grad = None
    opt.step()
    assert torch.equal(last.bias, before), "a parameter without gradient moved"
    assert not torch.equal(first.weight, moving)

    first.weight.requires_grad_(False)  # frozen mid-run
    frozen = first.weight.detach().clone()
    fits = [s.get("precond_updates", 0) for s in opt.state.values()]
    for _ in range(3):
        step()
    assert torch.equal(first.weight, frozen)
    assert all(p.isfinite().all() for p in model.parameters())
    refitted = [s.get("precond_updates", 0) for s in opt.state.values()]
    assert sum(refitted) > sum(fits) and all(a >= b for a, b in zip(refitted, fits)), "the fit restarted"


def _trained(model: nn.Module, **options) -> PSGD:
    opt = PSGD(model.parameters(), **options)
    model(torch.randn(8, model[0].in_features)).square().mean().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("family", FAMILIES)
def test_load_state_dict_checks_shapes_families_and_finiteness(family: str) -> None:
    torch.manual_seed(0)
    saved = _trained(nn.Sequential(nn.Linear(4, 3)), preconditioner=family).state_dict()
    other = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError) as error:
        PSGD(other.parameters(), preconditioner=family).load_state_dict(saved)
    assert "shape" in _one_line(error)

    other_family = "diag" if family != "diag" else "kron"  # param groups that do not match the state
    mismatched = {**saved, "param_groups": [{**g, "preconditioner": other_family} for g in saved["param_groups"]]}
    with pytest.raises(ValueError) as error:
        PSGD(nn.Sequential(nn.Linear(4, 3)).parameters(), preconditioner=family).load_state_dict(mismatched)
    assert f"preconditioner={other_family!r}" in _one_line(error)

    poisoned = {**saved, "state": {i: dict(s) for i, s in saved["state"].items()}}
    index = next(i for i, s in poisoned["state"].items() if "precond_updates" in s)
    key = next(k for k, v in poisoned["state"][index].items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    poisoned["state"][index][key] = torch.full_like(poisoned["state"][index][key], math.nan)
    with pytest.raises(ValueError) as error:
        PSGD(nn.Sequential(nn.Linear(4, 3)).parameters(), preconditioner=family).load_state_dict(poisoned)
    assert "finite" in _one_line(error)

    counters = {i: {k: s[k] for k in ("step", "skipped_steps", "update_credit")} for i, s in saved["state"].items()}
    partial = PSGD(nn.Sequential(nn.Linear(4, 3)).parameters(), preconditioner=family)
    with pytest.raises(ValueError) as error:  # what a non-owner keeps under sharding: not enough for an owner
        partial.load_state_dict({**saved, "state": counters})
    assert "holds only update counters" in _one_line(error)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_step_without_any_gradient_changes_nothing(family: str) -> None:
    layer = nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = PSGD(layer.parameters(), preconditioner=family)
    opt.step()  # before any backward: no gradient anywhere
    assert all(torch.equal(p, old) for p, old in zip(layer.parameters(), before))
    assert not opt.state


def test_a_refused_initialisation_leaves_no_half_made_state() -> None:
    p = nn.Parameter(torch.zeros(20))
    opt = PSGD([p], preconditioner="dense", max_dense_size=10)
    p.grad = torch.ones(20)
    with pytest.raises(ValueError, match="max_dense_size=10"):
        opt.step()
    opt.param_groups[0]["max_dense_size"] = 20
    opt.step()
    assert "momentum" in opt.state[p] and opt.state[p]["step"] == 1


def test_an_unknown_kron_fit_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"fit='q05' is invalid: expected one of \['eq', 'q0.5eq1.5', 'pro4p'\]"):
        PSGD([torch.nn.Parameter(torch.ones(2))], fit="q05")
