"""PSGD by name in ``TrainingArguments``: ``optim="psgd_kron"`` with typed ``optim_args``.

``TrainingArguments.optim`` is a closed enum checked in ``__post_init__`` and turned into argparse
``choices``; there is no plugin registry. :class:`PSGDArgumentsMixin` re-declares ``optim`` as a
plain string (so ``HfArgumentParser`` and YAML accept PSGD names), lets the base class validate
everything else with a built-in name in place of ours, then puts our name back. ``optim_args``
(``"curvature=hvp,precond_lr=0.2"``) is converted to the types of :class:`~hf_psgd.PSGD`'s
arguments and validated by PSGD itself, so a bad key or value fails when the arguments are built.
The update schedule is a number (constant probability) or its keys as ``key:value`` pairs joined by
``;`` (``precond_update_prob=flat_steps:100;decay:0.01``; keys left out keep their defaults).
``curvature=fd`` is refused: Trainer calls ``step()`` without the closure it needs. A Trainer that would
hand a PSGD name to transformers' own optimizer table (plain ``Trainer``, ``SFTTrainer``: transformers
has no public registry of optimizer names) is refused when it is built, naming ``PSGDTrainer``. Without an
accelerator ``dataloader_pin_memory`` defaults to false (pinning needs one). ``learning_rate``
defaults to ``None``: PSGD's default for the chosen curvature with a PSGD name (logged once), the
base class's default (Trainer's 5e-5, ``SFTConfig``'s 2e-5) otherwise; a value given is kept.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..optim import CURVATURE_DEFAULTS, PRECONDITIONERS, PSGD, default_learning_rate

__all__ = [
    "PSGDArgumentsMixin",
    "PSGDTrainingArguments",
    "is_psgd_optimizer_name",
    "optim_args_help",
    "psgd_optimizer_kwargs",
    "psgd_optimizer_names",
]

PREFIX = "psgd_"
#: Options that TrainingArguments sets (learning_rate, weight_decay) or the optimizer name fixes.
_RESERVED = {"params": "", "lr": "learning_rate", "weight_decay": "weight_decay", "preconditioner": "optim"}
_BUILTIN_STAND_IN = "adamw_torch"
logger = logging.getLogger(__name__)


def psgd_optimizer_names() -> list[str]:
    """Every ``optim`` name PSGD answers to: ``psgd_<family>`` for each registered family."""
    return sorted(PREFIX + name for name in PRECONDITIONERS)


def is_psgd_optimizer_name(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _optional(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    return parse


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _schedule(text: str) -> float | dict[str, float]:
    """A constant ``"0.1"`` or ``"flat_steps:100;decay:0.01;min_prob:0.05"`` (PSGD checks the keys)."""
    if ":" not in text:
        return float(text)
    schedule = {}
    for item in text.split(";"):
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"{item!r} is not of the form key:value")
        schedule[key] = float(value)
    return schedule


def _option_parsers() -> dict[str, Any]:
    """A text-to-value parser per PSGD option, derived from its default and annotation."""
    parsers = {}
    for name, (default, annotation) in PSGD.option_specs().items():
        if name in _RESERVED:
            continue
        if isinstance(default, bool) or "bool" in annotation:
            parse = _boolean
        elif type(default) is int:
            parse = int
        elif isinstance(default, dict):
            parse = _schedule
        elif isinstance(default, float) or "float" in annotation:
            parse = float
        else:
            parse = str
        parsers[name] = _optional(parse) if "None" in annotation else parse
    return parsers


def optim_args_help() -> str:
    """The help of ``optim_args``: PSGD's options with their defaults (``PSGD.option_specs()``)."""
    options = []
    for name, (default, annotation) in PSGD.option_specs().items():
        if name in _RESERVED:
            continue
        if isinstance(default, dict):
            value = ";".join(f"{key}:{number:g}" for key, number in default.items())
        else:
            value = f"{default:g}" if isinstance(default, float) else str(default)
        kind = annotation.replace("torch.dtype | ", "").replace(" | None", "")
        kind = " (whiten or hvp)" if name == "curvature" else f" ({kind})" if default is None else ""
        if name in CURVATURE_DEFAULTS["whiten"]:
            values = ", ".join(f"{curvature} {defaults[name]:g}" for curvature, defaults in CURVATURE_DEFAULTS.items())
            kind = f" (float; None: the curvature's, {values})"
        options.append(f"{name}={value}{kind}")
    return (
        "PSGD's options as key=value pairs joined by commas, e.g. 'curvature=hvp,precond_lr=0.2' (the update "
        "schedule precond_update_prob: a number, or its keys as key:value joined by ';'), checked when the arguments "
        "are built; learning_rate and weight_decay have keys of their own. Options and defaults: "
        + ", ".join(options)
        + ". A transformers optimizer takes its own optim_args"
    )


def _parse_optim_args(text: str | None) -> dict[str, Any]:
    parsers = _option_parsers()
    options: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optim_args: {item!r} is not of the form key=value")
        if key in _RESERVED:
            raise ValueError(f"optim_args: {key!r} is set by TrainingArguments.{_RESERVED[key]}, not optim_args")
        if key not in parsers:
            raise ValueError(f"optim_args: unknown key {key!r} for PSGD; allowed keys: {', '.join(sorted(parsers))}")
        try:
            options[key] = parsers[key](value)
        except ValueError as error:
            raise ValueError(f"optim_args: {key}={value!r} is invalid: {error}") from None
    return options


def psgd_optimizer_kwargs(optim: str, optim_args: str | None, learning_rate: float | None) -> dict[str, Any]:
    """Keyword arguments of :class:`~hf_psgd.PSGD` for an ``optim`` name and its ``optim_args``
    (validated: a bad name, key or value raises ``ValueError`` naming it); ``learning_rate=None``
    gives ``lr=None``, the curvature's default."""
    family = optim.removeprefix(PREFIX)
    if family not in PRECONDITIONERS:
        raise ValueError(f"optim={optim!r} is not a PSGD optimizer; choose one of {', '.join(psgd_optimizer_names())}")
    kwargs = {"lr": learning_rate, "preconditioner": family, **_parse_optim_args(optim_args)}
    if kwargs.get("curvature") == "fd":
        raise ValueError(
            "optim_args: curvature='fd' needs step(closure) over a deterministic batch, which Trainer does not "
            "give; use curvature=whiten or curvature=hvp (exact H v, computed by PSGDTrainer)"
        )
    try:
        PSGD([torch.nn.Parameter(torch.zeros(1))], **{**kwargs, "shard_preconditioners": False})  # local: no collective
    except ValueError as error:
        raise ValueError(f"optim_args for {optim}: {error}") from None
    return kwargs


@dataclass
class PSGDArgumentsMixin:
    """Mix into a ``TrainingArguments`` subclass (placed first) to accept PSGD optimizer names (and to
    pin DataLoader memory only where an accelerator can use it)."""

    optim: str = field(
        default=TrainingArguments.__dataclass_fields__["optim"].default,
        metadata={
            "help": "The optimizer: a transformers name (adamw_torch, ...) or a PSGD one: "
            + ", ".join(psgd_optimizer_names())
            + ". PSGD options go in optim_args, e.g. 'curvature=hvp,precond_lr=0.2'."
        },
    )

    optim_args: str | None = field(default=None, metadata={"help": optim_args_help()})

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The initial learning rate. Default: with a PSGD optimizer PSGD's default for its curvature "
            f"(whiten {default_learning_rate('whiten'):g}, hvp and fd {default_learning_rate('hvp'):g}); "
            "otherwise the Trainer's default. From an AdamW rate a, whitening: hf_psgd.learning_rate_from_adamw(a) "
            "= min(2a, 3e-3)"
        },
    )

    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin DataLoader memory; default: true when an accelerator (GPU) is present, else false"},
    )

    def __post_init__(self) -> None:
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.accelerator.is_available()
        name = self.optim
        if not is_psgd_optimizer_name(name):
            if self.learning_rate is None:
                self.learning_rate = _base_default(type(self), "learning_rate")
            super().__post_init__()
            return
        kwargs = psgd_optimizer_kwargs(name, self.optim_args, self.learning_rate)
        if self.learning_rate is None:
            curvature = kwargs.get("curvature", PSGD.option_specs()["curvature"][0])
            self.learning_rate = default_learning_rate(curvature)
            logger.info(
                "learning_rate not given: %g, PSGD's default for curvature=%s (from an AdamW rate: "
                "hf_psgd.learning_rate_from_adamw)",
                self.learning_rate,
                curvature,
            )
        if self.deepspeed:
            raise ValueError(
                f"optim={name!r} does not run under DeepSpeed (deepspeed={self.deepspeed!r}): ZeRO hands the "
                "optimizer flattened partitions, which PSGD's preconditioners cannot use; use FSDP2 (fsdp with "
                "fsdp_config version 2) or DDP"
            )
        self.optim = _BUILTIN_STAND_IN
        try:
            super().__post_init__()
        finally:
            self.optim = name
        self._refuse_unsupported_fsdp(kwargs.get("curvature", PSGD.option_specs()["curvature"][0]))

    def get_process_log_level(self) -> int:
        """The base class's log level. ``Trainer.__init__`` asks for it first, so a Trainer that would
        pass a PSGD name to transformers' optimizer table is refused here (:func:`_refuse_foreign_trainer`)."""
        _refuse_foreign_trainer(self.optim, sys._getframe(1))
        return super().get_process_log_level()

    def _refuse_unsupported_fsdp(self, curvature: str) -> None:
        """FSDP1 (flat parameters) and ``H v`` under FSDP2, refused before the model is touched, in one
        line that says what works."""
        if not self.fsdp:
            return
        version = int((self.fsdp_config or {}).get("version", 2))
        if version != 2:
            raise ValueError(
                f"optim={self.optim!r} with fsdp_config version={version}: FSDP1 flattens the parameters, which "
                "PSGD's preconditioners cannot use; use version 2 (FSDP2) or DDP"
            )
        if curvature != "whiten":
            raise ValueError(
                f"optim_args curvature={curvature} is not supported with fsdp: H v needs gradients with respect to "
                "the whole parameters, which FSDP2 gathers only inside forward and backward; use curvature=whiten "
                "under fsdp, or DDP"
            )


def _refuse_foreign_trainer(optim: Any, caller: Any) -> None:
    """Raise if ``caller`` (a frame) is the ``__init__`` of a Trainer that would look the PSGD name ``optim``
    up in transformers' table of built-in optimizers and fail at ``train()``: one that does not answer
    names itself (no ``get_optimizer_cls_and_kwargs`` of its own, as ``PSGDTrainerMixin`` has) and is
    given no optimizer (its ``optimizers`` and ``optimizer_cls_and_kwargs`` arguments)."""
    trainer, given = caller.f_locals.get("self"), caller.f_locals
    if not is_psgd_optimizer_name(optim) or not isinstance(trainer, Trainer) or caller.f_code.co_name != "__init__":
        return
    answers_names = type(trainer).get_optimizer_cls_and_kwargs is not Trainer.get_optimizer_cls_and_kwargs
    optimizer_given = given.get("optimizer_cls_and_kwargs") is not None or (given.get("optimizers") or (None,))[0]
    if not answers_names and not optimizer_given:
        name = type(trainer).__name__
        raise ValueError(
            f"optim={optim!r} needs hf_psgd.PSGDTrainer (hf_psgd.PSGDSFTTrainer for TRL, or PSGDTrainerMixin first "
            f"in the bases of {name}): {name} hands optimizer names to transformers, which does not know PSGD's"
        )


def _base_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` in the first base of ``cls`` after the mixin that declares it."""
    bases = cls.__mro__[cls.__mro__.index(PSGDArgumentsMixin) + 1 :]
    for base in bases:
        declared = {f.name: f for f in fields(base)} if "__dataclass_fields__" in vars(base) else {}
        if name in declared:
            return declared[name].default
    raise AttributeError(f"no base of {cls.__name__} declares {name!r}")


@dataclass
class PSGDTrainingArguments(PSGDArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` that also accept ``optim="psgd_kron"`` (and every other PSGD family)."""
