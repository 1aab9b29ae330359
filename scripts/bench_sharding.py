"""Sharded preconditioners: optimizer step time, per-rank preconditioner memory and communicated
bytes with 1, 2 (and optionally 4) processes on the step-cost benchmark model, under data
parallelism and under FSDP2.

The model is the 4.24M-parameter GPT of ``bench_step_cost.py``. Each process count runs under
``torchrun`` (gloo, CPU, one torch thread per process, so 2 processes use the machine's 2 cores and
1 process uses one); every process runs ``PSGD(preconditioner="kron", curvature="whiten")`` fitting
the preconditioner on every step (``precond_update_prob=1``, the schedule's first phase, where the
preconditioner work is largest) on fixed, already averaged gradients. Per rank and step it measures

* ``step``: the whole ``optimizer.step()`` (median of the timed steps, after warm-up, ranks aligned
  by a barrier before every step);
* ``exchange``: the ``all_gather`` of the owners' updates inside it;
* ``preconditioner work``: the time in the rank's own blocks' momentum, preconditioner fit and
  guarded ``P m`` (the part that sharding divides; the rest of the step is the exchange and the
  parameter update, which every rank does for all parameters), as the thread's CPU time (the
  target) and as wall time. They differ where processes do not run in parallel at full speed: on
  the 2-vCPU machine of the recorded results two independent single-thread processes each run
  2.2x slower in wall time at unchanged CPU time, so wall-time speed-ups cannot show there;
* preconditioner bytes (state tensors except momentum) and momentum bytes held by the rank;
* communicated bytes per step: what each rank receives, ``(world - 1) x`` the padded shard (a ring
  all-gather sends and receives that much per rank), against one fp32 parameter-sized buffer;
  the all-gather's whole output buffer (``world x`` the shard, the rank's own shard included) is
  reported too.

Targets (issue 5): per-rank preconditioner work with 2 processes <= 0.6x the 1-process time;
communicated bytes per step <= one parameter-sized buffer. ``--rounds R`` runs every configuration R times,
interleaved, and reports each rank's medians: single runs on a shared 2-vCPU machine move the
one-process time by 30% and the work ratio by +-0.1.

FSDP2 (``fully_shard`` on every transformer block and the root; gradients from one real backward
of the rank's part of the batch, reduce-scattered by FSDP2) runs PSGD and, as the baseline,
``torch.optim.AdamW`` on the same sharded model. Per rank: the step time (wall and the step's
CPU time), PSGD's preconditioner work (CPU time), the bytes it sends to the other ranks per step
(gradient shards to owners, updated rows back), and the memory the step needs at its peak,
counted from the tensors themselves: parameter shard + gradient shard + optimizer state held by the
rank (PSGD: its blocks' preconditioners and momentum; AdamW: two moments of the shard) + the
step's transient tensors (PSGD: the larger of its two exchange phases, the whole gradients of its
blocks or their updates beside the all-to-all's send and receive buffers, not counting the fits'
per-block temporaries; AdamW: the shard-sized square root of its foreach step). Targets (issue 14)
with 2 processes: peak <= 1.2x FSDP2 + AdamW's; bytes sent per rank
per step <= 2x the rank's parameter-shard bytes; preconditioner CPU time per rank <= 0.6x one
process. Writes ``--out-dir/sharding.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter, thread_time

import torch
import torch.distributed as dist
from bench_step_cost import D_MODEL, make_batch, model_config
from tiny_gpt import TinyGPT

from hf_psgd import PSGD
from hf_psgd.distributed import all_reduce_mean_, end_multiprocess_run


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def worker(out: Path, steps: int, warmup: int) -> None:
    """One process of a run: time ``steps`` optimizer steps, write ``out/rank<r>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyGPT(model_config(D_MODEL))
    batch = make_batch()
    model.loss(batch.chunk(world)[rank]).backward()
    if world > 1:
        all_reduce_mean_([p.grad for p in model.parameters()])
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer = PSGD(model.parameters(), lr=1e-3, precond_update_prob=1.0)
    exchange_seconds, block_seconds, block_cpu_seconds = [0.0], [0.0], [0.0]
    _time_block_work(optimizer, block_seconds, perf_counter)
    _time_block_work(optimizer, block_cpu_seconds, thread_time)
    distribution = optimizer._distribution
    if world > 1:
        _accumulate_time(distribution, "exchange", exchange_seconds, perf_counter)
    step_times, exchange_times, block_times, block_cpu_times = [], [], [], []
    for step in range(warmup + steps):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        exchange_seconds[0] = block_seconds[0] = block_cpu_seconds[0] = 0.0
        dist.barrier()
        start = perf_counter()
        optimizer.step()
        if step >= warmup:
            step_times.append(perf_counter() - start)
            exchange_times.append(exchange_seconds[0])
            block_times.append(block_seconds[0])
            block_cpu_times.append(block_cpu_seconds[0])
    states = list(optimizer.state.values())
    momentum = sum(_tensor_bytes(s.get("momentum")) for s in states)
    blocks = [_tensor_bytes([v for k, v in s.items() if k != "momentum"]) for s in states]
    shard = distribution.last_shard_numel if world > 1 else 0
    result = {
        "rank": rank,
        "world": world,
        "step_ms": 1e3 * statistics.median(step_times),
        "exchange_ms": 1e3 * statistics.median(exchange_times),
        "work_ms": 1e3 * statistics.median(block_times),
        "work_cpu_ms": 1e3 * statistics.median(block_cpu_times),
        "preconditioner_bytes": sum(blocks),
        "largest_block_bytes": max(blocks),
        "momentum_bytes": momentum,
        "received_bytes": (world - 1) * shard * 4,
        "gathered_bytes": world * shard * 4,
        "parameter_bytes": sum(p.numel() * 4 for p in model.parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_multiprocess_run()


def fsdp2_worker(out: Path, steps: int, warmup: int, optimizer_name: str) -> None:
    """One process of an FSDP2 run with ``optimizer_name`` (``psgd`` or ``adamw``): write ``out/rank<r>.json``."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyGPT(model_config(D_MODEL))
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    model.loss(make_batch().chunk(world)[rank]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    else:
        optimizer = PSGD(model.parameters(), lr=1e-3, precond_update_prob=1.0)
    work_cpu, phase_bytes, transient = [0.0], [0], 0
    if optimizer_name == "psgd":
        _time_block_work(optimizer, work_cpu, thread_time)
        distribution = optimizer._distribution
        gather, exchange, all_to_all = distribution.gather_gradients, distribution.exchange, distribution._all_to_all

        def measured_all_to_all(sends, receives, dtype):
            size = torch.empty((), dtype=dtype).element_size()
            phase_bytes[0] += size * (sum(t.numel() for _, t in sends) + sum(n for _, n in receives))
            return all_to_all(sends, receives, dtype)

        def measured_gather(plans, grads_by_param):  # peak: send and receive buffers + the whole gradients
            phase_bytes[0] = 0
            whole = gather(plans, grads_by_param)
            phase_bytes[0] += sum(_tensor_bytes(g) for g in whole.values())
            return whole

        def measured_exchange(plans, updates):  # peak: the owned updates + send and receive buffers
            nonlocal transient
            transient = max(transient, phase_bytes[0])
            phase_bytes[0] = sum(_tensor_bytes(u) for u in updates.values())
            result = exchange(plans, updates)
            transient = max(transient, phase_bytes[0])
            return result

        distribution._all_to_all = measured_all_to_all
        distribution.gather_gradients, distribution.exchange = measured_gather, measured_exchange
    step_times, step_cpu_times, work_times, sent = [], [], [], 0
    for step in range(warmup + steps):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        work_cpu[0] = 0.0
        dist.barrier()
        start, start_cpu = perf_counter(), thread_time()
        optimizer.step()
        if step >= warmup:
            step_times.append(perf_counter() - start)
            step_cpu_times.append(thread_time() - start_cpu)
            work_times.append(work_cpu[0])
            if optimizer_name == "psgd":
                sent = max(sent, optimizer._distribution.last_sent_bytes)
    local_bytes = [_tensor_bytes(p.to_local()) for p in model.parameters()]
    if optimizer_name == "adamw":
        transient = sum(local_bytes)  # its foreach step's sqrt of the second moment
    state = sum(
        _tensor_bytes([v.to_local() if hasattr(v, "to_local") else v for v in s.values()])
        for s in optimizer.state.values()
    )
    result = {
        "rank": rank,
        "world": world,
        "step_ms": 1e3 * statistics.median(step_times),
        "step_cpu_ms": 1e3 * statistics.median(step_cpu_times),
        "work_cpu_ms": 1e3 * statistics.median(work_times),
        "sent_bytes": sent,
        "shard_bytes": sum(local_bytes),
        "state_bytes": state,
        "transient_bytes": transient,
        "peak_bytes": 2 * sum(local_bytes) + state + transient,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_multiprocess_run()


#: The shell's phases over the blocks a process owns (momenta, fits, ``P m``, Adam's floor): its
#: preconditioner work, without the gradients' gathering and the guard
BLOCK_WORK = ("_momentum_directions", "_fit", "_precondition", "_adam_floors")


def _time_block_work(optimizer: PSGD, total: list[float], clock: Callable[[], float]) -> None:
    """Add the duration by ``clock`` of every call of the optimizer's :data:`BLOCK_WORK` to ``total[0]``."""
    for name in BLOCK_WORK:
        _accumulate_time(optimizer, name, total, clock)


def _accumulate_time(owner: object, name: str, total: list[float], clock: Callable[[], float]) -> None:
    """Wrap the method ``owner.<name>`` so that every call adds its duration by ``clock`` to ``total[0]``."""
    method = getattr(owner, name)

    def timed(*args, **kwargs):
        start = clock()
        result = method(*args, **kwargs)
        total[0] += clock() - start
        return result

    setattr(owner, name, timed)


def run(processes: int, steps: int, warmup: int, worker_args: tuple[str, ...] = ()) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += [__file__, "--worker", tmp, "--steps", str(steps), "--warmup", str(warmup), *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=env, cwd=Path(__file__).parent)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(processes)]


def run_rounds(counts: list[int], rounds: int, steps: int, warmup: int, worker_args: tuple[str, ...] = ()) -> dict:
    """Every process count of ``counts`` run ``rounds`` times, the counts interleaved within each round (so a
    drift of the machine's speed reaches them alike); per rank, every figure's median over the rounds."""
    runs: dict[int, list[list[dict]]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            runs[n].append(run(n, steps, warmup, worker_args))
    return {n: [_medians([r[rank] for r in per_round]) for rank in range(n)] for n, per_round in runs.items()}


def _medians(results: list[dict]) -> dict:
    """Every figure of one rank's results (one per round): its median."""
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def report(results: dict[int, list[dict]]) -> str:
    base = results[1][0]
    lines = [
        "| processes | step ms (max rank) | exchange ms | preconditioner work CPU ms per rank | CPU work / 1-process "
        "(max rank) | preconditioner work wall ms per rank | "
        "preconditioner MB per rank (max) | momentum MB per rank (max) | received MB per rank per step | "
        "/ parameter buffer | all-gather buffer MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for processes, ranks in results.items():
        work = max(r["work_cpu_ms"] for r in ranks)
        communicated = ranks[0]["received_bytes"]
        cells = [
            str(processes),
            f"{max(r['step_ms'] for r in ranks):.1f}",
            f"{max(r['exchange_ms'] for r in ranks):.1f}",
            " / ".join(f"{r['work_cpu_ms']:.1f}" for r in ranks),
            f"{work / base['work_cpu_ms']:.2f}",
            " / ".join(f"{r['work_ms']:.1f}" for r in ranks),
            f"{max(r['preconditioner_bytes'] for r in ranks) / 1e6:.2f}",
            f"{max(r['momentum_bytes'] for r in ranks) / 1e6:.2f}",
            f"{communicated / 1e6:.2f}",
            f"{communicated / base['parameter_bytes']:.2f}",
            f"{ranks[0]['gathered_bytes'] / 1e6:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if processes == 2:
            ratio, bytes_ratio = work / base["work_cpu_ms"], communicated / base["parameter_bytes"]
            verdicts.append(
                f"- 2-process preconditioner work per rank / 1-process (CPU time): {ratio:.2f} (target <= 0.6): "
                + _verdict(ratio <= 0.6)
            )
            verdicts.append(
                f"- received bytes per rank per step / parameter buffer: {bytes_ratio:.2f} (target <= 1): "
                + _verdict(bytes_ratio <= 1)
            )
        bound = base["preconditioner_bytes"] / processes + base["largest_block_bytes"]
        held = max(r["preconditioner_bytes"] for r in ranks)
        verdicts.append(
            f"- {processes} processes: max preconditioner bytes per rank {held:.0f} <= total/N + largest block "
            f"{bound:.0f}: {_verdict(held <= bound)}"
        )
    return "\n".join(lines + [""] + verdicts)


def fsdp2_report(psgd: dict[int, list[dict]], adamw: dict[int, list[dict]], dp: dict[int, list[dict]]) -> str:
    base = max(r["work_cpu_ms"] for r in psgd[1])
    lines = [
        "| processes | PSGD step ms (max rank) | data-parallel PSGD step ms | AdamW step ms | PSGD step CPU ms | "
        "preconditioner work CPU ms per rank | / 1-process | sent MB per rank per step | / shard bytes | "
        "PSGD peak MB per rank (max) | state / transient MB | AdamW peak MB | PSGD / AdamW peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for processes, ranks in psgd.items():
        work = max(r["work_cpu_ms"] for r in ranks)
        sent_ratio = max(r["sent_bytes"] / r["shard_bytes"] for r in ranks)
        peak = max(r["peak_bytes"] for r in ranks)
        adamw_peak = max(r["peak_bytes"] for r in adamw[processes])
        worst = max(ranks, key=lambda r: r["peak_bytes"])
        dp_step = f"{max(r['step_ms'] for r in dp[processes]):.1f}" if processes in dp else "-"
        cells = [
            str(processes),
            f"{max(r['step_ms'] for r in ranks):.1f}",
            dp_step,
            f"{max(r['step_ms'] for r in adamw[processes]):.1f}",
            f"{max(r['step_cpu_ms'] for r in ranks):.1f}",
            " / ".join(f"{r['work_cpu_ms']:.1f}" for r in ranks),
            f"{work / base:.2f}",
            f"{max(r['sent_bytes'] for r in ranks) / 1e6:.2f}",
            f"{sent_ratio:.2f}",
            f"{peak / 1e6:.2f}",
            f"{worst['state_bytes'] / 1e6:.2f} / {worst['transient_bytes'] / 1e6:.2f}",
            f"{adamw_peak / 1e6:.2f}",
            f"{peak / adamw_peak:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if processes == 2:
            verdicts += [
                f"- FSDP2, 2 processes: PSGD peak / AdamW peak per rank: {peak / adamw_peak:.2f} (target <= 1.2): "
                + _verdict(peak / adamw_peak <= 1.2),
                f"- FSDP2, 2 processes: bytes sent per rank and step / shard bytes: {sent_ratio:.2f} (target <= 2): "
                + _verdict(sent_ratio <= 2),
                f"- FSDP2, 2 processes: preconditioner CPU time per rank / 1 process: {work / base:.2f} (<= 0.6): "
                + _verdict(work / base <= 0.6),
            ]
    return "\n".join(lines + [""] + verdicts)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (1 is required)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--fsdp2-processes", default="1,2,4", help="process counts of the FSDP2 rows ('' for none)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every configuration, interleaved; per-rank medians reported"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp2", choices=["psgd", "adamw"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} is invalid: expected an int >= 1")
    if args.worker and args.fsdp2:
        fsdp2_worker(args.worker, args.steps, args.warmup, args.fsdp2)
        return
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return
    counts = sorted({1, *(int(n) for n in args.processes.split(","))})
    results = run_rounds(counts, args.rounds, args.steps, args.warmup)
    size = sum(p.numel() for p in TinyGPT(model_config(D_MODEL)).parameters()) / 1e6
    text = f"# Sharded preconditioners ({size:.2f}M-parameter GPT)\n\n## Data parallelism\n\n"
    text += report(results) + "\n"
    fsdp2_counts = sorted({1, *(int(n) for n in args.fsdp2_processes.split(",") if n)}) if args.fsdp2_processes else []
    if fsdp2_counts:
        psgd = run_rounds(fsdp2_counts, args.rounds, args.steps, args.warmup, ("--fsdp2", "psgd"))
        adamw = run_rounds(fsdp2_counts, args.rounds, args.steps, args.warmup, ("--fsdp2", "adamw"))
        text += "\n## FSDP2\n\n" + fsdp2_report(psgd, adamw, results) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sharding.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
