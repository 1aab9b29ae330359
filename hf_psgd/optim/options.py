"""PSGD's options: the shell's own and every family's, merged into one param-group dict.

A family declares its options as a frozen dataclass subclassing
:class:`~.validation.FamilyOptions` (defaults and validation in its own module); the shell merges
every registered family's fields into its ``defaults``, so any option can be set per param group.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from .curvature import CURVATURES
from .preconditioners import PRECONDITIONERS, family_option_fields, get_preconditioner
from .schedules import validate_schedule
from .validation import check, dtype_name, is_int, is_number, refuse_unknown

__all__ = [
    "ADAMW_LR_MULTIPLIER",
    "CURVATURE_DEFAULTS",
    "DEFAULT_LEARNING_RATES",
    "MAX_LR_FROM_ADAMW",
    "check_param_group",
    "default_learning_rate",
    "fill_missing_options",
    "learning_rate_from_adamw",
    "merge_defaults",
    "option_specs",
    "validate_group",
]

#: Options given as ``None`` resolve to these, per curvature, in each param group at construction. Whitening
#: steps ``P m`` are RMS-normalised like Adam's, so Adam-sized rates suit them (3e-3: the better of 1e-3 and 3e-3
#: on all six of the suite's whitening tasks trained from scratch), and its fit follows a moving gradient covariance
#: (``precond_lr`` 0.2); ``hvp`` / ``fd`` steps are Newton-type (``P ~ |H|^-1``: parameter units; rate 0.3:
#: 0.6 blew up a LoRA fine-tune), fitted more slowly to a less noisy target, and damped
#: (``P -> |H + damping I|^-1``) so that they stay bounded where the curvature vanishes (a classifier that has
#: memorised its data). Chosen on the quality suite (``scripts/README.md``).
CURVATURE_DEFAULTS: dict[str, dict[str, float]] = {
    "whiten": {"lr": 3e-3, "precond_lr": 0.2, "damping": 1e-9},
    "hvp": {"lr": 0.3, "precond_lr": 0.1, "damping": 1e-2},
    "fd": {"lr": 0.3, "precond_lr": 0.1, "damping": 1e-2},
}

#: ``lr=None`` resolves to these (the ``lr`` column of :data:`CURVATURE_DEFAULTS`).
DEFAULT_LEARNING_RATES = {curvature: defaults["lr"] for curvature, defaults in CURVATURE_DEFAULTS.items()}


def default_learning_rate(curvature: str) -> float:
    """PSGD's learning rate when none is given, for a curvature source (:data:`DEFAULT_LEARNING_RATES`)."""
    check("curvature", curvature, curvature in DEFAULT_LEARNING_RATES, f"one of {list(DEFAULT_LEARNING_RATES)}")
    return DEFAULT_LEARNING_RATES[curvature]


#: The rule from AdamW's learning rate ``a`` to PSGD's with whitening: ``min(2 a, 3e-3)``
#: (:func:`learning_rate_from_adamw`).
ADAMW_LR_MULTIPLIER = 2.0
#: the rule's ceiling, whitening's default rate: on the quality suite PSGD's best rate was 3e-3 on four of five
#: tasks where AdamW's was 3e-3 or more
MAX_LR_FROM_ADAMW = DEFAULT_LEARNING_RATES["whiten"]


def learning_rate_from_adamw(adamw_lr: float, curvature: str = "whiten") -> float:
    """PSGD's learning rate for a task on which AdamW trains well at ``adamw_lr``. With whitening, whose steps
    are RMS-normalised like Adam's: ``min(2 adamw_lr, 3e-3)``. Twice AdamW's rate, because the whitened
    direction allows larger steps (on the quality suite PSGD's best rate was 1.5-3x AdamW's on the language
    models and 2x on the pretrained fine-tune), but at most 3e-3, whitening's default rate: where AdamW's best
    was 3e-3 or 1e-2, PSGD's was 3e-3 on four of five tasks, and 6e-3 blew up a LoRA fine-tune
    (``scripts/README.md``, ninth ablation). ``hvp`` / ``fd`` steps are Newton-type, with no AdamW
    counterpart: the curvature's default."""
    check("adamw_lr", adamw_lr, is_number(adamw_lr) and adamw_lr > 0, "a finite number > 0")
    if curvature == "whiten":
        return min(ADAMW_LR_MULTIPLIER * float(adamw_lr), MAX_LR_FROM_ADAMW)
    return default_learning_rate(curvature)


#: param-group keys that are not options: torch.optim's own, learning-rate schedulers', a label
_OTHER_GROUP_KEYS = ("params", "param_names", "initial_lr", "name")


def merge_defaults(shell: Mapping[str, Any], family_options: Mapping[str, Any]) -> dict[str, Any]:
    """The shell's options plus every registered family's (given, else its default)."""
    fields = family_option_fields()
    refuse_unknown(family_options, fields, "option")
    return {**shell, **{name: family_options.get(name, field.default) for name, field in fields.items()}}


def option_specs(init: Callable[..., None]) -> dict[str, tuple[Any, str]]:
    """Every option's ``(default, annotation)``: the keyword arguments of ``init`` with a default,
    and every registered family's fields."""
    parameters = inspect.signature(init).parameters.values()
    specs = {p.name: (p.default, str(p.annotation)) for p in parameters if p.default is not inspect.Parameter.empty}
    specs.update({name: (field.default, str(field.type)) for name, field in family_option_fields().items()})
    return specs


def fill_missing_options(groups: list[dict[str, Any]], defaults: Mapping[str, Any]) -> None:
    """Give loaded param groups the options they lack (saved before those options existed) their
    defaults, then validate them: such a checkpoint resumes with the old behaviour of every option it has."""
    for group in groups:
        for name, value in defaults.items():
            group.setdefault(name, value)
        validate_group(group)


def check_param_group(group: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse, before ``torch.optim`` takes it, a param group without ``params``, with an unknown key,
    with a parameter listed twice, or with a complex parameter (normalises ``params`` to a list)."""
    if not isinstance(group, Mapping) or "params" not in group:
        raise ValueError("PSGD got a param group without 'params': expected a dict like {'params': [...], 'lr': 0.1}")
    refuse_unknown(group, [*defaults, *_OTHER_GROUP_KEYS], "param group key")
    params = group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    if len({id(p) for p in params}) != len(params):
        raise ValueError("PSGD got a parameter more than once in a param group: list each parameter once")
    for p in params:
        if isinstance(p, Tensor) and p.is_complex():
            raise ValueError(
                f"PSGD got a complex parameter of shape {tuple(p.shape)}: its preconditioners are real; keep a real "
                "parameter (torch.view_as_real) and view it as complex in the forward (torch.view_as_complex)"
            )
    group["params"] = params


def validate_group(group: dict[str, Any]) -> None:
    """Check one param group's options (the shell's and every family's), normalising in place."""
    _validate_shell_options(group)
    get_preconditioner(group["preconditioner"])
    for family in PRECONDITIONERS.values():
        family.options.from_group(group)


def _validate_shell_options(group: dict[str, Any]) -> None:
    num = is_number
    curvature = group["curvature"]
    check("curvature", curvature, curvature in CURVATURES, f"one of {list(CURVATURES)}")
    for name, value in CURVATURE_DEFAULTS[curvature].items():
        if group[name] is None:
            group[name] = value
    lr = group["lr"]
    check("lr", lr, num(lr) and lr >= 0, "None (the curvature's default) or a finite number >= 0")
    check("momentum", group["momentum"], num(group["momentum"]) and 0 <= group["momentum"] < 1, "a number in [0, 1)")
    wd = group["weight_decay"]
    check("weight_decay", wd, num(wd) and wd >= 0, "a finite number >= 0")
    mu = group["precond_lr"]
    check("precond_lr", mu, num(mu) and 0 < mu <= 1, "None (the curvature's default) or a number in (0, 1]")
    beta = group["lipschitz_beta"]
    check("lipschitz_beta", beta, num(beta) and 0 <= beta < 1, "a number in [0, 1)")
    group["precond_update_prob"] = validate_schedule(group["precond_update_prob"])
    scale = group["precond_init_scale"]
    check("precond_init_scale", scale, scale is None or (num(scale) and scale > 0), "None or a finite number > 0")
    rms = group["max_update_rms"]
    check("max_update_rms", rms, rms is None or (num(rms) and rms > 0), "None (no guard) or a finite number > 0")
    amplitude = group["max_update_amplitude"]
    check(
        "max_update_amplitude",
        amplitude,
        amplitude is None or (num(amplitude) and amplitude > 0),
        "None (no clip) or a finite number > 0",
    )
    growth = group["max_update_growth"]
    check(
        "max_update_growth",
        growth,
        growth is None or (num(growth) and growth >= 1),
        "None (no cap) or a finite number >= 1",
    )
    floor = group["adam_floor"]
    check("adam_floor", floor, floor is None or (num(floor) and floor >= 0), "None (no floor) or a finite number >= 0")
    damping = group["damping"]
    check("damping", damping, num(damping) and damping >= 0, "None (the curvature's default) or a finite number >= 0")
    whiten_momentum = group["whiten_momentum"]
    check("whiten_momentum", whiten_momentum, isinstance(whiten_momentum, bool), "True or False")
    secant = group["secant_pairs"]
    check("secant_pairs", secant, isinstance(secant, bool), "True or False")
    check(
        "secant_pairs",
        secant,
        not secant or curvature != "whiten",
        "False with curvature='whiten' (a secant pair samples the Hessian, which whitening does not fit): "
        "use curvature='hvp' or 'fd'",
    )
    group["precond_dtype"] = dtype_name(group["precond_dtype"], "precond_dtype")
    check("seed", group["seed"], is_int(group["seed"]), "an int")
    compiled = group["compile_kernels"]
    check("compile_kernels", compiled, isinstance(compiled, bool), "True or False")
