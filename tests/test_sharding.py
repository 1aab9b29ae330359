"""Sharded preconditioners: ownership, the sharded state dict, FSDP rejection (in-process, with a
one-process gloo group), and equivalence with a single process (two processes: torchrun and
``accelerate launch``)."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyTransformer, copy_task_batch, lm_loss
from test_multiprocess import LAUNCHER
from torch import nn

from hf_psgd import PSGD
from hf_psgd.distributed import assign_owners

LAUNCH = Path(__file__).parent / "launch"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- ownership


def test_owners_balance_work_and_size_within_memory_deterministically() -> None:
    memory = [100.0, 1.0, 1.0, 50.0, 50.0, 1.0]
    flops = [1000.0, 10.0, 10.0, 500.0, 500.0, 10.0]
    numels = [10.0, 1.0, 1.0, 5.0, 5.0, 1.0]
    owners = assign_owners(memory, flops, numels, world_size=2)
    assert owners == assign_owners(memory, flops, numels, world_size=2)
    assert owners[0] != owners[3] == owners[4]  # the big block alone, the two halves together
    load = [sum(m for m, r in zip(memory, owners) if r == rank) for rank in (0, 1)]
    assert max(load) <= sum(memory) / 2 + max(memory)
    assert assign_owners(memory, flops, numels, world_size=1) == [0] * 6
    assert sorted(set(assign_owners([1.0] * 8, [1.0] * 8, [1.0] * 8, world_size=4))) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="one of each per block"):
        assign_owners([1.0], [1.0, 2.0], [1.0], world_size=2)


def test_no_owner_holds_more_memory_than_its_share_plus_the_largest_block() -> None:
    """Blocks heavy in memory but light in FLOPs (Kron's diagonal-dense mixes) once put 110 of 115 memory units
    on one of two ranks under the combined cost alone; random instances hold the bound too."""
    memory, flops, numels = [10.0, 5.0, 50.0, 50.0], [10.0, 1000.0, 1.0, 1.0], [9.0, 9.0, 3.0, 3.0]
    rng = random.Random(0)
    instances = [(memory, flops, numels, 2)]
    for _ in range(300):
        n = rng.randint(1, 12)
        draw = [[rng.choice(choices) * 1.0 for _ in range(n)] for choices in ([1, 5, 50], [1, 100, 1000], [1, 9])]
        instances.append((*draw, rng.randint(1, 5)))
    for memory, flops, numels, world_size in instances:
        owners = assign_owners(memory, flops, numels, world_size)
        held = [sum(m for m, owner in zip(memory, owners) if owner == rank) for rank in range(world_size)]
        assert max(held) <= sum(memory) / world_size + max(memory)


def test_memory_bounds_the_owners_but_does_not_unbalance_their_work() -> None:
    """A block heavy in memory and light in FLOPs (an embedding with a diagonal factor) once counted as a
    rank's full share of work under a cost that summed memory too: its rank got 1 of 41 FLOPs."""
    memory, flops, numels = [100.0, 1.0, 1.0, 1.0, 1.0], [1.0, 10.0, 10.0, 10.0, 10.0], [1.0] * 5
    owners = assign_owners(memory, flops, numels, world_size=2)
    work = [sum(f for f, owner in zip(flops, owners) if owner == rank) for rank in (0, 1)]
    assert abs(work[0] - work[1]) <= max(flops)


@pytest.mark.parametrize("world_size", [0, -1])
def test_owners_reject_bad_world_size(world_size: int) -> None:
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([1.0], [1.0], [1.0], world_size)


# ----------------------------------------------------------------------------- one-process group


def _train(model: nn.Module, opt: PSGD, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = copy_task_batch(gen)
        opt.step(lambda tokens=tokens: lm_loss(model, tokens))


def test_shard_preconditioners_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="shard_preconditioners=True"):
        PSGD(nn.Linear(2, 2).parameters(), shard_preconditioners=True)
    with pytest.raises(ValueError, match="shard_preconditioners='yes'"):
        PSGD(nn.Linear(2, 2).parameters(), shard_preconditioners="yes")
    assert PSGD(nn.Linear(2, 2).parameters())._distribution.world_size == 1  # automatic: off without processes


@pytest.mark.usefixtures("process_group")
def test_sharded_state_dict_gathers_itself_and_equals_the_unsharded_one() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    twin = copy.deepcopy(model)
    sharded = PSGD(model.parameters(), lr=0.02, curvature="hvp", shard_preconditioners=True)
    plain = PSGD(twin.parameters(), lr=0.02, curvature="hvp", shard_preconditioners=False)
    assert sharded.state_dict()["state"] == {}  # nothing sharded yet: Accelerate's prepare calls this
    _train(model, sharded, 3)
    _train(twin, plain, 3)
    full, reference = sharded.state_dict(), plain.state_dict()  # a collective: no extra call needed
    assert full["param_groups"] == reference["param_groups"]
    _assert_identical(full["state"], reference["state"])
    sharded.consolidate_state_dict()  # gathered once for a save on one process (PSGDTrainer)
    sharded.param_groups[0]["lr"] = 0.5  # a scheduler between the gather and the save
    assert sharded.state_dict()["param_groups"][0]["lr"] == 0.5
    _assert_identical(sharded.state_dict()["state"], reference["state"])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _assert_identical(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _assert_identical(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_identical(a, b)
    else:
        assert got == want


@pytest.mark.usefixtures("process_group")
def test_exchange_packs_owner_updates_in_the_communication_dtype() -> None:
    from hf_psgd.distributed import DataParallelOwners

    sharding = DataParallelOwners(None, torch.bfloat16)
    updates = {0: torch.randn(3, 4), 1: torch.randn(5)}
    shared = sharding.exchange_flat([12, 5], [0, 0], updates)
    assert sharding.last_shard_numel == 17
    for index, update in updates.items():
        assert shared[index].dtype == torch.bfloat16
        assert torch.equal(shared[index], update.reshape(-1).to(torch.bfloat16))


@pytest.mark.usefixtures("process_group")
def test_communication_dtype_rounds_the_applied_update() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="communication_dtype='int8'"):
        PSGD(layer.parameters(), shard_preconditioners=True, communication_dtype="int8")
    twin = copy.deepcopy(layer)
    fp32 = {"lr": 1.0, "apply_dtype": "float32"}  # updates computed in fp32, rounded only by the exchange
    rounded = PSGD(layer.parameters(), shard_preconditioners=True, communication_dtype=torch.bfloat16, **fp32)
    exact = PSGD(twin.parameters(), shard_preconditioners=False, **fp32)
    before = [p.detach().clone() for p in layer.parameters()]
    inputs = torch.randn(4, 8)
    for module, opt in ((layer, rounded), (twin, exact)):
        module(inputs).square().sum().backward()
        opt.step()
    for p, q, old in zip(layer.parameters(), twin.parameters(), before):
        exact_update = old - q.detach()
        assert not torch.equal(p, q)
        assert torch.allclose(old - p.detach(), exact_update, rtol=2**-8, atol=1e-7)


@pytest.mark.usefixtures("process_group")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_flattened_parameters_are_rejected_with_alternatives(use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Linear(4, 4), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    with pytest.raises(ValueError, match="flattened by FSDP.*FSDP2.*DDP"):
        PSGD(model.parameters())


# ----------------------------------------------------------------------------- two processes


def _rank_results(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||got - want|| / ||want||."""
    return max(((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)).item() for k in want)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("options", "tolerance"),
    [
        ("preconditioner=kron,curvature=whiten,apply_dtype=float32", 1e-5),
        ("preconditioner=kron,curvature=whiten", 5e-3),  # bf16 products: batches of other sizes round otherwise
        ("preconditioner=kron,curvature=hvp,apply_dtype=float32", 1e-5),
        ("preconditioner=kron,curvature=hvp,secant_pairs=true,apply_dtype=float32", 1e-5),
        ("preconditioner=diag,curvature=whiten", 1e-5),
        ("preconditioner=lra,curvature=hvp", 1e-5),
        ("preconditioner=xmat,curvature=whiten,max_update_amplitude=0.05", 1e-5),  # every whitened step clipped
    ],
)
def test_two_sharded_processes_match_one_and_resume_across_world_sizes(
    tmp_path: Path, options: str, tolerance: float
) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += [str(LAUNCH / "sharded_equivalence.py"), str(tmp_path), options]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = _rank_results(tmp_path)
    for run in ("sharded", "two_to_one", "one_to_two"):
        for name, value in ranks[0][run].items():
            assert torch.equal(value, ranks[1][run][name]), (run, name)  # ranks stay bit-identical
        difference = _relative_difference(ranks[0][run], ranks[0]["single"])
        assert difference <= tolerance, (run, difference)
    total = sum(ranks[0]["all_preconditioner_bytes"])
    largest = max(ranks[0]["all_preconditioner_bytes"])
    for rank in ranks:
        assert rank["rank_preconditioner_bytes"] <= total / 2 + largest
    if "whiten" in options or "apply_dtype" in options:  # a NaN on rank 1 only: both skip, state untouched (the
        # growth cap's history too, with H v); state_dict() on rank 0 only: an error, no hang
        assert ranks[0]["nan_skipped_everywhere"] and ranks[1]["nan_skipped_everywhere"]
        assert "every process must call" in ranks[0]["one_rank_state_dict_error"]
    if "max_update_amplitude" in options:  # the owner clipped both good steps and did not count the masked one
        assert sum(rank["clipped_updates"] for rank in ranks) == 2
    if "kron" in options or "diag" in options:
        assert ranks[0]["owners"] == [0, 1]  # both ranks own preconditioners
        assert max(r["rank_preconditioner_bytes"] for r in ranks) < total


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("optim_args", ["curvature=whiten", "curvature=hvp,precond_update_prob=0.5"])
def test_trainer_checkpoints_resume_from_two_processes_to_one_and_back(tmp_path: Path, optim_args: str) -> None:
    script = str(LAUNCH / "trainer_checkpoint.py")

    def run(out: Path, processes: int, checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
        out.mkdir()
        command = [*LAUNCHER, script] if processes == 2 else [sys.executable, script]
        command += [str(out), optim_args] + ([str(checkpoint)] if checkpoint else [])
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return torch.load(out / "final.pt", weights_only=True)

    two = run(tmp_path / "two", 2)
    assert _relative_difference(run(tmp_path / "two_then_one", 1, tmp_path / "two/run/checkpoint-3"), two) <= 1e-5
    one = run(tmp_path / "one", 1)
    assert _relative_difference(run(tmp_path / "one_then_two", 2, tmp_path / "one/run/checkpoint-3"), one) <= 1e-5


@pytest.mark.usefixtures("process_group")
def test_blocks_keep_their_owner_when_param_groups_are_added() -> None:
    first, second = nn.Linear(8, 8), nn.Linear(6, 6)
    opt = PSGD(first.parameters(), shard_preconditioners=True)
    opt._distribution.world_size = 3  # ownership only: pretend three ranks
    opt.statistics()  # assigns the owners
    before = dict(opt._distribution.owners)
    opt.add_param_group({"params": list(second.parameters())})
    opt.statistics()
    after = opt._distribution.owners
    assert all(after[p] == rank for p, rank in before.items())
    assert set(after) == set(first.parameters()) | set(second.parameters())


@pytest.mark.usefixtures("process_group")
def test_non_finite_gradient_skips_a_sharded_step_without_touching_state() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    opt = PSGD(layer.parameters(), lr=0.1, shard_preconditioners=True)
    for _ in range(2):
        layer(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    opt.consolidate_state_dict()
    state, params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(3, 4)).square().sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    opt.step()
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.statistics()
    opt.consolidate_state_dict()
    skipped = opt.state_dict()
    for p, old in zip(layer.parameters(), params):
        assert torch.equal(p, old)
    counters = ("skipped_steps", "step", "update_credit", "precond_updates", "rejected_fits", "clipped_updates")
    for index, entry in state["state"].items():
        assert skipped["state"][index]["skipped_steps"] == entry["skipped_steps"] + 1
        assert skipped["state"][index]["step"] == entry["step"] + 1  # the schedule moves on
        _assert_identical(
            {k: v for k, v in skipped["state"][index].items() if k not in counters},
            {k: v for k, v in entry.items() if k not in counters},
        )
