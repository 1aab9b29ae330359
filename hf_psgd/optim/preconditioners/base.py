"""The interface every preconditioner family implements, and the registry of families by name.

A family fits ``P = Q^T Q`` for one *block* of parameters from pairs ``(v, h)`` by the
noise-robust criterion ``E[h^T P h + v^T P^{-1} v]`` (Li 2015), moving ``Q`` on a Lie group with
a normalised multiplicative step. A block is one tensor (``scope = "tensor"``: Kron, Diag) or the
concatenation of all parameters of a param group flattened to a vector (``scope = "group"``: the
paper's whole-vector families). The family keeps its state in a plain ``dict`` of tensors, lists of
tensors and numbers (``torch.load(weights_only=True)`` must be able to read it back).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..validation import FamilyOptions

__all__ = [
    "PRECONDITIONERS",
    "Preconditioner",
    "family_option_fields",
    "finite_sums",
    "get_preconditioner",
    "register_preconditioner",
    "tensor_shapes",
    "update_lipschitz",
]


#: a bound above ``LIPSCHITZ_JUMP`` times the running ``L`` moves ``L`` only that far (see :func:`update_lipschitz`)
LIPSCHITZ_JUMP = 10.0


def update_lipschitz(lipschitz: Tensor, bound: Tensor, beta: float) -> Tensor:
    """``L <- max(beta L + (1 - beta) l', l')`` in place, with ``l`` a lower bound of the curvature
    of the fitting criterion along the step and ``l' = min(l, LIPSCHITZ_JUMP L)`` (``l`` while ``L``
    is 0); returns ``max(L, l)``, the bound that normalises this step. ``precond_lr / max(L, l)`` is a
    step size that is dimensionless and safe for any ``precond_lr`` in ``(0, 1]``; the EMA
    (``beta > 0``) smooths noisy bounds (whitening), ``beta = 0`` reacts at once (exact ``H v``).
    Capping what one bound adds keeps a single spike of the gradients from holding ``L`` up (and
    the fit's step down) for hundreds of fits; a lasting change of scale is followed by a factor
    ``LIPSCHITZ_JUMP`` per fit."""
    limited = torch.where(lipschitz > 0, torch.minimum(bound, lipschitz * LIPSCHITZ_JUMP), bound)
    torch.maximum(lipschitz.mul_(beta).add_(limited, alpha=1 - beta), limited, out=lipschitz)
    return torch.maximum(lipschitz, bound)


def finite_sums(tensor: Tensor, batch: int = 0) -> Tensor:
    """Whether ``tensor`` (each stacked tensor, with ``batch`` leading dims) is finite, read from its sum in
    one pass: a NaN or Inf makes the sum non-finite (so does a sum that overflows: a fit no one wants)."""
    return tensor.flatten(batch).sum(-1).isfinite()


class Preconditioner(ABC):
    """One preconditioner family. Stateless class: all data lives in the ``state`` dicts."""

    name: ClassVar[str]
    scope: ClassVar[Literal["tensor", "group"]]
    #: the keys of the state it fits (tensors, or lists of tensors), checked after every fit
    state_keys: ClassVar[tuple[str, ...]]
    #: those of :attr:`state_keys` derived from the others, kept in the dtype the options give (a
    #: loaded state's are cast to it)
    cache_keys: ClassVar[tuple[str, ...]] = ()
    #: the family's own options (fields with defaults; validated by the dataclass)
    options: ClassVar[type[FamilyOptions]] = FamilyOptions
    #: With whitening (``v`` independent of ``h``) the family can take ``E_v`` in closed form and is
    #: called with ``v=None``; it then adds the damping term ``damping^2 I`` to ``E[h h^T]`` itself.
    integrates_probe: ClassVar[bool] = False
    #: Whitened updates of this family are clipped elementwise (``max_update_amplitude``,
    #: :func:`~..update.clip_amplitudes_`): it fits a separate scale for every element (LRA's diagonal) or pair
    #: of elements (XMat) of a whole param group, so one element's ``P`` can reach its damping bound where its
    #: gradient vanishes, and the guard's one factor for the group would then shrink every parameter's step. Diag
    #: drifts alike, per tensor, where the clip cost the quality suite's fine-tunes more than it gained
    #: (``scripts/README.md``, ninth ablation).
    clips_whitened_updates: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def init_state(
        cls, shape: torch.Size, options: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        """Fresh state for a block of ``shape`` with ``Q = I``; ``options`` is the param group."""

    @classmethod
    def cache_dtype(cls, options: Mapping[str, Any], storage: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype of the :attr:`cache_keys` for a block stored in ``storage`` on ``device``: the storage
        dtype unless the family's options say otherwise."""
        return storage

    @classmethod
    @abstractmethod
    def set_scale(cls, state: dict[str, Any], scale: Tensor) -> None:
        """Reset ``Q`` to ``scale * I`` (so ``P = scale^2 I``)."""

    @classmethod
    @abstractmethod
    def update(cls, state: dict[str, Any], v: Tensor | None, h: Tensor, options: Mapping[str, Any]) -> None:
        """One Lie-group step of ``Q`` on the criterion for the pair ``(v, h)`` (block-shaped), with
        step size ``options["precond_lr"] / L`` (``L`` tracked with ``options["lipschitz_beta"]``).
        ``v`` is ``None`` only for families with ``integrates_probe`` under whitening."""

    @classmethod
    def update_checked_many(
        cls,
        states: Sequence[dict[str, Any]],
        vs: Sequence[Tensor | None],
        hs: Sequence[Tensor],
        options: Mapping[str, Any],
        accept: Sequence[Tensor],
    ) -> list[Tensor]:
        """:meth:`update` of several blocks on their pairs, each kept only where its ``accept`` (a 0-dim
        bool) is true and every tensor it fits (:meth:`fitted_tensors`) comes out finite (:func:`finite_sums`),
        else undone;
        returns whether each block's fit was kept. One block at a time unless the family batches them."""
        kept = []
        for state, v, h, ok in zip(states, vs, hs, accept):
            tensors = cls.fitted_tensors(state)
            saved = [t.clone() for t in tensors]
            cls.update(state, v, h, options)
            ok = ok & torch.stack([finite_sums(t) for t in tensors]).all()
            for tensor, old in zip(tensors, saved):
                tensor.copy_(torch.where(ok, tensor, old))
            kept.append(ok)
        return kept

    @classmethod
    def fitted_tensors(cls, state: Mapping[str, Any]) -> list[Tensor]:
        """The tensors of the state a fit changes (:attr:`state_keys`), lists flattened."""
        tensors = []
        for key in cls.state_keys:
            value = state[key]
            tensors.extend(value if isinstance(value, list) else [value])
        return tensors

    @classmethod
    def conform_state(cls, state: dict[str, Any], options: Mapping[str, Any]) -> None:
        """Bring a ``state`` fitted under other options (a loaded checkpoint, a changed param group) to
        the form the fit under ``options`` works on; called before every checked fit, outside what a
        rejected fit undoes. By default there is nothing to do (Kron: its factors as ``Q`` or ``P``)."""
        return

    @classmethod
    @abstractmethod
    def precondition(cls, state: dict[str, Any], g: Tensor) -> Tensor:
        """``P g`` for a block-shaped ``g``, in the state's working dtype (Kron: its ``apply_dtype``)."""

    @classmethod
    def made_for(cls, shape: torch.Size, state: Mapping[str, Any], fresh: Mapping[str, Any]) -> bool:
        """Whether a loaded ``state`` is one of a block of ``shape`` (``fresh``: a new state for that
        block): by default when its tensors have the fresh state's shapes."""
        return all(tensor_shapes(state[key]) == tensor_shapes(fresh[key]) for key in cls.state_keys)

    @classmethod
    def precondition_many(cls, states: Sequence[dict[str, Any]], gs: Sequence[Tensor]) -> list[Tensor]:
        """``P g`` of several blocks, each with its own state: :meth:`precondition` one block at a time
        unless the family batches them (equal results)."""
        return [cls.precondition(state, g) for state, g in zip(states, gs)]

    @classmethod
    @abstractmethod
    def mean_diagonal(cls, state: dict[str, Any]) -> Tensor:
        """``tr(P) / n``: a cheap scale of the preconditioner for health logs (0-dim tensor)."""

    @classmethod
    @abstractmethod
    def cost(cls, shape: torch.Size, options: Mapping[str, Any]) -> tuple[float, float]:
        """``(state elements, FLOPs of one fit plus one preconditioning)`` for a block of ``shape``,
        up to constant factors: the cost model that balances sharded preconditioners over ranks."""


def tensor_shapes(value: Any) -> Any:
    """A tensor's shape, or a list of tensors' shapes."""
    return [tuple(t.shape) for t in value] if isinstance(value, list) else tuple(value.shape)


PRECONDITIONERS: dict[str, type[Preconditioner]] = {}


def family_option_fields() -> dict[str, dataclasses.Field]:
    """Every registered family's option fields by name (a name shared by families is one field)."""
    return {f.name: f for family in PRECONDITIONERS.values() for f in dataclasses.fields(family.options)}


def register_preconditioner(cls: type[Preconditioner]) -> type[Preconditioner]:
    """Class decorator: make a family selectable as ``PSGD(preconditioner=cls.name)``. An option
    name it shares with a registered family must have the same default."""
    if cls.name in PRECONDITIONERS:
        raise ValueError(f"a preconditioner family named {cls.name!r} is already registered")
    known = family_option_fields()
    for field in dataclasses.fields(cls.options):
        if field.name in known and known[field.name].default != field.default:
            raise ValueError(f"{cls.name}: option {field.name!r} has another default in a registered family")
    PRECONDITIONERS[cls.name] = cls
    return cls


def get_preconditioner(name: str) -> type[Preconditioner]:
    """The family registered as ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return PRECONDITIONERS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(n) for n in sorted(PRECONDITIONERS))
        raise ValueError(f"preconditioner={name!r} is not a known family; choose one of {known}") from None
