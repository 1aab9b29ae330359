"""Trainer benchmark: PSGDTrainer against Trainer with AdamW on a small causal-LM fine-tune (CPU).

Workloads (`--workload`), Llama-style models built from configs, trained on Python standard-library source:

* `bench` (default): hidden 256, 4 layers, 4 heads, MLP 688, vocabulary 256 (the source read as bytes),
  sequence 128 (`--seq`), batch 8; about 3.3M parameters;
* `recipe`: the model and batch of the offline `recipes/causal_lm.yaml` (hidden 128, 2 layers, 4 heads, MLP
  384, vocabulary 1024, sequence 128, batch 16; about 0.66M parameters); token ids are byte pairs folded into
  the vocabulary (the recipe's own BPE tokenizer is trained at run time; only the shapes matter here).

Three configurations: `adamw_torch`; `psgd_kron` with whitening; `psgd_kron` with exact Hessian-vector
products (`curvature=hvp`).

Method:

* training-step time is measured inside `Trainer.train()` by a callback (step begin to step end:
  forward, backward, clipping, optimizer step), medians over all timed steps after the first;
* PSGD's update schedule fits the preconditioner on a deterministic fraction of steps, so each PSGD
  configuration is timed twice: fitting on every step (`precond_update_prob=1.0`) and only applying
  (a tiny probability after the first step). The average step over a run of N steps is
  `f t_fit + (1 - f) t_apply` with `f = sum_{t<N} p(t) / N`, for hf_psgd's default schedule (the
  targets) and for the references' slower one;
* configurations run in `--rounds` alternating rounds of `--steps` steps, so machine noise hits all;
  the ratios to AdamW (and the targets) are medians over the rounds of each round's ratio of medians,
  which cancels the drift of a shared machine's speed over minutes (AdamW's step varied by about 15%
  between runs here); the table also gives the pooled medians and the rounds' range;
* peak memory of an HVP step with gradient accumulation 1 and 4 (same micro-batch): each in a fresh
  subprocess after a warm-up run of plain steps, how far the RSS peaks above its starting level
  during `train()` of two fitting steps (Linux peak-RSS mark, reset after `malloc_trim`), with glibc's mmap
  threshold fixed at 64 KiB so that freed tensors leave the RSS (with the default, heap fragmentation made
  gradient accumulation 2-16 peak 25-50 MB, about 10%, above accumulation 1 on the `recipe` workload, a
  constant that did not grow with the number of micro-batches; with the fixed threshold: 1.01x).

The fit's cost does not depend on the batch, the forward and backward passes grow with it: the ratios
fall as the tokens per step grow (`--seq 512` is the micro-batch shape of `recipes/causal_lm_hub.yaml`).

    python scripts/bench_trainer.py [--workload bench|recipe] [--rounds 3] [--steps 6] [--seq 128]
        [--precond-dtype bfloat16] [--out scripts/results/trainer.md]
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

#: name -> (LlamaConfig fields, batch size, vocabulary); every model has 4 attention heads
WORKLOADS = {
    "bench": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4), 8, 256),
    "recipe": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2), 16, 1024),
}
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


def model(workload: str, seq: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    fields, _, vocab = WORKLOADS[workload]
    heads = dict(num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=seq, **heads, **fields))


def dataset(workload: str, rows: int, seq: int) -> Dataset:
    vocab = WORKLOADS[workload][2]
    if vocab == 256:
        ids = stdlib_bytes(rows * seq)
    else:  # byte pairs folded into the vocabulary
        pairs = stdlib_bytes(2 * rows * seq).view(-1, 2)
        ids = (pairs[:, 0] * 256 + pairs[:, 1]) % vocab
    ids = ids[: rows * seq].view(rows, seq).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def train(
    name: str, workload: str, steps: int, seq: int, accumulation: int = 1, precond_dtype: str | None = None
) -> list[float]:
    optim, optim_args, lr = CONFIGS[name]
    if precond_dtype is not None and optim_args is not None:
        optim_args += f",precond_dtype={precond_dtype}"
    batch = WORKLOADS[workload][1]
    with tempfile.TemporaryDirectory() as tmp:
        args = PSGDTrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch,
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
        data = dataset(workload, steps * batch * accumulation, seq)
        trainer = PSGDTrainer(model=model(workload, seq), args=args, train_dataset=data)
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


def peak_memory_rise(accumulation: int, workload: str, seq: int, precond_dtype: str | None) -> float:
    """MB by which the RSS peaks above its starting level during two HVP-fitting steps (Linux).

    A warm-up run of plain steps pays for imports and Trainer first; then free heap is returned to
    the OS (``malloc_trim``) and the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``)."""
    train("psgd-hvp-apply", workload, steps=2, seq=seq, accumulation=accumulation, precond_dtype=precond_dtype)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    start = _status_mb("VmRSS")
    train("psgd-hvp-fit", workload, steps=2, seq=seq, accumulation=accumulation, precond_dtype=precond_dtype)
    return _status_mb("VmHWM") - start


def memory_in_subprocess(accumulation: int, workload: str, seq: int, precond_dtype: str | None) -> float:
    command = [sys.executable, __file__, "--memory", str(accumulation), "--workload", workload, "--seq", str(seq)]
    if precond_dtype is not None:
        command += ["--precond-dtype", precond_dtype]
    # a fixed mmap threshold gives every large tensor its own mapping, so the RSS follows the live tensors;
    # glibc's default (a threshold that grows as memory is freed) adds tens of MB of heap fragmentation
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rise_mb"]


def report(rounds: list[dict[str, list[float]]], memory: dict[int, float], args: argparse.Namespace) -> str:
    """``rounds``: per round, each configuration's step times."""
    median = {name: statistics.median(t for times in rounds for t in times[name]) for name in CONFIGS}
    per_round = [
        {name: statistics.median(times[name]) / statistics.median(times["adamw"]) for name in CONFIGS}
        for times in rounds
    ]
    lines = [
        "# Trainer step cost: PSGDTrainer vs Trainer + AdamW",
        "",
        f"{args.rounds} rounds x {args.steps} steps (first step of each run excluded); workload "
        f"`{args.workload}`: Llama-style model ({_shape_text(args.workload)}), batch {WORKLOADS[args.workload][1]} "
        f"x {args.seq} tokens, PSGD precond_dtype {args.precond_dtype or 'default (float32)'}, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Ratios: median "
        "over the rounds of the round's median step time over AdamW's in the same round (range in brackets).",
        "",
        "| configuration | step ms (pooled median) | / AdamW, per round |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| `{name}` | {1e3 * t:.1f} | {_ratio_text([r[name] for r in per_round])} |" for name, t in median.items()
    ]
    lines += ["", "Average step over a run of N steps (`f` = fraction of steps that fit):", ""]
    lines += ["| schedule | N | f | whitening / AdamW | hvp / AdamW |", "|---|---:|---:|---:|---:|"]
    averages = {}
    for label, schedule in SCHEDULES.items():
        for n in RUN_LENGTHS:
            f = fit_fraction(schedule, n)
            whiten = [f * r["psgd-whiten-fit"] + (1 - f) * r["psgd-whiten-apply"] for r in per_round]
            hvp = [f * r["psgd-hvp-fit"] + (1 - f) * r["psgd-hvp-apply"] for r in per_round]
            averages[label, n] = (statistics.median(whiten), statistics.median(hvp))
            lines.append(f"| {label} | {n} | {f:.3f} | {_ratio_text(whiten)} | {_ratio_text(hvp)} |")
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


def _shape_text(workload: str) -> str:
    fields, _, vocab = WORKLOADS[workload]
    layers, mlp = fields["num_hidden_layers"], fields["intermediate_size"]
    return f"hidden {fields['hidden_size']}, {layers} layers, MLP {mlp}, vocab {vocab}"


def _ratio_text(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}-{max(ratios):.2f})"


def _target(label: str, value: float, limit: float) -> str:
    return f"- {'PASS' if value <= limit else 'FAIL'} {label}: {value:.2f}× (target ≤ {limit}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-length", type=int, default=5000, choices=RUN_LENGTHS)
    parser.add_argument("--workload", default="bench", choices=WORKLOADS, help="model and batch (see the docstring)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--precond-dtype", help="PSGD's precond_dtype for the timed runs (e.g. bfloat16)")
    parser.add_argument("--out", default="scripts/results/trainer.md")
    parser.add_argument("--memory", type=int, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory is not None:
        print(json.dumps({"peak_rise_mb": peak_memory_rise(args.memory, args.workload, args.seq, args.precond_dtype)}))
        return
    rounds: list[dict[str, list[float]]] = []
    for round_index in range(args.rounds):
        order = list(CONFIGS) if round_index % 2 == 0 else list(reversed(CONFIGS))
        rounds.append(
            {name: train(name, args.workload, args.steps, args.seq, precond_dtype=args.precond_dtype) for name in order}
        )
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    memory = {
        accumulation: memory_in_subprocess(accumulation, args.workload, args.seq, args.precond_dtype)
        for accumulation in (1, 4)
    }
    text = report(rounds, memory, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
