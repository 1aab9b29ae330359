"""Sharded preconditioners: optimizer step time, per-rank preconditioner memory and communicated
bytes with 1, 2 (and optionally 4) processes on the step-cost benchmark model.

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
communicated bytes per step <= one parameter-sized buffer. Writes ``--out-dir/sharding.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter, thread_time

import torch
import torch.distributed as dist
from bench_step_cost import CONFIG, make_batch
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
    model = TinyGPT(CONFIG)
    batch = make_batch()
    model.loss(batch.chunk(world)[rank]).backward()
    if world > 1:
        all_reduce_mean_([p.grad for p in model.parameters()])
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer = PSGD(model.parameters(), lr=1e-3, precond_update_prob=1.0)
    exchange_seconds, block_seconds, block_cpu_seconds = [0.0], [0.0], [0.0]
    block_update = optimizer._block_update

    def timed_block_update(*args, **kwargs):
        start, start_cpu = perf_counter(), thread_time()
        result = block_update(*args, **kwargs)
        block_seconds[0] += perf_counter() - start
        block_cpu_seconds[0] += thread_time() - start_cpu
        return result

    optimizer._block_update = timed_block_update
    distribution = optimizer._distribution
    if world > 1:
        exchange = distribution.exchange

        def timed_exchange(*args, **kwargs):
            start = perf_counter()
            result = exchange(*args, **kwargs)
            exchange_seconds[0] += perf_counter() - start
            return result

        distribution.exchange = timed_exchange
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


def run(processes: int, steps: int, warmup: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += [__file__, "--worker", tmp, "--steps", str(steps), "--warmup", str(warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=env, cwd=Path(__file__).parent)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(processes)]


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
            f"- {processes} processes: max preconditioner bytes per rank {held} <= total/N + largest block "
            f"{bound:.0f}: {_verdict(held <= bound)}"
        )
    return "\n".join(lines + [""] + verdicts)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (1 is required)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return
    counts = sorted({1, *(int(n) for n in args.processes.split(","))})
    results = {n: run(n, args.steps, args.warmup) for n in counts}
    size = sum(p.numel() for p in TinyGPT(CONFIG).parameters()) / 1e6
    text = f"# Sharded preconditioners ({size:.2f}M-parameter GPT)\n\n"
    text += report(results) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sharding.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
