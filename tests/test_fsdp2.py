"""PSGD on FSDP2 (``fully_shard``) parameters: equivalence with one process, checkpoints through
``torch.distributed.checkpoint`` and Accelerate, Accelerate's parameter swap, the refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from hf_psgd import PSGD

LAUNCH = Path(__file__).parent / "launch"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


def _relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||got - want|| / ||want||."""
    return max(((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)).item() for k in want)


def _torchrun(processes: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    result = subprocess.run([*command, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_two_processes_match_one_resume_across_world_sizes_and_skip_together(tmp_path: Path) -> None:
    script = str(LAUNCH / "fsdp2_training.py")
    _torchrun(2, script, str(tmp_path))
    _torchrun(1, script, str(tmp_path), "resume")
    _torchrun(2, script, str(tmp_path), "resume")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["world"] == 2
    for run, tolerance in (("kron", 1e-5), ("diag", 1e-5), ("lra", 1e-5), ("kron_bf16", 2e-2)):
        results = [rank[run] for rank in ranks]
        for name, value in results[0]["params"].items():
            assert torch.equal(value, results[1]["params"][name]), (run, name)  # every rank the same weights
        assert _relative_difference(results[0]["params"], results[0]["one_process"]) <= tolerance, run
        total, largest = results[0]["one_process_state_bytes"], results[0]["largest_block_bytes"]
        for result in results:
            assert result["state_bytes"] <= total / 2 + largest, run
            assert result["sent_bytes"] <= 2 * result["shard_bytes"], run
        assert sum(result["state_bytes"] for result in results) == total, run  # every block on one owner
    assert ranks[0]["kron"]["owners"] == [0, 1]
    for rank in ranks:  # a NaN gradient shard on rank 1 only: every rank skipped, nothing moved
        assert rank["nan"]["unchanged"] and set(rank["nan"]["skipped"]) == {1}
    resumed = torch.load(tmp_path / "resumed_in_1_rank0.pt", weights_only=True)
    assert set(resumed["initialised_steps"]) == {0}  # DCP's initialisation step advanced nothing
    for run in ("kron", "diag"):  # saved by 2 processes (DCP; Accelerate's save_fsdp_optimizer), resumed by 1
        assert _relative_difference(resumed[run], ranks[0][run]["params"]) <= 1e-5, run
    for rank in (0, 1):  # saved by 1 process, resumed by 2
        two = torch.load(tmp_path / f"resumed_in_2_rank{rank}.pt", weights_only=True)
        assert _relative_difference(two["kron"], ranks[0]["kron"]["params"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
def test_readme_fsdp2_commands_train_save_and_resume_in_one_process(tmp_path: Path) -> None:
    script = str(Path(__file__).resolve().parents[1] / "scripts" / "train_fsdp2.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
    two = subprocess.run(
        [*command, "2", script, "--steps", "10", "--out", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    assert "step 10: loss" in two.stdout and "(2 processes)" in two.stdout
    one = subprocess.run(
        [*command, "1", script, "--steps", "20", "--out", str(tmp_path), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    assert "step 10:" not in one.stdout and "step 20: loss" in one.stdout and "(1 processes)" in one.stdout


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))


def _train(model: nn.Module, optimizer: PSGD, steps: int = 6) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        optimizer.step()


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("preconditioner", ["kron", "xmat"])
def test_optimizer_keeps_working_when_accelerate_swaps_in_fsdp2_parameters(preconditioner: str) -> None:
    """Accelerate's ``prepare`` builds the optimizer on plain parameters, shards the model and swaps
    the ``DTensor`` parameters into ``param_groups`` (``fsdp2_switch_optimizer_parameters``), then
    round-trips the state dict; training then matches an unsharded PSGD."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    reference = _mlp()
    reference_opt = PSGD(reference.parameters(), preconditioner=preconditioner, lr=0.02)
    model = _mlp()
    optimizer = PSGD(model.parameters(), preconditioner=preconditioner, lr=0.02)
    old = dict(model.named_parameters())
    fully_shard(model)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(optimizer, {old[name].data_ptr: new[name] for name in old})
    optimizer.load_state_dict(optimizer.state_dict())  # what AcceleratedOptimizer does
    assert all(isinstance(p, DTensor) for p in optimizer.param_groups[0]["params"])
    _train(reference, reference_opt)
    _train(model, optimizer)
    assert type(optimizer._distribution).__name__ == "FullyShardedOwners"
    got = {name: p.full_tensor() for name, p in model.named_parameters()}
    want = {name: p.detach() for name, p in reference.named_parameters()}
    assert _relative_difference(got, want) <= 1e-6


def _dtensor_parameter(placements: list, mesh_shape: tuple[int, ...] = (1,)) -> nn.Parameter:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    return nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, placements))


@pytest.mark.usefixtures("process_group")
def test_unsupported_sharding_is_refused_at_construction_saying_what_works() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    with pytest.raises(ValueError, match=r"placements \(Replicate\(\),\).*tensor parallelism"):
        PSGD([_dtensor_parameter([Replicate()])])
    with pytest.raises(ValueError, match=r"placements \(Shard\(dim=1\),\)"):
        PSGD([_dtensor_parameter([Shard(1)])])
    with pytest.raises(ValueError, match=r"mesh of shape \(1, 1\).*HSDP"):
        PSGD([_dtensor_parameter([Replicate(), Shard(0)], (1, 1))])
    model = _mlp()
    fully_shard(model)
    for options, name in (
        ({"curvature": "hvp"}, "curvature='hvp'"),
        ({"curvature": "fd"}, "curvature='fd'"),
        ({"curvature": "hvp", "secant_pairs": True}, "curvature='hvp'"),
    ):
        with pytest.raises(ValueError, match=f"{name} is not supported with FSDP2.*curvature='whiten'"):
            PSGD(model.parameters(), **options)
    with pytest.raises(ValueError, match="shard_preconditioners=False is invalid with FSDP2"):
        PSGD(model.parameters(), shard_preconditioners=False)
    with pytest.raises(ValueError, match="plain ones in one optimizer"):
        PSGD([*model.parameters(), nn.Parameter(torch.randn(3))])


def test_deepspeed_zero_partitions_are_refused() -> None:
    partition = nn.Parameter(torch.randn(10))
    partition.ds_id = 0  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO.*FSDP2.*DDP"):
        PSGD([partition])


@pytest.mark.parametrize("curvature", ["whiten", "hvp"])
def test_checkpoint_initialisation_step_changes_nothing(curvature: str) -> None:
    """``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` creates a missing state by a
    ``step()`` with lr 0 and zero gradients: PSGD makes the state, advances no counter, fits nothing
    and raises nothing (``hvp`` has no graph there)."""
    model = _mlp()
    optimizer = PSGD(model.parameters(), curvature=curvature, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    state = get_optimizer_state_dict(model, optimizer)
    assert len(state["state"]) == 4 and optimizer.param_groups[0]["lr"] == 0.1
    for value in state["state"].values():
        assert value["step"] == value["skipped_steps"] == value["precond_updates"] == 0
        assert value["scale_pending"] and not value["momentum"].any()
    assert all(torch.equal(p, old) for p, old in zip(model.parameters(), before))
    set_optimizer_state_dict(model, optimizer, state)
    x = torch.randn(8, 6)

    def closure() -> torch.Tensor:
        loss = model(x).square().mean()
        if curvature == "whiten":  # PSGD differentiates the loss itself only for H v
            optimizer.zero_grad()
            loss.backward()
        return loss

    optimizer.step(closure)
    assert {value["step"] for value in optimizer.state.values()} == {1}


def test_a_checkpoint_without_an_owned_preconditioner_is_refused() -> None:
    """A block this process owns whose saved state holds only counters (saved by a process that did
    not own it, e.g. rank 0's alone under FSDP2) is refused, not resumed from scratch silently."""
    model = _mlp()
    optimizer = PSGD(model.parameters())
    _train(model, optimizer, steps=2)
    saved = optimizer.state_dict()
    saved["state"][0] = {key: saved["state"][0][key] for key in ("step", "skipped_steps", "update_credit")}
    with pytest.raises(ValueError, match="state of parameter 0 holds only update counters.*consolidate_state_dict"):
        PSGD(_mlp().parameters()).load_state_dict(saved)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"deepspeed": "ds_config.json"}, "does not run under DeepSpeed.*FSDP2.*DDP"),
        ({"fsdp": True, "fsdp_config": {"version": 1}}, "version=1: FSDP1 flattens.*version 2"),
        ({"fsdp": True, "optim_args": "curvature=hvp"}, "curvature=hvp is not supported with fsdp.*curvature=whiten"),
    ],
)
def test_training_arguments_refuse_what_psgd_cannot_shard(tmp_path: Path, settings: dict, message: str) -> None:
    from hf_psgd import PSGDTrainingArguments

    with pytest.raises(ValueError, match=message):
        PSGDTrainingArguments(output_dir=str(tmp_path), optim="psgd_kron", use_cpu=True, **settings)
    arguments = PSGDTrainingArguments(output_dir=str(tmp_path), optim="psgd_kron", use_cpu=True, fsdp=True)
    assert arguments.fsdp  # FSDP2 with whitening: accepted


def test_trainer_gathers_the_state_before_saving_unless_fsdp_saves_it_sharded() -> None:
    """``PSGDTrainer`` consolidates the preconditioners before a save where one process writes the
    whole state (no FSDP; FSDP's ``FULL_STATE_DICT``), and not where every process writes its own."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_psgd.integrations.trainer import saves_sharded

    assert not saves_sharded(None)
    for state_dict_type, sharded in (("SHARDED_STATE_DICT", True), ("FULL_STATE_DICT", False)):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
        assert saves_sharded(plugin) is sharded
