"""GPU benchmark in one command: the CUDA tests, then PSGD's step and iteration (eager, and with
``compile_kernels=True``) against fused AdamW and the PyPI PSGDs (heavyball ``PSGDKron``, kron-torch
``Kron``; compiled, as their defaults) on a GPT-2-small sized model (124M: vocab 50257, seq 1024,
d_model 768, 12 layers, 12 heads, batch 16, bf16 autocast) and on the 4.24M model of
``bench_step_cost.py``.

    python scripts/bench_gpu.py                      # on a machine with a CUDA device
    python scripts/bench_gpu.py --device cpu --models tiny --rounds 1 --skip-tests   # a smoke run

Per model every configuration gets its own model from the same seed and the same batch; warm-up
iterations (compilation included) fit the preconditioner every step, then the ``-apply`` rows switch
their update probability off; interleaved rounds time ``--iters`` iterations of each configuration in
turn (CUDA events around the whole iteration and around ``optimizer.step()``); medians are reported.
``psgd@0.03`` is derived: the default schedule at its long-run probability,
``apply + 0.03 (update - apply)``. Peak memory: ``torch.cuda.max_memory_allocated`` over one iteration of
the configuration alone. Writes ``--out`` (Markdown) with the GPU's name and the library versions.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import statistics
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_step_cost import D_MODEL, LONG_RUN_PROB, LR, TINY_PROB, Switch, make_kron_torch, model_config
from tiny_gpt import GPTConfig, TinyGPT
from torch import Tensor

from hf_psgd import PSGD

MODELS = {
    "gpt2-small": (GPTConfig(vocab=50257, seq=1024, dim=768, layers=12, heads=12), 16),
    "4.24M": (model_config(D_MODEL), 8),
    "tiny": (GPTConfig(vocab=256, seq=32, dim=32, layers=1, heads=2), 4),  # smoke runs only
}


@dataclass(frozen=True)
class Config:
    name: str
    make: Callable[[list[Tensor]], Any]
    module: str | None = None
    apply_only: Switch | None = None
    hvp: bool = False


@dataclass
class Run:
    config: Config
    model: TinyGPT
    optimizer: Any
    tokens: Tensor
    steps: list[float] = field(default_factory=list)
    iterations: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def make_heavyball(params: list[Tensor]) -> Any:
    import heavyball

    return heavyball.PSGDKron(params, lr=LR, preconditioner_update_probability=1.0)


def configs(fused: bool) -> list[Config]:
    psgd_off = Switch("precond_update_prob", TINY_PROB, in_groups=True)
    return [
        Config("adamw", lambda p: torch.optim.AdamW(p, lr=LR, fused=fused)),
        Config("psgd", lambda p: PSGD(p, lr=LR, precond_update_prob=1.0)),
        Config("psgd-apply", lambda p: PSGD(p, lr=LR, precond_update_prob=1.0), apply_only=psgd_off),
        Config("psgd-hvp", lambda p: PSGD(p, lr=0.3, curvature="hvp", precond_update_prob=1.0), hvp=True),
        Config("psgd-compiled", lambda p: PSGD(p, lr=LR, precond_update_prob=1.0, compile_kernels=True)),
        Config(
            "psgd-compiled-apply",
            lambda p: PSGD(p, lr=LR, precond_update_prob=1.0, compile_kernels=True),
            apply_only=psgd_off,
        ),
        Config("heavyball", make_heavyball, "heavyball"),
        Config("heavyball-apply", make_heavyball, "heavyball", Switch("precond_schedule", 0.0, in_groups=False)),
        Config("kron-torch", make_kron_torch, "kron_torch"),
        Config(
            "kron-torch-apply",
            make_kron_torch,
            "kron_torch",
            Switch("preconditioner_update_probability", TINY_PROB, in_groups=True),
        ),
    ]


def iterate(run: Run, device: torch.device) -> tuple[float, float]:
    """One iteration: (step seconds, iteration seconds), timed with CUDA events on a GPU."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
    clock = [0.0, 0.0, 0.0]

    def mark(i: int) -> None:
        if marks:
            marks[i].record()
        else:
            import time

            clock[i] = time.perf_counter()

    mark(0)
    run.optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = run.model.loss(run.tokens)
    loss.backward(create_graph=run.config.hvp and run.optimizer.will_update_preconditioner())
    mark(1)
    run.optimizer.step()
    mark(2)
    if marks:
        torch.cuda.synchronize(device)
        return marks[1].elapsed_time(marks[2]) / 1e3, marks[0].elapsed_time(marks[2]) / 1e3
    return clock[2] - clock[1], clock[2] - clock[0]


def prepare(config: Config, model_config: GPTConfig, batch: int, device: torch.device, warmup: int) -> Run:
    torch.manual_seed(0)
    model = TinyGPT(model_config).to(device)
    tokens = torch.randint(0, model_config.vocab, (batch, model_config.seq + 1), device=device)
    run = Run(config, model, config.make(list(model.parameters())), tokens)
    for _ in range(warmup):
        iterate(run, device)
    if config.apply_only is not None:
        config.apply_only(run.optimizer)
    return run


def benchmark(model_name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    model_config, batch = MODELS[model_name]
    selected = [c for c in configs(device.type == "cuda") if c.module is None or importlib.util.find_spec(c.module)]
    if args.only:
        selected = [c for c in selected if c.name in args.only.split(",")]
    runs = [prepare(config, model_config, batch, device, args.warmup) for config in selected]
    for _ in range(args.rounds):
        for run in runs:
            gc.collect()
            for _ in range(args.iters):
                step, whole = iterate(run, device)
                run.steps.append(step)
                run.iterations.append(whole)
    for run in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            iterate(run, device)
            run.peak_bytes = torch.cuda.max_memory_allocated(device)
    medians = {run.config.name: (statistics.median(run.steps), statistics.median(run.iterations)) for run in runs}
    if "psgd" in medians and "psgd-apply" in medians:
        (update_step, update_it), (apply_step, apply_it) = medians["psgd"], medians["psgd-apply"]
        medians[f"psgd@{LONG_RUN_PROB:g}"] = (
            apply_step + LONG_RUN_PROB * (update_step - apply_step),
            apply_it + LONG_RUN_PROB * (update_it - apply_it),
        )
    base_step, base_it = medians["adamw"]
    peaks = {run.config.name: run.peak_bytes for run in runs}
    lines = [
        f"### {model_name} (batch {batch} x {model_config.seq} tokens)",
        "",
        "| config | step ms | iteration ms | step / AdamW | iteration / AdamW | peak GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (step, whole) in medians.items():
        peak = f"{peaks[name] / 1e9:.2f}" if peaks.get(name) else "-"
        ratios = f"{step / base_step:.2f}x | {whole / base_it:.2f}x"
        lines.append(f"| `{name}` | {1e3 * step:.1f} | {1e3 * whole:.1f} | {ratios} | {peak} |")
    fastest = min((medians[n][0] for n in ("heavyball", "kron-torch") if n in medians), default=None)
    if fastest is not None:
        lines += [
            "",
            f"- PSGD step with a preconditioner update / fastest PyPI PSGD's: {medians['psgd'][0] / fastest:.2f}x "
            "(target <= 0.5)",
        ]
    del runs
    gc.collect()
    return lines + [""]


def run_cuda_tests(timeout: int) -> str:
    """The CUDA test subset (``pytest -m cuda``), at most ``timeout`` seconds; its summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[1])
    except subprocess.TimeoutExpired:
        return f"CUDA tests: stopped after {timeout} s"
    return f"CUDA tests: {(result.stdout.strip().splitlines() or ['no output'])[-1]}"


def environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    versions = [f"torch {torch.__version__}"]
    for package in ("heavyball", "kron-torch"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"{name}; " + ", ".join(versions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--models", default="gpt2-small,4.24M", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per configuration and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation included)")
    parser.add_argument("--only", help="comma-separated configuration names (adamw is needed for the ratios)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA test subset first")
    parser.add_argument("--tests-timeout", type=int, default=180)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; pass --device cpu for a smoke run")
    lines = ["# GPU benchmark", "", environment(device), ""]
    if not args.skip_tests:
        lines += [run_cuda_tests(args.tests_timeout), ""]
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model_name not in MODELS:
            raise SystemExit(f"--models: unknown model {model_name!r}; known: {sorted(MODELS)}")
        lines += benchmark(model_name, args, device)
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
