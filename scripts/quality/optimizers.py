"""The optimizers the suite compares: AdamW, hf_psgd's PSGD and the published PSGD-Kron anchors.

* ``adamw``: ``torch.optim.AdamW(lr=lr, weight_decay=0)`` (no optimizer gets weight decay);
* ``psgd``: ``hf_psgd.PSGD(params, lr=lr, **options)``, ``options`` being the task's own (e.g. curvature) and
  ``--psgd-options``; with a curvature other than whitening the loss goes to ``step(closure)``;
* ``kron-torch``: ``kron_torch.Kron(lr=lr)``, its defaults (update probability flat for 500 steps, then
  ``exp(-0.001 (t - 500))``, floor 0.03);
* ``heavyball``: ``heavyball.PSGDKron(lr=lr, compile_step=False)`` with ``heavyball.utils.compile_mode = None``;
* ``psgd-torch``: ``psgd_torch.Kron(lr_params=lr, momentum=0.9, preconditioner_type="whitening")`` (0.6.1: the
  preconditioner is fitted on every step; it is no ``torch.optim.Optimizer`` and differentiates the closure).

The anchors are optional (``pip install -e '.[anchors]'``); torch.compile is disabled for all (kron-torch's
compiled kernels run eagerly), as in ``bench_step_cost.py``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_step_cost import TINY_PROB, Switch
from torch import Tensor

import hf_psgd
from hf_psgd import PSGD
from hf_psgd.integrations.arguments import psgd_optimizer_kwargs

OptimizerLike = Any  # a torch.optim.Optimizer, or psgd-torch's Kron, which is not one
UpdateSchedule = float | Mapping[str, float]  # hf_psgd.optim.schedules' form: p(t) of a preconditioner fit


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer at a learning rate and drive it.

    ``closure``: ``step(closure)`` computes the gradient itself (the loop does not call ``backward``).
    ``apply_only`` and ``update_schedule`` serve the time estimate: the switch that stops preconditioner fits,
    and the probability of a fit at step ``t``."""

    name: str
    description: str
    make: Callable[[list[Tensor], float], OptimizerLike]
    distribution: str | None = None  # the optional package (PyPI name); None for torch and hf_psgd
    module: str | None = None  # its import name
    closure: bool = False
    apply_only: Switch | None = None
    update_schedule: UpdateSchedule = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)
    own_runs: bool = False  # runs depend on the task's PSGD options (curvature): not shared with its baseline task

    def installed(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None

    def version(self) -> str:
        """The anchor package's version, hf_psgd's optimizer code hash, or torch's version."""
        if self.distribution:
            return importlib.metadata.version(self.distribution)
        return psgd_code_hash() if self.name == "psgd" else torch.__version__


def set_learning_rate(optimizer: OptimizerLike, lr: float) -> None:
    """Sets ``lr`` in every param group (psgd-torch: its ``lr_params``)."""
    if hasattr(optimizer, "param_groups"):
        for group in optimizer.param_groups:
            group["lr"] = lr
    else:
        optimizer.lr_params = lr


class _DropStrings(ast.NodeTransformer):
    """Removes every statement that is a bare string (docstrings): it cannot change what the code does."""

    def visit_Expr(self, node: ast.Expr) -> ast.Expr | None:
        is_string = isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        return None if is_string else node


def code_hash(root: Path) -> str:
    """A short hash of the Python code under ``root``: each file's syntax tree without its docstrings, so
    docstrings, comments and formatting leave it unchanged and any change to what the code does moves it."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        tree = _DropStrings().visit(ast.parse(path.read_text()))
        digest.update(str(path.relative_to(root)).encode() + ast.dump(tree).encode())
    return digest.hexdigest()[:10]


@functools.cache
def psgd_code_hash() -> str:
    """A short hash of hf_psgd's optimizer code (:func:`code_hash`): PSGD results are reused only while the
    code is unchanged. Taken once per process, when the suite starts (the code it imported then), so an edit
    while it runs does not file its later runs under the edited code's hash."""
    return code_hash(Path(hf_psgd.__file__).parent / "optim")


def parse_psgd_options(text: str | None, task_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``key=value,...`` as PSGD keyword arguments, typed and validated as ``optim_args`` are in the Trainer
    integration, together with a task's own ``task_options`` (e.g. ``curvature="hvp"``, under which an option
    such as ``secant_pairs`` is valid), which the result leaves out unless ``text`` sets them; ``preconditioner``
    and ``weight_decay`` are accepted too."""
    items = [item for item in (text or "").replace(" ", "").split(",") if item]
    values = {key: value for key, _, value in (item.partition("=") for item in items)}
    family, decay = values.get("preconditioner"), values.get("weight_decay")
    rest = [item for item in items if item.partition("=")[0] not in ("preconditioner", "weight_decay")]
    inherited = {key: value for key, value in (task_options or {}).items() if key not in values}
    optim_args = ",".join([f"{key}={value}" for key, value in inherited.items()] + rest)
    options = psgd_optimizer_kwargs(f"psgd_{family or 'kron'}", optim_args, 1.0)
    for key in ("lr", *inherited, *(() if family else ("preconditioner",))):
        del options[key]
    if decay is not None:
        options["weight_decay"] = float(decay)
    return options


def psgd_spec(options: Mapping[str, Any]) -> OptimizerSpec:
    """hf_psgd's PSGD at its defaults but ``lr`` and ``options``."""
    options = dict(options)
    shown = ", ".join(f"{key}={value!r}" for key, value in sorted(options.items()))
    defaults = PSGD.option_specs()["precond_update_prob"][0]
    return OptimizerSpec(
        "psgd",
        f"hf_psgd.PSGD(params, lr{', ' + shown if shown else ''})",
        lambda params, lr: PSGD(params, lr=lr, **options),
        closure=options.get("curvature", "whiten") != "whiten",
        apply_only=Switch("precond_update_prob", TINY_PROB, in_groups=True),
        update_schedule=options.get("precond_update_prob", defaults),
        options=options,
        own_runs=True,
    )


def make_kron_torch(params: list[Tensor], lr: float) -> OptimizerLike:
    from kron_torch import Kron

    return Kron(params, lr=lr)


def make_heavyball(params: list[Tensor], lr: float) -> OptimizerLike:
    import heavyball

    heavyball.utils.compile_mode = None  # eager: its @decorator_knowngood helpers call the plain function
    return heavyball.PSGDKron(params, lr=lr, compile_step=False)


def make_psgd_torch(params: list[Tensor], lr: float, preconditioner_type: str = "whitening") -> OptimizerLike:
    from psgd_torch import Kron

    return Kron(params, lr_params=lr, momentum=0.9, preconditioner_type=preconditioner_type)


def anchor_specs() -> list[OptimizerSpec]:
    """The published PSGD-Kron implementations, each at its defaults but the learning rate."""
    return [
        OptimizerSpec(
            "kron-torch",
            "kron_torch.Kron(params, lr)",
            make_kron_torch,
            "kron-torch",
            "kron_torch",
            apply_only=Switch("preconditioner_update_probability", TINY_PROB, in_groups=True),
            update_schedule={"flat_steps": 500, "decay": 0.001, "min_prob": 0.03},
        ),
        OptimizerSpec(
            "heavyball",
            "heavyball.PSGDKron(params, lr, compile_step=False), heavyball.utils.compile_mode = None",
            make_heavyball,
            "heavyball",
            "heavyball",
            apply_only=Switch("precond_schedule", 0.0, in_groups=False),
            update_schedule={"flat_steps": 1000, "decay": -math.log(0.999), "min_prob": 0.03},
        ),
        OptimizerSpec(
            "psgd-torch",
            "psgd_torch.Kron(params, lr_params=lr, momentum=0.9, preconditioner_type='whitening'), step(closure)",
            make_psgd_torch,
            "psgd-torch",
            "psgd_torch",
            closure=True,
            apply_only=Switch("preconditioner_update_probability", 0.0, in_groups=False),
        ),
    ]


ADAMW = OptimizerSpec(
    "adamw",
    "torch.optim.AdamW(params, lr, weight_decay=0)",
    lambda params, lr: torch.optim.AdamW(params, lr, weight_decay=0.0),
)

#: psgd-torch's Kron fitted on exact H v (its Newton type, the default): the anchor of the same curvature on the
#: exact-H v tasks (``Task.newton_anchor_lrs``); its runs are the task's own
PSGD_TORCH_NEWTON = OptimizerSpec(
    "psgd-torch-newton",
    "psgd_torch.Kron(params, lr_params=lr, momentum=0.9, preconditioner_type='Newton'), exact H v, step(closure); "
    "on the exact-H v tasks only",
    functools.partial(make_psgd_torch, preconditioner_type="Newton"),
    "psgd-torch",
    "psgd_torch",
    closure=True,
    apply_only=Switch("preconditioner_update_probability", 0.0, in_groups=False),
    own_runs=True,
)

ANCHOR_NAMES = ("kron-torch", "heavyball", "psgd-torch", PSGD_TORCH_NEWTON.name)
OPTIMIZER_NAMES = ("adamw", "psgd", *ANCHOR_NAMES)
