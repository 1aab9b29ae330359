"""Trainer benchmark: PSGDTrainer against Trainer with AdamW on a small causal-LM fine-tune (CPU).

Workload: a Llama-style model built from a config (hidden 256, 4 layers, 4 heads, MLP 688, vocab 256
bytes, sequence 128 (`--seq`), batch 8; about 3.3M parameters) trained on Python standard-library source read
as bytes. Three configurations: `adamw_torch`; `psgd_kron` with whitening; `psgd_kron` with exact
Hessian-vector products (`curvature=hvp`).

Method:

* training-step time is measured inside `Trainer.train()` by a callback (step begin to step end:
  forward, backward, clipping, optimizer step), medians over all timed steps after the first;
* PSGD's update schedule fits the preconditioner on a deterministic fraction of steps, so each PSGD
  configuration is timed twice: fitting on every step (`precond_update_prob=1.0`) and only applying
  (a tiny probability after the first step). The average step over a run of N steps is
  `f t_fit + (1 - f) t_apply` with `f = sum_{t<N} p(t) / N`, for hf_psgd's default schedule (the
  targets) and for the references' slower one;
* configurations run in `--rounds` alternating rounds of `--steps` steps, so machine noise hits all;
* peak memory of an HVP step with gradient accumulation 1 and 4 (same micro-batch): each in a fresh
  subprocess after a warm-up run of plain steps, how far the RSS peaks above its starting level
  during `train()` of two fitting steps (Linux peak-RSS mark, reset after `malloc_trim`).

The fit's cost does not depend on the batch, the forward and backward passes grow with it: the ratios
fall as the tokens per step grow (`--seq 512` is the micro-batch shape of `recipes/causal_lm_hub.yaml`).

    python scripts/bench_trainer.py [--rounds 3] [--steps 6] [--seq 128] [--out scripts/results/trainer.md]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from tiny_gpt import stdlib_bytes
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_psgd import PSGDTrainer, PSGDTrainingArguments
from hf_psgd.optim import DEFAULT_UPDATE_SCHEDULE, update_probability

BATCH = 8
RUN_LENGTHS = (1000, 5000, 10000)
#: hf_psgd's default, and the one of kron_torch, timm and pytorch_optimizer (flat 500, decay 0.001)
SCHEDULES = {
    "default": DEFAULT_UPDATE_SCHEDULE,
    "references'": {"flat_steps": 500, "decay": 0.001, "min_prob": 0.03},
}
CONFIGS = {
    "adamw": ("adamw_torch", None, 1e-3),
    "psgd-whiten-fit": ("psgd_kron", "curvature=whiten,precond_update_prob=1.0", 3e-3),
    "psgd-whiten-apply": ("psgd_kron", "curvature=whiten,precond_update_prob=1e-9", 3e-3),
    "psgd-hvp-fit": ("psgd_kron", "curvature=hvp,precond_update_prob=1.0", 0.3),
    "psgd-hvp-apply": ("psgd_kron", "curvature=hvp,precond_update_prob=1e-9", 0.3),
}


def model(seq: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
    )
    return LlamaForCausalLM(config)


def dataset(rows: int, seq: int) -> Dataset:
    corpus = stdlib_bytes(rows * seq)
    ids = corpus[: rows * seq].view(rows, seq).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def train(name: str, steps: int, seq: int, accumulation: int = 1) -> list[float]:
    optim, optim_args, lr = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        args = PSGDTrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=accumulation,
            learning_rate=lr,
            optim=optim,
            optim_args=optim_args,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            logging_strategy="no",
            seed=0,
        )
        timer = StepTimer()
        trainer = PSGDTrainer(model=model(seq), args=args, train_dataset=dataset(steps * BATCH * accumulation, seq))
        trainer.add_callback(timer)
        trainer.train()
    return timer.times[1:]


def fit_fraction(schedule: dict[str, float], run_length: int) -> float:
    return sum(update_probability(schedule, t) for t in range(run_length)) / run_length


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_rise(accumulation: int, seq: int) -> float:
    """MB by which the RSS peaks above its starting level during two HVP-fitting steps (Linux).

    A warm-up run of plain steps pays for imports and Trainer first; then free heap is returned to
    the OS (``malloc_trim``) and the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``)."""
    train("psgd-hvp-apply", steps=2, seq=seq, accumulation=accumulation)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    start = _status_mb("VmRSS")
    train("psgd-hvp-fit", steps=2, seq=seq, accumulation=accumulation)
    return _status_mb("VmHWM") - start


def memory_in_subprocess(accumulation: int, seq: int) -> float:
    command = [sys.executable, __file__, "--memory", str(accumulation), "--seq", str(seq)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rise_mb"]


def report(times: dict[str, list[float]], memory: dict[int, float], args: argparse.Namespace) -> str:
    median = {name: statistics.median(values) for name, values in times.items()}
    adamw = median["adamw"]
    lines = [
        "# Trainer step cost: PSGDTrainer vs Trainer + AdamW",
        "",
        f"Median training-step time over {args.rounds} rounds x {args.steps} steps (first step of each run "
        f"excluded); Llama-style model (hidden 256, 4 layers, vocab 256), batch {BATCH} x {args.seq} tokens, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| configuration | step ms | / AdamW |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{name}` | {1e3 * t:.1f} | {t / adamw:.2f}× |" for name, t in median.items()]
    lines += ["", "Average step over a run of N steps (`f` = fraction of steps that fit):", ""]
    lines += ["| schedule | N | f | whitening / AdamW | hvp / AdamW |", "|---|---:|---:|---:|---:|"]
    averages = {}
    for label, schedule in SCHEDULES.items():
        for n in RUN_LENGTHS:
            f = fit_fraction(schedule, n)
            whiten = f * median["psgd-whiten-fit"] + (1 - f) * median["psgd-whiten-apply"]
            hvp = f * median["psgd-hvp-fit"] + (1 - f) * median["psgd-hvp-apply"]
            averages[label, n] = (whiten / adamw, hvp / adamw)
            lines.append(f"| {label} | {n} | {f:.3f} | {whiten / adamw:.2f}× | {hvp / adamw:.2f}× |")
    whiten_ratio, hvp_ratio = averages["default", args.run_length]
    ga_ratio = memory[4] / memory[1]
    lines += [
        "",
        f"Peak RSS rise during two HVP-fitting steps: {memory[1]:.1f} MB with gradient accumulation 1, "
        f"{memory[4]:.1f} MB with 4 (ratio {ga_ratio:.2f}).",
        "",
        "## Targets",
        "",
        _target(f"whitening, default schedule over {args.run_length} steps, vs AdamW", whiten_ratio, 1.15),
        _target(f"hvp, default schedule over {args.run_length} steps, vs AdamW", hvp_ratio, 1.6),
        _target("peak memory of an HVP step, gradient accumulation 4 vs 1", ga_ratio, 1.10),
    ]
    return "\n".join(lines) + "\n"


def _target(label: str, value: float, limit: float) -> str:
    return f"- {'PASS' if value <= limit else 'FAIL'} {label}: {value:.2f}× (target ≤ {limit}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-length", type=int, default=5000, choices=RUN_LENGTHS)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (batch 8)")
    parser.add_argument("--out", default="scripts/results/trainer.md")
    parser.add_argument("--memory", type=int, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory is not None:
        print(json.dumps({"peak_rise_mb": peak_memory_rise(args.memory, args.seq)}))
        return
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(args.rounds):
        for name in CONFIGS if round_index % 2 == 0 else reversed(CONFIGS):
            times[name] += train(name, args.steps, args.seq)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    memory = {accumulation: memory_in_subprocess(accumulation, args.seq) for accumulation in (1, 4)}
    text = report(times, memory, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
