"""Kron's factor shapes: which dims get dense factors (``max_skew``, ``always_dense_size``), tensors of
more than two dims merged to a matrix (``merge_dims``), the dtype of its products (``apply_dtype``), and
states made under another rule."""

from __future__ import annotations

import pytest
import torch

from hf_psgd import PSGD
from hf_psgd.optim.preconditioners import kron


def _factor_shapes(shape: tuple[int, ...], **options: object) -> list[tuple[int, ...]]:
    x = torch.nn.Parameter(torch.zeros(shape))
    opt = PSGD([x], lr=0.0, precond_update_prob=1.0, **options)
    x.grad = torch.randn(shape)
    opt.step()
    return [tuple(q.shape) for q in opt.state[x]["Q"]]


@pytest.mark.parametrize(
    ("shape", "options", "expected"),
    [
        ((6, 40), {}, [(6, 6), (40, 40)]),  # both sides up to always_dense_size: dense
        ((6, 40), {"always_dense_size": 0}, [(6, 6), (40,)]),  # max_skew alone: the long side diagonal
        ((1000, 8), {}, [(1000,), (8, 8)]),  # 1000 > 512 and 1000^2 > 8000
        ((100,), {}, [(100,)]),  # vectors stay diagonal
        ((16, 6, 5, 5), {}, [(480, 480), (5, 5)]),  # merged as kron-torch does: (16*6*5, 5)
        ((4, 3, 50), {}, [(12, 12), (50, 50)]),  # (12, 50): 50 - 12 is less than 150 - 4 of (4, 150)
        ((50, 3, 4), {}, [(150, 150), (4, 4)]),  # (150, 4): 4 - 150 is less than 12 - 50 of (50, 12)
        ((16, 6, 5, 5), {"merge_dims": False}, [(16, 16), (6, 6), (5, 5), (5, 5)]),
        ((), {}, [(1,)]),
    ],
)
def test_factor_shapes(shape: tuple[int, ...], options: dict, expected: list[tuple[int, ...]]) -> None:
    assert _factor_shapes(shape, **options) == expected


def test_a_merged_tensor_is_preconditioned_as_its_matrix() -> None:
    """A (4, 3, 5) weight under ``merge_dims`` gets the preconditioner and updates of the (12, 5) matrix
    it is merged to, on the same gradients."""
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(4, 3, 5, generator=generator) * torch.linspace(0.1, 3, 5) for _ in range(30)]
    tensor = torch.nn.Parameter(torch.zeros(4, 3, 5))
    matrix = torch.nn.Parameter(torch.zeros(12, 5))
    runs = [(tensor, PSGD([tensor], lr=0.01, precond_update_prob=1.0)), (matrix, PSGD([matrix], lr=0.01))]
    runs[1][1].param_groups[0]["precond_update_prob"] = 1.0
    for g in gradients:
        for param, opt in runs:
            param.grad = g.reshape(param.shape)
            opt.step()
    torch.testing.assert_close(tensor.detach().reshape(12, 5), matrix.detach(), rtol=1e-6, atol=1e-9)
    for p_tensor, p_matrix in zip(runs[0][1].state[tensor]["P"], runs[1][1].state[matrix]["P"]):
        torch.testing.assert_close(p_tensor, p_matrix)


def test_a_state_made_under_the_old_factor_rule_loads_and_resumes_with_its_factors() -> None:
    """A checkpoint of hf_psgd 0.2 (a conv weight with four factors, a diagonal long side; its param
    groups without the new options) resumes under today's defaults exactly as under the old rule."""
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(8, 3, 3, 3, generator=generator) for _ in range(12)]
    old_rule = {"always_dense_size": 0, "merge_dims": False}
    x = torch.nn.Parameter(torch.zeros(8, 3, 3, 3))
    old = PSGD([x], lr=0.01, precond_update_prob=1.0, **old_rule)
    for g in gradients[:6]:
        x.grad = g
        old.step()
    saved = old.state_dict()
    for group in saved["param_groups"]:
        for key in old_rule:
            del group[key]
    y = torch.nn.Parameter(x.detach().clone())
    resumed = PSGD([y], lr=0.01, precond_update_prob=1.0)
    resumed.load_state_dict(saved)
    for g in gradients[6:]:
        x.grad, y.grad = g, g.clone()
        old.step()
        resumed.step()
    assert [tuple(q.shape) for q in resumed.state[y]["Q"]] == [(8, 8), (3, 3), (3, 3), (3, 3)]
    assert torch.equal(x, y)


def test_a_state_of_another_block_is_still_refused() -> None:
    x = torch.nn.Parameter(torch.zeros(6, 40))
    opt = PSGD([x], lr=0.0, precond_update_prob=1.0)
    x.grad = torch.randn(6, 40)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["Q"][1] = torch.ones(41)
    saved["state"][0]["P"][1] = torch.ones(41)
    with pytest.raises(ValueError, match=r"state of parameter 0: 'Q' has shape \[\(6, 6\), \(41,\)\]"):
        PSGD([torch.nn.Parameter(torch.zeros(6, 40))]).load_state_dict(saved)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("always_dense_size", -1),
        ("always_dense_size", 2.5),
        ("merge_dims", 1),
        ("apply_dtype", "int8"),
        ("fit_dtype", "half precision"),
    ],
)
def test_bad_factor_options_are_named(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        PSGD([torch.nn.Parameter(torch.zeros(2))], **{key: value})


@pytest.mark.parametrize(
    ("param_dtype", "apply_dtype", "fast_bf16", "cache_dtype"),
    [
        (torch.float32, None, True, torch.bfloat16),  # the default: bf16 products on fp32 factors ...
        (torch.float32, None, False, torch.float32),  # ... where they are native, else fp32 products
        (torch.float32, "float32", True, torch.float32),
        (torch.float32, "bfloat16", False, torch.bfloat16),  # asked for: bf16 products anyway
        (torch.bfloat16, None, True, torch.bfloat16),  # fp32 storage for bf16 parameters, bf16 products
        (torch.bfloat16, None, False, torch.float32),
        (torch.float64, None, True, torch.float64),  # float64 stays float64
    ],
)
def test_the_cache_and_the_update_take_the_apply_dtype(
    monkeypatch, param_dtype: torch.dtype, apply_dtype: str | None, fast_bf16: bool, cache_dtype: torch.dtype
) -> None:
    """``P`` is cached in the apply dtype (by default bf16 only where the device's bf16 products are native),
    ``Q`` stays in the storage dtype, and the update applied in bf16 products is that of fp32 products up to
    bf16 rounding."""
    monkeypatch.setattr(kron, "fast_bf16_products", lambda device: fast_bf16)
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(6, 5, generator=generator) for _ in range(4)]
    x = torch.nn.Parameter(torch.ones(6, 5, dtype=param_dtype))
    reference = torch.nn.Parameter(torch.ones(6, 5, dtype=torch.float64))
    opt = PSGD([x], lr=0.1, precond_update_prob=1.0, apply_dtype=apply_dtype)
    exact = PSGD([reference], lr=0.1, precond_update_prob=1.0)
    for g in gradients:
        x.grad, reference.grad = g.to(param_dtype), g.double()
        opt.step()
        exact.step()
    assert [p.dtype for p in opt.state[x]["P"]] == [cache_dtype, cache_dtype]
    assert opt.state[x]["Q"][0].dtype == (torch.float64 if param_dtype == torch.float64 else torch.float32)
    low = torch.bfloat16 in (param_dtype, cache_dtype)
    tolerance = 2e-2 if low else 1e-5
    torch.testing.assert_close(x.detach().double(), reference.detach(), rtol=tolerance, atol=tolerance)


def test_bf16_products_are_native_only_on_devices_that_have_them() -> None:
    """The CPU's answer is oneDNN's (AVX-512 or ARM bf16: native; AVX2: a reference kernel about 40x slower than
    fp32); a device torch cannot ask (``meta``) is not assumed to have them."""
    assert kron.fast_bf16_products(torch.device("cpu")) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not kron.fast_bf16_products(torch.device("meta"))


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_a_state_saved_with_other_products_loads_with_its_cache_in_the_new_dtype(monkeypatch, fast_bf16: bool) -> None:
    """A checkpoint of fp32 products (hf_psgd 0.3's, ``apply_dtype="float32"``, or a device without native bf16
    products) resumes under the default: ``Q`` exactly as saved, ``P`` in the dtype the default gives here (bf16
    where bf16 products are native)."""
    monkeypatch.setattr(kron, "fast_bf16_products", lambda device: fast_bf16)
    wanted = torch.bfloat16 if fast_bf16 else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.zeros(6, 5))
    saved_by = PSGD([x], lr=0.01, precond_update_prob=1.0, apply_dtype="float32")
    for _ in range(3):
        x.grad = torch.randn(6, 5, generator=generator)
        saved_by.step()
    saved = saved_by.state_dict()
    for group in saved["param_groups"]:
        del group["apply_dtype"]  # as 0.3 wrote them
    y = torch.nn.Parameter(x.detach().clone())
    resumed = PSGD([y], lr=0.01, precond_update_prob=1.0)
    resumed.load_state_dict(saved)
    state = resumed.state[y]
    assert all(torch.equal(q, old) for q, old in zip(state["Q"], saved_by.state[x]["Q"]))
    assert all(p.dtype == wanted for p in state["P"])
    assert all(torch.equal(p, old.to(wanted)) for p, old in zip(state["P"], saved_by.state[x]["P"]))
    y.grad = torch.randn(6, 5, generator=generator)
    resumed.step()
    assert all(p.dtype == wanted for p in state["P"]) and bool(y.isfinite().all())


def test_a_state_saved_with_bf16_products_loads_with_fp32_products_where_bf16_is_slow(monkeypatch) -> None:
    """A checkpoint from a device with native bf16 products (a GPU) resumed on one without (an AVX2 CPU): ``Q``
    as saved, the cached ``P`` in fp32, and the next steps as those of a state fitted there."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.zeros(6, 5))
    monkeypatch.setattr(kron, "fast_bf16_products", lambda device: True)
    saved_by = PSGD([x], lr=0.01, precond_update_prob=1.0)
    for _ in range(3):
        x.grad = torch.randn(6, 5, generator=generator)
        saved_by.step()
    assert all(p.dtype == torch.bfloat16 for p in saved_by.state[x]["P"])
    monkeypatch.setattr(kron, "fast_bf16_products", lambda device: False)
    y = torch.nn.Parameter(x.detach().clone())
    resumed = PSGD([y], lr=0.01, precond_update_prob=1.0)
    resumed.load_state_dict(saved_by.state_dict())
    state = resumed.state[y]
    assert all(torch.equal(q, old) for q, old in zip(state["Q"], saved_by.state[x]["Q"]))
    assert all(p.dtype == torch.float32 for p in state["P"])
    y.grad = torch.randn(6, 5, generator=generator)
    resumed.step()
    assert all(p.dtype == torch.float32 for p in state["P"]) and bool(y.isfinite().all())
