"""``step()`` with the default options never synchronises with the host after a block's first fit
(whose initial scale is read once, by design): counted on the CPU by a ``TorchDispatchMode`` that
sees every ``_local_scalar_dense`` (``.item()``, ``bool()``, ``float()``, a tensor-valued ``if``)
and ``nonzero``, plus ``Tensor.tolist``, which bypasses the dispatcher."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import TinyTransformer, copy_task_batch, lm_loss
from torch.utils._python_dispatch import TorchDispatchMode

from hf_psgd import PSGD

aten = torch.ops.aten


class HostSyncs(TorchDispatchMode):
    """Records the dispatcher calls that wait for a tensor's value on the host."""

    SYNCING = (aten._local_scalar_dense.default, aten.nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    with HostSyncs() as mode:
        tolist = torch.Tensor.tolist

        def counted_tolist(self: torch.Tensor):
            mode.calls.append("Tensor.tolist")
            return tolist(self)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        yield mode.calls
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)


def test_the_counter_sees_each_kind_of_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(3)
    with counting_host_syncs(monkeypatch) as calls:
        x.sum().item()
        bool(x.any())
        float(x[0])
        x.nonzero()
        x.tolist()
        if x.all():
            pass
    assert len(calls) == 6, calls


@pytest.mark.parametrize(
    "options",
    [
        {},  # the defaults: Kron, whitening, the update schedule, the guard
        {"precond_update_prob": 1.0, "weight_decay": 0.1},  # a fit on every step
        {"precond_update_prob": 1.0, "fit": "pro4p"},  # its Procrustes steps: a fixed number, no loop to exit
        {"preconditioner": "diag", "precond_update_prob": 1.0},
        {"preconditioner": "xmat", "precond_update_prob": 1.0},
        {"curvature": "hvp", "precond_update_prob": 1.0},  # exact H v from a closure
        {"curvature": "fd", "preconditioner": "lra", "precond_update_prob": 1.0},
    ],
)
def test_step_has_no_host_sync_after_the_first_fit(
    monkeypatch: pytest.MonkeyPatch, options: dict, device: torch.device
) -> None:
    torch.manual_seed(0)
    model = TinyTransformer().to(device)
    optimizer = PSGD(model.parameters(), **options)
    generator = torch.Generator().manual_seed(0)
    whiten = options.get("curvature", "whiten") == "whiten"

    def step() -> None:
        batch = copy_task_batch(generator).to(device)
        if whiten:
            optimizer.zero_grad()
            lm_loss(model, batch).backward()
            optimizer.step()
        else:
            optimizer.step(lambda: lm_loss(model, batch))

    step()  # every block's first fit: its initial scale is read on the host, once
    with counting_host_syncs(monkeypatch) as calls:
        for _ in range(6):
            step()
        assert calls == []
    assert sum(state["precond_updates"] for state in optimizer.state.values()) > len(optimizer.state)


def test_a_non_finite_step_is_masked_without_a_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = PSGD(model.parameters(), precond_update_prob=1.0)
    batch = copy_task_batch(torch.Generator().manual_seed(0))
    lm_loss(model, batch).backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    lm_loss(model, batch).backward()
    model.proj.weight.grad[1, 2] = float("nan")
    with counting_host_syncs(monkeypatch) as calls:
        optimizer.step()
    assert calls == []
    assert all(torch.equal(p, old) for p, old in zip(model.parameters(), before))
    assert {int(state["skipped_steps"]) for state in optimizer.state.values()} == {1}
