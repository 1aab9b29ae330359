"""Step-cost benchmark: hf_psgd's PSGD-Kron against AdamW and the published PSGD-Kron implementations.

Workload: a GPT-2-like model in plain torch (vocab 4096, sequence 128, d_model 256, 4 layers, 4 heads, tied
embeddings, batch 8; 4,240,896 parameters) on the CPU. Attention is written by hand (softmax(QK^T / sqrt(d))
with a causal mask) so that the loss is twice differentiable for the exact Hessian-vector-product modes.

Method:

* every configuration gets its own model, built from the same seed, its own optimizer and the same batch;
* warm-up: ``--warmup`` iterations with the preconditioner fitted on every step; the apply-only configurations
  then switch their update probability to zero (or a tiny value) so later steps only apply ``P``;
* ``--rounds`` interleaved rounds: each round times ``--iters-per-round`` iterations of every configuration in
  turn (round-robin, so machine noise hits all alike); the table reports medians over all timed iterations;
* step time is ``optimizer.step()`` alone; iteration time is zero-grad + forward + backward + step. For
  psgd-torch, whose ``step(closure)`` differentiates the loss itself, the gradients are computed first and the
  closure hands them over through a zero "loss" whose gradient they are, so its step excludes forward/backward
  too. Exact-HVP rows whose step runs the forward pass (``step(closure)``) have an iteration time only;
* ``<family>@0.03`` rows are derived: the default update schedule amortised at its long-run probability 0.03,
  ``apply + 0.03 * (update - apply)`` for step and iteration alike;
* optimizer-state bytes: ``numel * element_size`` of every distinct tensor reachable from the optimizer's state
  (dicts, lists and tuples walked recursively), parameters excluded;
* torch.compile is disabled for everything (kron-torch decorates its kernels with it; heavyball's compiled
  helpers are switched off through ``heavyball.utils.compile_mode = None``): all rows are eager PyTorch.

The published implementations (kron-torch, heavyball, pytorch-optimizer, psgd-torch) are optional: a missing one
is reported and skipped. Output: a Markdown table, the PASS/FAIL lines of the step-cost targets and the
environment, printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from tiny_gpt import GPTConfig, TinyGPT
from torch import Tensor

from hf_psgd import PSGD

VOCAB, SEQ_LEN, D_MODEL, N_LAYERS, N_HEADS, BATCH = 4096, 128, 256, 4, 4, 8
SEED = 0
LR = 1e-3
LONG_RUN_PROB = 0.03  # the default schedules' floor: the long-run preconditioner update probability
TINY_PROB = 1e-9  # "never update" where a probability of exactly 0 is rejected or divides by zero

OptimizerLike = Any  # a torch.optim.Optimizer, or psgd-torch's Kron, which is not one


# --------------------------------------------------------------------------------------------- model


#: the amortised-iteration target (PSGD-Kron at the default schedule's floor vs AdamW) by d_model
AMORTISED_LIMITS = {256: 1.10, 768: 1.15}


def model_config(d_model: int) -> GPTConfig:
    return GPTConfig(vocab=VOCAB, seq=SEQ_LEN, dim=d_model, layers=N_LAYERS, heads=N_HEADS)


def make_batch() -> Tensor:
    """One fixed batch of ``SEQ_LEN + 1`` random tokens per row."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=generator)


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One configuration's model, optimizer, batch and timings."""

    config: Config
    model: TinyGPT
    optimizer: OptimizerLike
    tokens: Tensor
    step_times: list[float] = field(default_factory=list)
    iteration_times: list[float] = field(default_factory=list)
    last_loss: float = math.nan

    def loss(self) -> Tensor:
        return self.model.loss(self.tokens)

    def params(self) -> list[Tensor]:
        return list(self.model.parameters())


# An iteration function runs one training iteration and returns (step seconds or None, iteration seconds).
Iterate = Callable[[Run], tuple[float | None, float]]


def iterate_backward(run: Run) -> tuple[float, float]:
    """zero_grad, forward, ``loss.backward()``, then a timed ``optimizer.step()``."""
    start = perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss = run.loss()
    loss.backward()
    middle = perf_counter()
    run.optimizer.step()
    end = perf_counter()
    run.last_loss = loss.item()
    return end - middle, end - start


def iterate_psgd_hvp(run: Run) -> tuple[float, float]:
    """Like :func:`iterate_backward`, with ``backward(create_graph=True)`` on preconditioner-update steps."""
    start = perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss = run.loss()
    loss.backward(create_graph=run.optimizer.will_update_preconditioner())
    middle = perf_counter()
    run.optimizer.step()
    end = perf_counter()
    run.last_loss = loss.item()
    return end - middle, end - start


class _GivenGradients(torch.autograd.Function):
    """A zero "loss" whose gradient with respect to ``params`` is the given ``grads``."""

    @staticmethod
    def forward(ctx: Any, grads: list[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *ctx.grads)


def iterate_given_gradients(run: Run) -> tuple[float, float]:
    """Gradients first, then a timed ``step(closure)`` whose closure only hands them over (psgd-torch)."""
    start = perf_counter()
    params = run.params()
    loss = run.loss()
    grads = list(torch.autograd.grad(loss, params))
    middle = perf_counter()
    run.optimizer.step(lambda: _GivenGradients.apply(grads, *params))
    end = perf_counter()
    run.last_loss = loss.item()
    return end - middle, end - start


def iterate_closure(run: Run) -> tuple[None, float]:
    """``step(closure)`` with a closure that returns the loss; the optimizer differentiates it (psgd-torch)."""
    start = perf_counter()
    loss = run.optimizer.step(run.loss)
    end = perf_counter()
    run.last_loss = loss.item()
    return None, end - start


# --------------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Switch:
    """Stops preconditioner updates after warm-up by setting one option of the optimizer to ``value``."""

    key: str
    value: float
    in_groups: bool  # True: ``param_groups[*][key]``; False: the optimizer attribute ``key``

    def __call__(self, optimizer: OptimizerLike) -> None:
        if self.in_groups:
            for group in optimizer.param_groups:
                group[self.key] = self.value
        else:
            setattr(optimizer, self.key, self.value)

    def __str__(self) -> str:
        where = f'param_groups[*]["{self.key}"]' if self.in_groups else f"optimizer.{self.key}"
        return f"{where} = {self.value:g}"


@dataclass(frozen=True)
class Config:
    """One timed configuration: how to build its optimizer and run an iteration."""

    name: str
    description: str
    make: Callable[[list[Tensor]], OptimizerLike]
    iterate: Iterate = iterate_backward
    module: str | None = None  # the optional package's import name; None for torch and hf_psgd
    apply_only: Switch | None = None  # applied after warm-up
    state_roots: Callable[[OptimizerLike], object] = lambda optimizer: optimizer.state


def update_and_apply(
    name: str, description: str, make: Callable[[list[Tensor]], OptimizerLike], switch: Switch, **kwargs: Any
) -> list[Config]:
    """The pair ``name`` (preconditioner fitted every step) and ``name-apply`` (only applied after warm-up)."""
    return [
        Config(name, description, make, **kwargs),
        Config(f"{name}-apply", f"{description}; after warm-up {switch}", make, apply_only=switch, **kwargs),
    ]


def make_psgd(params: list[Tensor], curvature: str = "whiten", **options: Any) -> OptimizerLike:
    return PSGD(params, lr=LR, curvature=curvature, precond_update_prob=1.0, **options)


def make_kron_torch(params: list[Tensor]) -> OptimizerLike:
    from kron_torch import Kron

    return Kron(params, lr=LR, preconditioner_update_probability=1.0)


def make_heavyball(params: list[Tensor]) -> OptimizerLike:
    import heavyball

    heavyball.utils.compile_mode = None  # eager: its @decorator_knowngood helpers call the plain function
    return heavyball.PSGDKron(params, lr=LR, preconditioner_update_probability=1.0, compile_step=False)


def make_pytorch_optimizer(params: list[Tensor]) -> OptimizerLike:
    from pytorch_optimizer import Kron

    return Kron(params, lr=LR, pre_conditioner_update_probability=1.0)


def make_psgd_torch(params: list[Tensor], preconditioner_type: str = "whitening") -> OptimizerLike:
    from psgd_torch import Kron

    return Kron(
        params,
        lr_params=LR,
        momentum=0.9,
        preconditioner_update_probability=1.0,
        preconditioner_type=preconditioner_type,
        exact_hessian_vector_product=True,
    )


def psgd_torch_state(optimizer: OptimizerLike) -> object:
    """psgd-torch's Kron is no torch.optim.Optimizer: its state is the factors (with einsum plans) and momentum."""
    return [optimizer._Qs_exprs, optimizer._ms]


def all_configs() -> list[Config]:
    """Every configuration, in table order."""
    heavyball_args = "lr=1e-3, preconditioner_update_probability=1.0, compile_step=False"
    psgd_torch_args = "lr_params=1e-3, momentum=0.9, preconditioner_update_probability=1.0"
    return [
        Config("adamw", "torch.optim.AdamW(lr=1e-3), the baseline", partial(torch.optim.AdamW, lr=LR)),
        *update_and_apply(
            "psgd-kron",
            "hf_psgd PSGD(lr=1e-3, curvature='whiten', precond_update_prob=1.0): fp32 factors applied with the "
            "default apply_dtype (bf16 products where they are native, as with AVX-512; fp32 products elsewhere)",
            make_psgd,
            Switch("precond_update_prob", TINY_PROB, in_groups=True),
        ),
        *update_and_apply(
            "psgd-kron-fp32",
            "hf_psgd PSGD(lr=1e-3, curvature='whiten', precond_update_prob=1.0, apply_dtype='float32'): fp32 products",
            partial(make_psgd, apply_dtype="float32"),
            Switch("precond_update_prob", TINY_PROB, in_groups=True),
        ),
        *update_and_apply(
            "psgd-kron-bf16",
            "hf_psgd PSGD(lr=1e-3, curvature='whiten', precond_update_prob=1.0, apply_dtype='bfloat16'): bf16 "
            "products whether or not they are native here",
            partial(make_psgd, apply_dtype="bfloat16"),
            Switch("precond_update_prob", TINY_PROB, in_groups=True),
        ),
        Config(
            "psgd-kron-bf16fit",
            "hf_psgd PSGD(lr=1e-3, curvature='whiten', precond_update_prob=1.0, fit_dtype='bfloat16'): the fit's "
            "products over the block (A = P h and its Grams) in bf16",
            partial(make_psgd, fit_dtype="bfloat16"),
        ),
        Config(
            "psgd-kron-eq",
            "hf_psgd PSGD(lr=1e-3, curvature='whiten', precond_update_prob=1.0, fit='eq'): the triangular fit, "
            "the default before 0.2 (the default fit='q0.5eq1.5' is psgd_torch's newest: no solves)",
            partial(make_psgd, fit="eq"),
        ),
        Config(
            "psgd-kron-pro4p",
            "hf_psgd PSGD(lr=1e-3, curvature='whiten', precond_update_prob=1.0, fit='pro4p'): psgd_torch's PRO4P, "
            "the factors of P fitted and stored (no Q^T Q), three third-order Procrustes steps a dense factor",
            partial(make_psgd, fit="pro4p"),
        ),
        Config(
            "psgd-kron-hvp",
            "hf_psgd PSGD(lr=1e-3, curvature='hvp', precond_update_prob=1.0); loss.backward(create_graph=True) "
            "in the iteration, H v inside step()",
            partial(make_psgd, curvature="hvp"),
            iterate_psgd_hvp,
        ),
        *update_and_apply(
            "kron-torch",
            "kron_torch.Kron(lr=1e-3, preconditioner_update_probability=1.0)",
            make_kron_torch,
            Switch("preconditioner_update_probability", TINY_PROB, in_groups=True),
            module="kron_torch",
        ),
        *update_and_apply(
            "heavyball",
            f"heavyball.PSGDKron({heavyball_args}), eager: heavyball.utils.compile_mode = None",
            make_heavyball,
            Switch("precond_schedule", 0.0, in_groups=False),
            module="heavyball",
        ),
        *update_and_apply(
            "pytorch-optimizer",
            "pytorch_optimizer.Kron(lr=1e-3, pre_conditioner_update_probability=1.0)",
            make_pytorch_optimizer,
            Switch("pre_conditioner_update_probability", 0.0, in_groups=True),
            module="pytorch_optimizer",
        ),
        *update_and_apply(
            "psgd-torch",
            f"psgd_torch.Kron(preconditioner_type='whitening', {psgd_torch_args}); gradients handed to step(closure)",
            make_psgd_torch,
            Switch("preconditioner_update_probability", 0.0, in_groups=False),
            iterate=iterate_given_gradients,
            module="psgd_torch",
            state_roots=psgd_torch_state,
        ),
        Config(
            "psgd-torch-hvp",
            f"psgd_torch.Kron(preconditioner_type='Newton', exact_hessian_vector_product=True, {psgd_torch_args}); "
            "step(closure) runs forward, grad(create_graph=True) and H v",
            partial(make_psgd_torch, preconditioner_type="Newton"),
            iterate_closure,
            module="psgd_torch",
            state_roots=psgd_torch_state,
        ),
    ]


def select_configs(configs: list[Config], only: str | None) -> list[Config]:
    """The configurations named in ``--only`` (all by default) whose optional package is installed."""
    if only:
        wanted = {name.strip() for name in only.split(",") if name.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in wanted]
    selected = []
    for config in configs:
        if config.module is None or importlib.util.find_spec(config.module) is not None:
            selected.append(config)
        else:
            print(f"skipping {config.name}: package {config.module!r} is not installed")
    return selected


# --------------------------------------------------------------------------------------------- measuring


def prepare(config: Config, warmup: int, d_model: int = D_MODEL) -> Run:
    """Build the model and optimizer from the fixed seed, warm up, switch to apply-only where asked."""
    torch.manual_seed(SEED)
    model = TinyGPT(model_config(d_model))
    run = Run(config, model, config.make(list(model.parameters())), make_batch())
    for _ in range(warmup):
        config.iterate(run)
    if config.apply_only is not None:
        config.apply_only(run.optimizer)
    return run


def measure(runs: list[Run], rounds: int, iters_per_round: int) -> None:
    """Interleaved rounds: every configuration runs ``iters_per_round`` timed iterations per round."""
    for index in range(rounds):
        for run in runs:
            gc.collect()
            for _ in range(iters_per_round):
                step, iteration = run.config.iterate(run)
                if step is not None:
                    run.step_times.append(step)
                run.iteration_times.append(iteration)
        print(f"round {index + 1}/{rounds} done", file=sys.stderr)


def state_bytes(root: object, exclude: Iterable[Tensor] = ()) -> int:
    """``numel * element_size`` summed over the distinct tensors reachable from ``root`` (dicts, lists, tuples)."""
    seen = {_tensor_key(t) for t in exclude}
    total, stack = 0, [root]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            key = _tensor_key(item)
            if key not in seen:
                seen.add(key)
                total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _tensor_key(tensor: Tensor) -> tuple[int, int, torch.dtype]:
    return tensor.data_ptr(), tensor.numel(), tensor.dtype


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    name: str
    step: float | None  # seconds (median)
    iteration: float  # seconds (median)
    state: int  # bytes


def summarise(run: Run) -> Row:
    step = statistics.median(run.step_times) if run.step_times else None
    state = state_bytes(run.config.state_roots(run.optimizer), exclude=run.params())
    return Row(run.config.name, step, statistics.median(run.iteration_times), state)


def amortised_rows(rows: dict[str, Row], prob: float = LONG_RUN_PROB) -> list[Row]:
    """``<family>@prob`` for every family measured both updating every step and apply-only."""
    derived = []
    for name, update in rows.items():
        apply = rows.get(f"{name}-apply")
        if apply is None or update.step is None or apply.step is None:
            continue
        step = apply.step + prob * (update.step - apply.step)
        iteration = apply.iteration + prob * (update.iteration - apply.iteration)
        derived.append(Row(f"{name}@{prob:g}", step, iteration, update.state))
    return derived


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def results_table(rows: list[Row]) -> str:
    base = next((r for r in rows if r.name == "adamw"), None)
    lines = [
        "| config | step ms | iteration ms | step / AdamW step | iteration / AdamW iteration | state MB | "
        "state / AdamW state |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        step_ms = None if row.step is None else 1e3 * row.step
        cells = [
            f"`{row.name}`",
            fmt(step_ms, ".1f"),
            fmt(1e3 * row.iteration, ".1f"),
            fmt(ratio(row.step, base and base.step), ".2f", "×"),
            fmt(ratio(row.iteration, base and base.iteration), ".2f", "×"),
            fmt(row.state / 1e6, ".2f"),
            fmt(ratio(row.state, base and base.state), ".2f", "×"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    what: str
    numerator: str  # row name
    denominator: str  # row name
    metric: str  # "step", "iteration" or "state"
    limit: float


def amortised_target(d_model: int) -> Target:
    """PSGD-Kron's amortised iteration against AdamW's: at most ``AMORTISED_LIMITS[d_model]`` (1.15 for
    other widths)."""
    return Target(
        "PSGD-Kron iteration, default schedule amortised at 0.03 vs AdamW iteration",
        "psgd-kron@0.03",
        "adamw",
        "iteration",
        AMORTISED_LIMITS.get(d_model, 1.15),
    )


TARGETS = (
    Target(
        "PSGD-Kron step, preconditioner updated every step vs psgd-torch Kron step",
        "psgd-kron",
        "psgd-torch",
        "step",
        0.5,
    ),
    Target(
        "PSGD-Kron apply-only step vs psgd-torch Kron apply-only step",
        "psgd-kron-apply",
        "psgd-torch-apply",
        "step",
        0.5,
    ),
    Target("PSGD-Kron optimizer state bytes (fp32) vs AdamW state bytes", "psgd-kron", "adamw", "state", 1.0),
    Target(
        "PSGD-Kron exact-HVP iteration vs psgd-torch Kron exact-HVP (Newton) iteration, both updating every step",
        "psgd-kron-hvp",
        "psgd-torch-hvp",
        "iteration",
        0.8,
    ),
)


def target_lines(rows: dict[str, Row], d_model: int = D_MODEL) -> list[str]:
    lines = []
    for target in (amortised_target(d_model), *TARGETS):
        missing = [name for name in (target.numerator, target.denominator) if name not in rows]
        if missing:
            lines.append(f"- SKIP {target.what}: {', '.join(f'`{name}`' for name in missing)} not measured")
            continue
        value = ratio(getattr(rows[target.numerator], target.metric), getattr(rows[target.denominator], target.metric))
        if value is None:
            lines.append(f"- SKIP {target.what}: no {target.metric} figure to compare")
        else:
            verdict = "PASS" if value <= target.limit else "FAIL"
            lines.append(f"- {verdict} {target.what}: {value:.2f}× (target ≤ {target.limit:g}×)")
    return lines


def psgd_fit_lines(runs: list[Run]) -> list[str]:
    """How often hf_psgd actually fitted its preconditioners (checks the update/apply-only modes)."""
    lines = []
    for run in runs:
        if not isinstance(run.optimizer, PSGD):
            continue
        states = [s for s in run.optimizer.state.values() if "precond_updates" in s]
        steps = sum(s["step"] for s in states)
        fits = sum(s["precond_updates"] for s in states)
        skipped = sum(s["skipped_steps"] for s in states)
        name = run.config.name
        lines.append(f"- `{name}`: preconditioner fitted on {fits} of {steps} block-steps, {skipped} skipped")
    return lines


def environment_line(threads: int, n_params: int, load: float) -> str:
    packages = ("hf_psgd", "kron-torch", "heavyball", "pytorch-optimizer", "psgd-torch", "opt-einsum", "numpy")
    versions = ", ".join(f"{name} {_version(name)}" for name in packages)
    return (
        f"torch {torch.__version__}, threads {threads}, Python {platform.python_version()}, {_cpu_name()}, "
        f"1-minute load average at start {load:.2f}, model {n_params:,} parameters; {versions}"
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(runs: list[Run], args: argparse.Namespace, load: float) -> str:
    measured = [summarise(run) for run in runs]
    rows = measured + amortised_rows({row.name: row for row in measured})
    by_name = {row.name: row for row in rows}
    configurations = [f"- `{run.config.name}`: {run.config.description}" for run in runs]
    configurations.append(f"- `<name>@{LONG_RUN_PROB:g}`: derived, apply + {LONG_RUN_PROB:g} × (update − apply)")
    loss_warnings = [
        f"- WARNING `{run.config.name}`: last loss {run.last_loss}" for run in runs if not math.isfinite(run.last_loss)
    ]
    sections = [
        "# Step cost: PSGD-Kron vs AdamW and the published PSGD-Kron implementations",
        f"Medians over {args.rounds} interleaved rounds × {args.iters_per_round} iterations after {args.warmup} "
        f"warm-up iterations; GPT-2-like model (vocab {VOCAB}, seq {SEQ_LEN}, d_model {args.d_model}, "
        f"{N_LAYERS} layers, {N_HEADS} heads, tied embeddings, batch {BATCH}), CPU, eager (torch.compile disabled).",
        results_table(rows),
        "## Targets\n\n" + "\n".join(target_lines(by_name, args.d_model)),
        "## Configurations\n\n" + "\n".join(configurations),
        "## hf_psgd preconditioner fits\n\n" + "\n".join(psgd_fit_lines(runs) + loss_warnings),
        "## Environment\n\n" + environment_line(args.threads, sum(p.numel() for p in runs[0].params()), load),
    ]
    return "\n\n".join(sections) + "\n"


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--iters-per-round", type=int, default=5, help="timed iterations per configuration per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations (preconditioner fitted) first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--d-model",
        type=int,
        default=D_MODEL,
        help="model width d_model (the amortised target: 1.10x at 256, 1.15x at 768 and other widths)",
    )
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/step_cost.md"), help="Markdown output")
    args = parser.parse_args(argv)
    for name in ("rounds", "iters_per_round", "warmup", "threads", "d_model"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()[0]  # a busy machine (threads competing for cores) distorts every row
    torch.set_num_threads(args.threads)
    torch._dynamo.config.disable = True  # kron-torch's @torch.compile kernels run eagerly
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    configs = select_configs(all_configs(), args.only)
    if not configs:
        raise SystemExit("no configuration to run")
    runs = []
    for config in configs:
        print(f"warming up {config.name}", file=sys.stderr)
        runs.append(prepare(config, args.warmup, args.d_model))
    measure(runs, args.rounds, args.iters_per_round)
    text = report(runs, args, load)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
