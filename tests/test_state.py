"""state_dict round trips, bitwise resume, weights_only loading, and the NaN / Inf / zero rules."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyTransformer, copy_task_batch, lm_loss

from hf_psgd import PSGD

SHORT_SCHEDULE = {"flat_steps": 3, "decay": 0.3, "min_prob": 0.2}


def _run(model: torch.nn.Module, opt: PSGD, curvature: str, steps: range) -> None:
    for step in steps:
        batch = copy_task_batch(torch.Generator().manual_seed(step)).to(next(model.parameters()).device)
        if curvature == "whiten":
            opt.zero_grad()
            lm_loss(model, batch).backward()
            opt.step()
        else:
            opt.step(lambda batch=batch: lm_loss(model, batch))


def _all_state_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _all_state_tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _all_state_tensors(v)]
    return []


@pytest.mark.parametrize(
    ("preconditioner", "curvature", "secant_pairs"),
    [
        ("kron", "whiten", False),
        ("kron", "hvp", False),
        ("kron", "hvp", True),
        ("diag", "whiten", False),
        ("diag", "fd", False),
        ("lra", "hvp", False),
        ("xmat", "whiten", False),
        ("dense", "fd", False),
        ("dense", "fd", True),
    ],
)
def test_resume_from_saved_state_is_bitwise_identical(
    tmp_path, preconditioner: str, curvature: str, secant_pairs: bool, device: torch.device
) -> None:
    """Train 10 steps; or train 5, save to disk, load (weights_only=True) into fresh objects and
    train 5 more: the parameters must be bit-identical, probes and update decisions included."""
    torch.manual_seed(0)
    reference = TinyTransformer().to(device)
    resumed = copy.deepcopy(reference)
    options = dict(
        lr=3e-3,
        preconditioner=preconditioner,
        curvature=curvature,
        precond_update_prob=SHORT_SCHEDULE,
        secant_pairs=secant_pairs,
    )

    opt = PSGD(reference.parameters(), **options)
    _run(reference, opt, curvature, range(10))

    first = PSGD(resumed.parameters(), **options)
    _run(resumed, first, curvature, range(5))
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, tmp_path / "ckpt.pt")
    del first, resumed

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored = TinyTransformer().to(device)
    restored.load_state_dict(checkpoint["model"])
    second = PSGD(restored.parameters(), **options)
    second.load_state_dict(checkpoint["optimizer"])
    _run(restored, second, curvature, range(5, 10))

    for a, b in zip(reference.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    # whole-vector families keep their state with the group's first parameter only
    assert [opt.state[p].get("precond_updates") for p in reference.parameters()] == [
        second.state[p].get("precond_updates") for p in restored.parameters()
    ]


def test_checkpoint_from_before_an_option_existed_resumes_with_its_saved_options() -> None:
    """A state dict whose param groups lack options added since (``fit``, ``max_skew``) loads; those
    take their defaults, the saved ones (an old default included) are kept, and training goes on exactly
    as the uninterrupted run."""
    x = torch.nn.Parameter(torch.randn(8, 5))
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 5, generator=gen) for _ in range(6)]
    reference, opt = x.detach().clone().requires_grad_(), PSGD([x], whiten_momentum=True, fit="q0.5eq1.5")
    twin = PSGD([reference], whiten_momentum=True, fit="q0.5eq1.5")
    for g in grads[:3]:
        x.grad, reference.grad = g.clone(), g.clone()
        opt.step(), twin.step()
    saved = copy.deepcopy(opt.state_dict())
    for key in ("fit", "max_skew"):
        del saved["param_groups"][0][key]
    old_state = saved["state"][0]  # 0.2.0 counted skips in an int and had no rejected_fits before a fit
    old_state["skipped_steps"] = int(old_state["skipped_steps"])
    rejected = int(old_state.pop("rejected_fits"))
    resumed = PSGD([x])
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert (group["fit"], group["max_skew"], group["whiten_momentum"]) == ("q0.5eq1.5", 1.0, True)
    for g in grads[3:]:
        x.grad, reference.grad = g.clone(), g.clone()
        resumed.step(), twin.step()
    assert torch.equal(x, reference)
    assert resumed.state[x]["skipped_steps"] == 0 and resumed.state[x]["rejected_fits"] == rejected


def test_state_dict_round_trip_preserves_values_and_dtypes() -> None:
    """A bf16 parameter keeps an fp32 preconditioner through load_state_dict (the base class
    would cast it to bf16), and a bf16 preconditioner option is honoured."""
    x = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    y = torch.nn.Parameter(torch.randn(5, 3))
    opt = PSGD([{"params": [x]}, {"params": [y], "precond_dtype": torch.bfloat16}])
    for _ in range(3):
        x.grad, y.grad = torch.randn_like(x), torch.randn_like(y)
        opt.step()
    assert opt.state[x]["Q"][0].dtype == torch.float32
    assert opt.state[x]["momentum"].dtype == torch.bfloat16
    assert opt.state[y]["Q"][0].dtype == torch.bfloat16
    assert opt.param_groups[1]["precond_dtype"] == "bfloat16"

    fresh = PSGD([{"params": [x]}, {"params": [y], "precond_dtype": "bfloat16"}])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in (x, y):
        saved, loaded = _all_state_tensors(opt.state[p]), _all_state_tensors(fresh.state[p])
        assert len(saved) == len(loaded) > 0
        for a, b in zip(saved, loaded):
            assert a.dtype == b.dtype and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert fresh.state[x]["step"] == 3


def test_state_lives_per_parameter_as_plain_data() -> None:
    model = TinyTransformer()
    opt = PSGD(model.parameters())
    lm_loss(model, copy_task_batch(torch.Generator().manual_seed(0))).backward()
    opt.step()
    allowed = (torch.Tensor, int, float, bool, list, dict)
    for param, state in opt.state.items():
        assert isinstance(param, torch.nn.Parameter)
        assert all(isinstance(v, allowed) for v in state.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["grad", "hvp"])
def test_non_finite_gradient_or_hvp_skips_the_step_exactly(bad: float, where: str) -> None:
    """A step with a non-finite gradient or H v is masked on the device: parameters, momentum,
    preconditioners and the secant pair stay exactly as they were; the step counters move on,
    ``skipped_steps`` and ``rejected_fits`` count it, and ``statistics()`` warns once."""
    torch.manual_seed(0)
    model = TinyTransformer()
    curvature = "hvp" if where == "hvp" else "whiten"
    opt = PSGD(model.parameters(), lr=1e-2, curvature=curvature, precond_update_prob=1.0, secant_pairs=where == "hvp")
    batch = copy_task_batch(torch.Generator().manual_seed(0))

    def good_step() -> None:
        opt.zero_grad()
        lm_loss(model, batch).backward(create_graph=where == "hvp")
        opt.step()

    good_step()
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())

    opt.zero_grad()
    lm_loss(model, batch).backward(create_graph=where == "hvp")
    if where == "grad":
        model.proj.weight.grad[0, 0] = bad
    else:
        opt.accumulate_hvp({model.proj.weight: torch.full_like(model.proj.weight, bad)})
    opt.step()
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        assert opt.statistics()["skipped_steps"] == 1

    for before, p in zip(params_before, model.parameters()):
        assert torch.equal(before, p)
    state_after = opt.state_dict()
    fits = 2 if where == "hvp" else 1  # with secant pairs: the probe's fit and the secant pair's
    counted = {"skipped_steps": 1, "rejected_fits": fits, "step": 1, "precond_updates": 1}
    for index, state in state_before["state"].items():
        after = state_after["state"][index]
        for key, added in counted.items():
            assert after[key] == state[key] + added, key
        kept = [key for key in state if key not in counted]
        for a, b in zip(_all_state_tensors([state[k] for k in kept]), _all_state_tensors([after[k] for k in kept])):
            assert torch.equal(a, b)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second skip is silent
        opt.zero_grad()
        lm_loss(model, batch).backward(create_graph=where == "hvp")
        next(model.parameters()).grad.fill_(float("nan"))
        opt.step()
        assert opt.statistics()["skipped_steps"] == 2
    good_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_gradients_on_first_step_do_not_produce_nans() -> None:
    """Auto init scale from an all-zero gradient would be infinite: it is deferred instead."""
    x = torch.nn.Parameter(torch.randn(4, 3))
    y = torch.nn.Parameter(torch.randn(7))
    opt = PSGD([{"params": [x]}, {"params": [y], "preconditioner": "diag"}], lr=0.1)
    x.grad, y.grad = torch.zeros(4, 3), torch.zeros(7)
    opt.step()
    assert opt.state[x]["scale_pending"] and opt.state[y]["scale_pending"]
    for _ in range(3):
        x.grad, y.grad = torch.randn(4, 3), torch.randn(7)
        opt.step()
    assert not opt.state[x]["scale_pending"] and not opt.state[y]["scale_pending"]
    for t in [x, y, *opt.state[x]["Q"], opt.state[y]["q"]]:
        assert torch.isfinite(t).all()
