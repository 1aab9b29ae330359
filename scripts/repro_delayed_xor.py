"""Delayed XOR with a small RNN: success rate of PSGD-LRA (exact H v) against AdamW and SGD by sequence length.

Problem (Li's PSGD paper, arXiv 2402.04553, and psgd_torch's ``rnn_xor_problem`` demos): a sequence of
length T of pairs (value, marker); the values are random signs (+-1), the markers are 0 except at two
positions, one drawn in ``[0, 0.1 T)`` and one in ``[0.1 T, 0.5 T)``; the label, read at the last step, is the
XOR of the signs at the two marked positions. Every iteration draws a fresh batch of 128 sequences (the
same stream for every method at a given seed and length); the loss is the logistic loss of the output at the
last step (ln 2 = 0.693 at chance). A run succeeds when the accuracy on a fixed held-out batch of 1024
sequences reaches 99% (checked every 10 iterations) within the budget (``--budget``, default 3000
iterations); it fails at the budget or when the loss is no longer finite.

Model (as psgd_torch's demo): vanilla tanh RNN (``torch.nn.RNN``), 2 inputs, hidden 30, a linear readout of
the last hidden state (1021 parameters); recurrent matrix initialised orthogonal, input and readout weights
N(0, 0.1^2), biases 0. ``--cell lstm``: ``torch.nn.LSTM`` (hidden 30, forget-gate bias 1), about 4x as slow
per PSGD iteration.

Methods (same initialisation and data per seed):

* hf_psgd ``PSGD(preconditioner="lra", rank=10, curvature="hvp")`` through ``step(closure)``, one
  preconditioner over all parameters, fitted on every step (``precond_update_prob=1``), ``precond_lr=0.1``,
  no momentum (as the demo), default update guard ``max_update_rms=1.1``, and, as the paper's demos, next to no
  damping (``damping=1e-9``) and no growth cap (``max_update_growth=None``): with damping 1e-2 and a growth cap
  of 2.0 (the ``hvp`` defaults when measured; the cap is 1.3 since, tighter) one seed of three solves T = 32
  within the budget at lr 0.05, two without them (``scripts/README.md``); the probe ``seed`` is the run's seed;
* ``torch.optim.AdamW`` (``weight_decay=0``);
* ``torch.optim.SGD`` with momentum 0.9.

Each method's learning rate is the best of a small grid (``LR_GRID``) on seed 0 at the shortest length (best =
fewest iterations to success, then lowest final held-out loss); those seed-0 runs count as the seed-0 results
there. Budget: one PSGD iteration (gradient and H v, double backward through T steps) costs about 0.33 T ms on
one CPU thread, an AdamW/SGD iteration about 0.08 T ms; to keep the default run within about 10 minutes on
one thread, it uses 3 seeds, a budget of 3000 iterations (psgd_torch's demos allow up to 100 000) and a method
stops at the first length where it solved no seed: longer lengths are counted as failures without running
them (marked "skipped"; ``--all-lengths`` runs them). Outputs: ``--out-dir/delayed_xor.md`` (success rate and
median iterations to success per method and length) and ``--out-dir/delayed_xor.png`` (success rate against
length; held-out loss against iteration at the shortest length, seed 0). ``--quick`` is a smoke run (lengths
8 and 16, 1 seed, 30 iterations, no grid).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hf_psgd import PSGD

BATCH = 128
HIDDEN = 30
HELD_OUT = 1024
CHECK_EVERY = 10
TARGET_ACCURACY = 0.99
LENGTHS = (32, 55, 64, 112)
LR_GRID = {
    "PSGD-LRA (hvp, rank 10)": [0.02, 0.05, 0.1],
    "AdamW": [1e-3, 3e-3, 1e-2],
    "SGD momentum 0.9": [0.03, 0.1, 0.3],
}


def sequences(length: int, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs ``(length, batch, 2)`` and 0/1 labels ``(batch,)``."""
    x = torch.zeros(length, batch, 2)
    x[:, :, 0] = torch.randint(0, 2, (length, batch), generator=generator) * 2.0 - 1.0
    first = (torch.rand(batch, generator=generator) * 0.1 * length).long()
    second = (torch.rand(batch, generator=generator) * 0.4 * length + 0.1 * length).long()
    rows = torch.arange(batch)
    x[first, rows, 1] = 1.0
    x[second, rows, 1] = 1.0
    return x, (x[first, rows, 0] != x[second, rows, 0]).float()


class Recurrent(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, HIDDEN) if cell == "rnn" else nn.LSTM(2, HIDDEN)
        self.readout = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            self.rnn.weight_ih_l0.normal_(0.0, 0.1)
            if cell == "rnn":
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
            else:
                self.rnn.weight_hh_l0.normal_(0.0, 0.1)
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
            if cell == "lstm":
                self.rnn.bias_ih_l0[HIDDEN : 2 * HIDDEN] = 1.0  # forget gate (PyTorch's gate order i, f, g, o)
            self.readout.weight.normal_(0.0, 0.1)
            self.readout.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.rnn(x)[0][-1]).squeeze(1)


@dataclass
class Run:
    iterations: int | None  # to success; None: not reached
    held_out_loss: list[float]  # every CHECK_EVERY iterations


def train(method: str, lr: float, length: int, seed: int, budget: int, cell: str) -> Run:
    torch.manual_seed(seed)
    model = Recurrent(cell)
    params = list(model.parameters())
    if method.startswith("PSGD"):
        opt = PSGD(
            params,
            lr=lr,
            preconditioner="lra",
            rank=10,
            curvature="hvp",
            momentum=0.0,
            precond_update_prob=1.0,
            damping=1e-9,
            max_update_growth=None,
            seed=seed,
        )
    elif method == "AdamW":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    data = torch.Generator().manual_seed(1000 * seed + length)
    x_held, y_held = sequences(length, HELD_OUT, torch.Generator().manual_seed(10**6 + length))
    held_out_loss: list[float] = []
    for iteration in range(1, budget + 1):
        x, y = sequences(length, BATCH, data)
        if isinstance(opt, PSGD):
            loss = opt.step(lambda x=x, y=y: F.binary_cross_entropy_with_logits(model(x), y))
        else:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
        if not math.isfinite(loss.item()):
            break
        if iteration % CHECK_EVERY == 0:
            with torch.no_grad():
                logits = model(x_held)
            held_out_loss.append(F.binary_cross_entropy_with_logits(logits, y_held).item())
            if ((logits > 0).float() == y_held).float().mean().item() >= TARGET_ACCURACY:
                return Run(iteration, held_out_loss)
    return Run(None, held_out_loss)


def _sort_key(run: Run) -> tuple[float, float]:
    final = run.held_out_loss[-1] if run.held_out_loss else math.inf
    return (math.inf if run.iterations is None else run.iterations, final if math.isfinite(final) else math.inf)


@dataclass
class Result:
    lr: float
    runs: dict[int, list[Run]]  # length -> per seed (missing: skipped)


def evaluate(
    method: str, lengths: list[int], seeds: int, budget: int, cell: str, grid: list[float], run_all: bool
) -> Result:
    """The learning rate chosen on seed 0 at the shortest length, then every seed at every length (stopping
    after a length with no success unless ``run_all``)."""
    began = time.perf_counter()
    probes = {lr: train(method, lr, lengths[0], 0, budget, cell) for lr in grid}
    lr = min(grid, key=lambda lr: _sort_key(probes[lr]))
    result = Result(lr, {})
    for length in lengths:
        runs = [probes[lr] if length == lengths[0] else train(method, lr, length, 0, budget, cell)]
        runs += [train(method, lr, length, seed, budget, cell) for seed in range(1, seeds)]
        result.runs[length] = runs
        print(
            f"{method:24s} lr={lr:g} T={length:3d}: {_cell(runs, seeds)} ({time.perf_counter() - began:.0f}s)",
            flush=True,
        )
        if not run_all and all(run.iterations is None for run in runs):
            break
    return result


def _cell(runs: list[Run] | None, seeds: int) -> str:
    if runs is None:
        return f"0/{seeds} (skipped)"
    done = sorted(run.iterations for run in runs if run.iterations is not None)
    text = f"{len(done)}/{len(runs)}"
    return f"{text}, median {statistics.median(done):.0f} it" if done else text


def report(results: dict[str, Result], lengths: list[int], seeds: int, notes: list[str]) -> str:
    lines = [
        "| method | lr | " + " | ".join(f"T = {t}: solved, median iterations" for t in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for name, result in results.items():
        cells = [_cell(result.runs.get(length), seeds) for length in lengths]
        lines.append(f"| {name} | {result.lr:g} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *[f"- {n}" for n in notes]]) + "\n"


def plot(results: dict[str, Result], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, result in results.items():
        run = [t for t in lengths if t in result.runs]
        rates = [sum(r.iterations is not None for r in result.runs[t]) / len(result.runs[t]) for t in run]
        line = rate_ax.plot(run, rates, "o-", label=name)[0]
        skipped = [t for t in lengths if t not in result.runs]
        rate_ax.plot(skipped, [0.0] * len(skipped), "o", mfc="none", color=line.get_color())
        curve = result.runs[lengths[0]][0].held_out_loss
        loss_ax.semilogy([CHECK_EVERY * (i + 1) for i in range(len(curve))], curve, label=f"{name}, lr={result.lr:g}")
    rate_ax.set(title="delayed XOR: success rate (hollow: skipped)", xlabel="sequence length T", ylabel="solved")
    rate_ax.set(xticks=lengths, ylim=(-0.05, 1.05))
    loss_ax.set(title=f"held-out loss, T = {lengths[0]}, seed 0", xlabel="iteration", ylabel="logistic loss")
    for ax in (rate_ax, loss_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=3000, help="iterations per run")
    parser.add_argument("--cell", choices=("rnn", "lstm"), default="rnn")
    parser.add_argument(
        "--all-lengths", action="store_true", help="run every length even after a length with no success"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: lengths 8 and 16, 1 seed, 30 iterations")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.seeds, args.budget, args.all_lengths = [8, 16], 1, 30, True
    lengths = sorted(args.lengths)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="PSGD skipped a step")
    began = time.perf_counter()
    results = {
        name: evaluate(
            name, lengths, args.seeds, args.budget, args.cell, grid[1:2] if args.quick else grid, args.all_lengths
        )
        for name, grid in LR_GRID.items()
    }
    notes = [
        f"solved: seeds (of {args.seeds}) whose held-out accuracy reached {TARGET_ACCURACY:.0%} within "
        f"{args.budget} iterations (batch {BATCH}); median iterations over the solved seeds",
        f"model: {args.cell} with hidden size {HIDDEN}; lr: best of {LR_GRID} on seed 0 at T = {lengths[0]}",
        "PSGD-LRA: curvature='hvp' via step(closure), rank=10, precond_lr=0.1, precond_update_prob=1, momentum=0, "
        "max_update_rms=1.1, damping=1e-9, max_update_growth=None",
        "skipped: not run because the method solved no seed at a shorter length (counted as failures)",
        f"wall time {time.perf_counter() - began:.0f} s",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, lengths, args.out_dir / "delayed_xor.png")
    text = report(results, lengths, args.seeds, notes)
    (args.out_dir / "delayed_xor.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
