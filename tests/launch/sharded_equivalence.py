"""Run under ``torchrun --nproc_per_node 2`` (gloo on CPU) with one PSGD configuration, e.g.
``preconditioner=kron,curvature=hvp``. Every rank trains the same tiny transformer twice on the same
20 global batches: once as a single process would (unsharded PSGD, whole batches) and once sharded
(its half of each batch). It checkpoints both after 10 steps (the sharded one through
``Accelerator.save_state``, with no other call), resumes 2 -> 1 and 1 -> 2, and writes OUT/rank<r>.pt
with the final parameters of every run, per-rank preconditioner bytes and the owners. With whitening and
with H v in fp32 it also steps a sharded optimizer whose gradient is NaN on rank 1 only (every rank must
skip, its state untouched) and calls ``state_dict()`` on rank 0 only (it must raise within a few seconds)."""

from __future__ import annotations

import copy
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyTransformer, copy_task_batch, lm_loss  # noqa: E402

from hf_psgd import PSGD  # noqa: E402
from hf_psgd.distributed import all_reduce_mean_, end_multiprocess_run  # noqa: E402

STEPS, HALF = 20, 10


def parse(options: str) -> dict:
    pairs = dict(item.split("=") for item in options.split(","))
    parsed = {"preconditioner": pairs["preconditioner"], "curvature": pairs["curvature"]}
    if "secant_pairs" in pairs:
        parsed["secant_pairs"] = pairs["secant_pairs"] == "true"
    if "apply_dtype" in pairs:
        parsed["apply_dtype"] = pairs["apply_dtype"]
    if "max_update_amplitude" in pairs:
        parsed["max_update_amplitude"] = float(pairs["max_update_amplitude"])
    return parsed


def make_optimizer(model: torch.nn.Module, options: dict, shard: bool) -> PSGD:
    return PSGD(model.parameters(), lr=0.02, precond_update_prob=0.5, shard_preconditioners=shard, **options)


def train(model, optimizer, batches, curvature: str, shard: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for tokens in batches:
        tokens = tokens.chunk(world)[rank] if shard else tokens
        if curvature == "whiten":  # plain loop: average gradients as DDP would
            optimizer.zero_grad()
            lm_loss(model, tokens).backward()
            if shard:
                all_reduce_mean_([p.grad for p in model.parameters()])
            optimizer.step()
        else:  # PSGD differentiates the closure and averages g and H v itself
            optimizer.step(lambda tokens=tokens: lm_loss(model, tokens))


def params(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def preconditioner_bytes(optimizer: PSGD) -> list[int]:
    """Bytes of preconditioner tensors (momentum and counters excluded) per state entry."""
    sizes = []
    for state in optimizer.state.values():
        tensors = [t for key, value in state.items() if key != "momentum" for t in _tensors(value)]
        sizes.append(sum(t.numel() * t.element_size() for t in tensors))
    return sizes


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def main(out: Path, options: dict) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(0)
    batches = [copy_task_batch(generator, batch=8) for _ in range(STEPS)]
    torch.manual_seed(0)
    initial = TinyTransformer()
    curvature = options["curvature"]

    single = copy.deepcopy(initial)
    single_opt = make_optimizer(single, options, shard=False)
    train(single, single_opt, batches[:HALF], curvature, shard=False)
    single_half, single_half_state = params(single), copy.deepcopy(single_opt.state_dict())
    train(single, single_opt, batches[HALF:], curvature, shard=False)

    sharded = copy.deepcopy(initial)
    sharded_opt = accelerator.prepare(make_optimizer(sharded, options, shard=True))
    train(sharded, sharded_opt, batches[:HALF], curvature, shard=True)
    sharded_half = params(sharded)
    accelerator.save_state(str(out / "sharded_checkpoint"))
    accelerator.wait_for_everyone()
    memory = preconditioner_bytes(sharded_opt.optimizer)
    train(sharded, sharded_opt, batches[HALF:], curvature, shard=True)

    resumer = Accelerator(cpu=True)  # resume 2 -> 1: the sharded checkpoint into a single-process optimizer
    two_to_one = copy.deepcopy(initial)
    two_to_one.load_state_dict(sharded_half)
    two_to_one_opt = resumer.prepare(make_optimizer(two_to_one, options, shard=False))
    resumer.load_state(str(out / "sharded_checkpoint"))
    train(two_to_one, two_to_one_opt, batches[HALF:], curvature, shard=False)

    one_to_two = copy.deepcopy(initial)  # resume 1 -> 2: the single-process state into a sharded optimizer
    one_to_two.load_state_dict(single_half)
    one_to_two_opt = make_optimizer(one_to_two, options, shard=True)
    one_to_two_opt.load_state_dict(single_half_state)
    train(one_to_two, one_to_two_opt, batches[HALF:], curvature, shard=True)

    results = nan_on_one_rank(initial, options, batches[0]) if curvature == "whiten" or "apply_dtype" in options else {}
    torch.save(
        {
            **results,
            "single": params(single),
            "sharded": params(sharded),
            "two_to_one": params(two_to_one),
            "one_to_two": params(one_to_two),
            "rank_preconditioner_bytes": sum(memory),
            "all_preconditioner_bytes": preconditioner_bytes(single_opt),
            "owners": sorted(set(sharded_opt.optimizer._distribution.owners.values())),
        },
        out / f"rank{rank}.pt",
    )
    end_multiprocess_run()


def nan_on_one_rank(initial: torch.nn.Module, options: dict, tokens: torch.Tensor) -> dict:
    """Two good steps, then one whose gradient (with H v: loss, gradient and curvature) is NaN on rank 1 only, then
    ``state_dict()`` on rank 0 only. The NaN step must leave the parameters and every rank's optimizer state
    (preconditioners, momentum, the growth cap's update-RMS history, the count of clipped updates) as they were,
    but for its counters of skipped steps. Also returns this rank's count of clipped updates after the NaN step."""
    model = copy.deepcopy(initial)
    optimizer = make_optimizer(model, options, shard=True)

    def step(poisoned: bool) -> None:  # poisoned: NaN in the first parameter's gradient (and H v) on rank 1
        poison = float("nan") if poisoned and dist.get_rank() == 1 else 0.0
        first = next(model.parameters())
        if options["curvature"] == "whiten":
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            first.grad[0] += poison
            optimizer.step()
        else:  # the other blocks' g and H v stay finite: only the agreed mask stops their updates
            optimizer.step(lambda: lm_loss(model, tokens) + poison * first.sum())

    for _ in range(2):  # two: the growth cap's history (an EMA) differs from the RMS the unchanged momentum gives
        step(poisoned=False)
    before, state_before = params(model), _state_tensors(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step(poisoned=True)
    unchanged = all(torch.equal(value, before[name]) for name, value in params(model).items())
    state_after = _state_tensors(optimizer)
    state_unchanged = state_before.keys() == state_after.keys() and all(
        torch.equal(value, state_after[key]) for key, value in state_before.items()
    )
    skipped = all(state["skipped_steps"] == 1 for state in optimizer.state.values())
    optimizer._distribution.state_dict_timeout = timedelta(seconds=3)
    error = ""
    if dist.get_rank() == 0:
        try:
            optimizer.state_dict()
        except RuntimeError as raised:
            error = str(raised)
    clipped = sum(int(state.get("clipped_updates", 0)) for state in optimizer.state.values())
    return {
        "nan_skipped_everywhere": unchanged and state_unchanged and skipped,
        "one_rank_state_dict_error": error,
        "clipped_updates": clipped,
    }


def _state_tensors(optimizer: PSGD) -> dict[str, torch.Tensor]:
    """Every tensor of this rank's optimizer state by a path of keys, cloned; the counters of skipped steps and
    undone fits left out (a masked step counts in both)."""
    found = {}
    for index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if key not in ("skipped_steps", "rejected_fits"):
                found |= {f"{index}.{key}.{i}": t.detach().clone() for i, t in enumerate(_tensors(value))}
    return found


if __name__ == "__main__":
    main(Path(sys.argv[1]), parse(sys.argv[2]))
