"""Run under ``torchrun --nproc_per_node 2`` (gloo on CPU): PSGD on a model sharded by FSDP2
(``fully_shard``) against one process on the same global batches.

Every rank trains a small MLP (dims chosen so that some shards are uneven) for 20 steps with FSDP2
and PSGD, and a plain copy on the whole batches with an unsharded PSGD. Configurations: Kron, Diag
and LRA whitening in fp32 (fp32 products: ``apply_dtype="float32"``), and Kron with a bf16
``MixedPrecisionPolicy`` (and the default bf16 products). After 10 steps the Kron run
saves through ``torch.distributed.checkpoint`` and the Diag run through Accelerate's
``save_fsdp_optimizer``; with the argument ``resume`` one process resumes both (and saves a Kron run
of its own), two processes resume that one. Then every rank steps with a NaN
gradient shard on rank 1 only (all must skip). Writes OUT/rank<r>.pt.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hf_psgd import PSGD
from hf_psgd.distributed import end_multiprocess_run

STEPS, HALF = 20, 10
OPTIONS = dict(lr=0.02, precond_update_prob=0.5, apply_dtype="float32")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)) for _ in range(STEPS)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).float() - y).square().mean()


def shard(model: nn.Module, policy: MixedPrecisionPolicy | None) -> nn.Module:
    kwargs = {"mp_policy": policy} if policy else {}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def block_bytes(state: dict) -> int:
    """Bytes of a block's state tensors (preconditioner and momentum; not the scalar counters)."""
    values = [t for value in state.values() for t in (value if isinstance(value, list) else [value])]
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor) and t.dim() > 0)


def run(preconditioner: str, policy: MixedPrecisionPolicy | None, out: Path, save: str | None) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    options = OPTIONS if policy is None else {**OPTIONS, "apply_dtype": None}
    reference = make_model()
    reference_opt = PSGD(reference.parameters(), preconditioner=preconditioner, shard_preconditioners=False, **options)
    model = shard(make_model(), policy)
    optimizer = PSGD(model.parameters(), preconditioner=preconditioner, **options)
    if preconditioner == "kron":  # the tiny model in several buckets, as a large one would be
        optimizer._distribution.min_bucket_bytes = 1
    sent = 0
    for step, (x, y) in enumerate(batches()):
        reference_opt.zero_grad()
        loss_of(reference, x, y).backward()
        reference_opt.step()
        optimizer.zero_grad()
        loss_of(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        optimizer.step()
        sent = max(sent, optimizer._distribution.last_sent_bytes)
        if step + 1 == HALF and save == "dcp":
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.save(state, checkpoint_id=out / "dcp")
        if step + 1 == HALF and save == "accelerate":
            from accelerate import PartialState
            from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_optimizer

            plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
            save_fsdp_optimizer(plugin, PartialState(), optimizer, model, out / "accelerate")
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=out / "accelerate_model")
    one_process_blocks = [block_bytes(state) for state in reference_opt.state.values()]
    return {
        "params": {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()},
        "one_process": {name: p.detach().clone() for name, p in reference.named_parameters()},
        "state_bytes": sum(block_bytes(state) for state in optimizer.state.values()),
        "one_process_state_bytes": sum(one_process_blocks),
        "largest_block_bytes": max(one_process_blocks),
        "sent_bytes": sent,
        "shard_bytes": sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters()),
        "owners": sorted(set(optimizer._distribution.owners.values())),
    }


def nan_on_one_rank() -> dict:
    rank = dist.get_rank()
    model = shard(make_model(), None)
    optimizer = PSGD(model.parameters(), **OPTIONS)
    x, y = batches()[0]
    loss_of(model, x, y).backward()
    optimizer.step()
    before = {name: p.to_local().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    loss_of(model, x, y).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local().fill_(float("nan"))
    optimizer.step()
    unchanged = all(torch.equal(p.to_local(), before[name]) for name, p in model.named_parameters())
    return {"unchanged": unchanged, "skipped": [int(s["skipped_steps"]) for s in optimizer.state.values()]}


def fit(model: nn.Module, optimizer: PSGD, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Train on the rank's part of every global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for x, y in steps:
        optimizer.zero_grad()
        loss_of(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        optimizer.step()


def load_dcp(model: nn.Module, optimizer: PSGD, folder: Path) -> list[int]:
    """Load model and optimizer from a DCP checkpoint; the step counters of the state DCP made to load into."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    initialised = [s["step"] for s in optimizer.state.values()]
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return initialised


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def resume_in_one(out: Path) -> dict:
    """In one process: the Kron run from its 2-process DCP checkpoint, the Diag run from Accelerate's,
    each trained on the last 10 batches; and Kron trained 10 steps and saved, for 2 processes to resume."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, load_fsdp_optimizer

    model = shard(make_model(), None)
    optimizer = PSGD(model.parameters(), preconditioner="kron", **OPTIONS)
    finals = {"initialised_steps": load_dcp(model, optimizer, out / "dcp")}
    fit(model, optimizer, batches()[HALF:])
    finals["kron"] = full_parameters(model)

    model = shard(make_model(), None)
    optimizer = PSGD(model.parameters(), preconditioner="diag", **OPTIONS)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=out / "accelerate_model")
    set_model_state_dict(model, state["model"])
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    load_fsdp_optimizer(plugin, PartialState(), optimizer, model, out / "accelerate")
    fit(model, optimizer, batches()[HALF:])
    finals["diag"] = full_parameters(model)

    model = shard(make_model(), None)
    optimizer = PSGD(model.parameters(), preconditioner="kron", **OPTIONS)
    fit(model, optimizer, batches()[:HALF])
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=out / "dcp_one",
    )
    return finals


def resume_in_two(out: Path) -> dict:
    """In two processes: Kron from the 1-process DCP checkpoint, trained on the last 10 batches."""
    model = shard(make_model(), None)
    optimizer = PSGD(model.parameters(), preconditioner="kron", **OPTIONS)
    load_dcp(model, optimizer, out / "dcp_one")
    fit(model, optimizer, batches()[HALF:])
    return {"kron": full_parameters(model)}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    if sys.argv[2:] == ["resume"]:
        resumed = resume_in_one(out) if dist.get_world_size() == 1 else resume_in_two(out)
        torch.save(resumed, out / f"resumed_in_{dist.get_world_size()}_rank{dist.get_rank()}.pt")
        end_multiprocess_run()
    torch.manual_seed(0)
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results = {
        "world": dist.get_world_size(),
        "kron": run("kron", None, out, "dcp"),
        "diag": run("diag", None, out, "accelerate"),
        "lra": run("lra", None, out, None),
        "kron_bf16": run("kron", bf16, out, None),
        "nan": nan_on_one_rank(),
    }
    torch.save(copy.deepcopy(results), out / f"rank{dist.get_rank()}.pt")
    end_multiprocess_run()


if __name__ == "__main__":
    main()
