"""Kron: ``Q = Q_0 (x) Q_1 (x) ... (x) Q_{k-1}``, one factor per dim of the tensor.

Each factor ``Q_i`` (``n_i x n_i``) is dense or a positive diagonal matrix (stored as a vector). With
``merge_dims`` a tensor of more than two dims is preconditioned as a matrix, as kron-torch does: of
``(n_0 ... n_{k-2}, n_{k-1})`` and ``(n_0, n_1 ... n_{k-1})`` the one whose second side exceeds its
first by less (a conv weight ``(out, in, h, w)`` becomes ``(out in h, w)``). Dim ``i`` of the
(merged) tensor with ``N`` elements gets a dense factor when ``1 < n_i <= max_dense_size`` and either
``n_i^2 <= max_skew * N`` or, on a tensor of two or more dims, ``n_i <= always_dense_size``; else a
diagonal one. Scalars and (with ``max_skew <= 1``) vectors are diagonal. The factors' sizes are the
shape the state works in: a state keeps the factor shapes it was made with. ``P = Q^T Q`` acts on a
gradient ``G`` as ``P_0 G P_1 ...`` with ``P_i = Q_i^T Q_i``, cached after every fit in ``apply_dtype``
(default: bfloat16 over float32 factors where the device has native bf16 products, float32 elsewhere;
the fits stay in float32), in which preconditioning then runs: one product per dense factor, and
the diagonal factors fused into the one pass that casts (and stacks) the blocks' inputs. Blocks of equal
shape and factor shapes go through one batched product per dim; a large block that needs no copy (no
cast, no diagonal factor) goes alone, as a view, since stacking would cost a pass over its memory.
``fit_dtype="bfloat16"`` runs the fit's products over the block (``A`` below and its Grams) in bf16 too.
Fits are batched the same way: the blocks of equal factor shapes that fit in a step form one stack, so a
model's repeated layers cost one batched product per product of the fit, not one each.

All fits follow the criterion ``E[h^T P h + v^T P^{-1} v]`` with a step normalised by ``L_i``, a
running lower bound of the spectral norm of the factor's two terms, so ``mu = precond_lr`` is
dimensionless; no damping and no line search are needed. After each fit the factors are rebalanced
(equal max-norms, same product) to keep them well scaled.

``fit="q0.5eq1.5"`` (the default; Li's psgd_torch default since 2025): dense factors are symmetric
positive definite and move as ``dQ = Q^0.5 E Q^1.5``: ``Q_i <- Q_i - (mu / L_i)(Gamma_i - V_i) Q_i``
with ``Gamma_i = (P h)_(i) (P h)_(i)^T`` (``X_(i)``: the fibres of ``X`` along dim ``i``) and
``V_i = v_(i) v_(i)^T`` (whitening: ``E V_i = (N / n_i) I``); then one Procrustes step (a rotation,
so ``P`` is kept) pulls ``Q_i`` back to symmetric (:func:`~..linalg.procrustes_step_`). Matrix
products only: no triangular solves or inverses.

``fit="eq"`` (Li 2015/2018, the triangular geometry; the default before 0.2): dense factors are upper
triangular with a positive diagonal; with ``A = Q h`` and ``B = Q^{-T} v`` the relative gradient is
``E_i = A_(i) A_(i)^T - B_(i) B_(i)^T`` and ``Q_i <- Q_i - (mu / L_i) triu(E_i) Q_i``. With
whitening the probe is integrated out: ``E_v[B_(i) B_(i)^T] = (Q_i^{-T} Q_i^{-1}) prod_{j!=i}
|Q_j^{-1}|_F^2`` needs one small Cholesky inverse per factor. A factor fitted by EQ continues under
Q0.5EQ1.5 (its ``P`` is unchanged); diagonal factors move the same way under every fit
(``q_i <- q_i - (mu / L_i) E_i q_i``).

``fit="pro4p"`` (Li's psgd_torch ``PRO4P``, recommended there for single precision): the factors of
``P`` itself are fitted and stored (``state["Q"]`` holds the ``P_i``, the cache is their cast), so no
product squares their condition number. It is the Q0.5EQ1.5 step with ``P`` for ``Q`` (``dP = P^0.5 E
P``): with ``A = P h`` (the stored factors applied once) and ``B = v``, ``P_i <- P_i - (mu / L_i)
(Gamma_i - V_i) P_i``; then :data:`PRO4P_ROTATIONS` third-order Procrustes steps
(:func:`~..linalg.procrustes_step3_`) pull ``P_i`` towards the symmetric positive definite factor of
its polar decomposition (which changes ``P``: a projection on SPD matrices). A state fitted under
another ``fit`` goes on under the one its group now has (a loaded checkpoint, a changed param group):
before the next fit the stored factors change form, ``P`` unchanged (:meth:`Kron.conform_state`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..linalg import (
    apply_along,
    broadcast_along,
    gram_along,
    procrustes_step3_,
    procrustes_step_,
    solve_transpose_along,
    spd_norm_lower_bound,
    work_dtype,
)
from ..validation import DTYPES, FamilyOptions, check, dtype_name, is_int
from .base import Preconditioner, finite_sums, register_preconditioner, update_lipschitz

__all__ = ["Kron", "KronOptions", "factor_is_dense", "work_shape"]


#: the fit geometries of :class:`Kron` (module docstring)
KRON_FITS = ("eq", "q0.5eq1.5", "pro4p")

#: third-order Procrustes steps after a PRO4P fit of a dense factor. psgd_torch repeats them (up to 10)
#: until ``max |P_i^T - P_i| < 10^-3 max |P_i|``, a host sync each; three, with none, leave about
#: ``2 10^-3`` at ``precond_lr=0.1`` (``10^-2`` at 0.5), carried into the next fit
PRO4P_ROTATIONS = 3

#: a block of more elements that needs no copy is preconditioned alone (a view) instead of stacked
BATCHED_NUMEL_LIMIT = 1 << 16


def work_shape(shape: torch.Size, merge_dims: bool) -> torch.Size:
    """The shape a tensor is preconditioned in: ``(1,)`` for a scalar; with ``merge_dims`` a tensor of
    more than two dims as a matrix (module docstring)."""
    if not len(shape):
        return torch.Size([1])
    if not merge_dims or len(shape) <= 2:
        return shape
    rows_first = (math.prod(shape[:-1]), shape[-1])
    columns_first = (shape[0], math.prod(shape[1:]))
    return torch.Size(
        rows_first if rows_first[1] - rows_first[0] <= columns_first[1] - columns_first[0] else columns_first
    )


def factor_is_dense(n: int, numel: int, options: Mapping[str, Any]) -> bool:
    """Whether dim of size ``n`` of a (work-shaped) tensor with ``numel`` elements gets a dense factor."""
    small = n <= options["always_dense_size"] and numel > n  # a dim of a tensor of two or more dims
    return 1 < n <= options["max_dense_size"] and (n * n <= options["max_skew"] * numel or small)


def _stacked(tensors: list[Tensor]) -> Tensor:
    """``torch.stack(tensors)``; a view with a batch dim of 1 for one tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _state_shape(state: Mapping[str, Any]) -> torch.Size:
    """The shape the block's state works in: its factors' sizes."""
    return torch.Size(p.shape[0] for p in state["P"])


@functools.cache
def _fast_bf16_products(device_type: str, index: int | None) -> bool:
    if device_type == "cuda":
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 GEMM either
            return False
    return False


def fast_bf16_products(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native on ``device``: a CUDA device of compute capability 8 or
    more (bf16 tensor cores), or a CPU whose oneDNN takes bf16 GEMMs (AVX-512, or ARM's bf16 extension).
    Elsewhere torch runs them on a reference kernel: on an AVX2-only CPU about 40x slower than fp32."""
    return _fast_bf16_products(device.type, device.index)


def apply_dtype(options: Mapping[str, Any], storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the cached ``P`` and of preconditioning: ``apply_dtype``; if ``None``, bfloat16 over
    float32 storage where bf16 products are native (:func:`fast_bf16_products`), else the storage dtype
    (float64 stays float64)."""
    name = dtype_name(options["apply_dtype"], "apply_dtype")
    if name is not None:
        return DTYPES[name]
    return torch.bfloat16 if storage == torch.float32 and fast_bf16_products(device) else storage


def _cache_of(q: Tensor, batch: int = 0) -> Tensor:
    """``P_i = Q_i^T Q_i`` (the square of a diagonal factor); of every factor of a stack with ``batch``
    leading dims."""
    return q.square() if q.ndim == batch + 1 else q.mT @ q


def _minus_(x: Tensor, term: Tensor | float, diagonal: bool) -> Tensor:
    """``x -= term`` in place for a stack of Grams ``x`` (``(B, n, n)``, or ``(B, n)`` when diagonal); a
    float ``term`` stands for that multiple of ``I``."""
    if isinstance(term, Tensor):
        return x.sub_(term)
    (x if diagonal else x.diagonal(dim1=-2, dim2=-1)).sub_(term)
    return x


def _upper_cholesky_factor(p: Tensor) -> Tensor:
    """``R`` upper triangular with ``R^T R = P`` for a symmetric positive definite factor ``P``. Where
    rounding left ``P`` not numerically positive definite (Cholesky's ``info`` non-zero), its eigenvalues
    are lifted to at least ``eps`` times the largest (``P`` unchanged on the rest of its spectrum) and
    ``R`` is the triangle of the QR of ``Lambda^(1/2) V^T`` (``R^T R = V Lambda V^T``, no second
    factorisation that rounding could fail), rows signed to a positive diagonal: finite and invertible
    rather than partly undefined."""
    symmetric = (p + p.mT) / 2
    factor, info = torch.linalg.cholesky_ex(symmetric)
    if info.item() == 0:  # once per factor, at a change of fit
        return factor.mT
    values, vectors = torch.linalg.eigh(symmetric)
    floor = values.amax().clamp_min(torch.finfo(p.dtype).tiny) * torch.finfo(p.dtype).eps
    r = torch.linalg.qr(values.clamp_min(floor).sqrt().unsqueeze(-1) * vectors.mT).R
    return r * r.diagonal().sign().unsqueeze(-1)


def _stores_p(state: Mapping[str, Any]) -> bool:
    """Whether ``state["Q"]`` holds the factors of ``P`` (PRO4P; absent from states saved before it)."""
    return state.get("stores_p", False)


@dataclass(frozen=True)
class KronOptions(FamilyOptions):
    """The factor shapes: dim of size ``n`` of a tensor with ``N`` elements (merged to a matrix with
    ``merge_dims``) gets a dense factor if ``1 < n <= max_dense_size`` and ``n^2 <= max_skew N`` or (on a
    tensor of two or more dims) ``n <= always_dense_size``, else a diagonal one; ``fit``: the geometry
    of the fit (module docstring); ``apply_dtype``: the dtype of the cached ``P`` and of
    preconditioning (``None``: bfloat16 over float32 storage on a device with native bf16 products, the
    storage dtype otherwise: bf16 products on fp32 factors, the fits staying in fp32; ``"float32"``: fp32
    products); ``fit_dtype``: the
    dtype of the fit's products over the whole block (``A`` and its Grams, ``4 N n_i`` multiply-adds per
    dense factor; ``None``: the work dtype, float32), the factor algebra (``n_i^3``) staying in the work
    dtype."""

    max_dense_size: int = 8192
    max_skew: float = 1.0
    always_dense_size: int = 512
    merge_dims: bool = True
    fit: str = "q0.5eq1.5"
    apply_dtype: torch.dtype | str | None = None
    fit_dtype: torch.dtype | str | None = None

    def validate(self) -> None:
        check("fit", self.fit, self.fit in KRON_FITS, f"one of {list(KRON_FITS)}")
        dtype_name(self.apply_dtype, "apply_dtype")
        dtype_name(self.fit_dtype, "fit_dtype")
        size, skew = self.max_dense_size, self.max_skew
        check("max_dense_size", size, is_int(size) and size >= 0, "an int >= 0")
        small = self.always_dense_size
        check("always_dense_size", small, is_int(small) and small >= 0, "an int >= 0 (0: max_skew alone decides)")
        check("merge_dims", self.merge_dims, isinstance(self.merge_dims, bool), "True or False")
        skew_ok = isinstance(skew, (int, float)) and not isinstance(skew, bool) and skew >= 0
        check("max_skew", skew, skew_ok, "a number >= 0 (math.inf: every factor dense)")


@register_preconditioner
class Kron(Preconditioner):
    """Kronecker-factored preconditioner, one factor per tensor dim (see the module docstring)."""

    name = "kron"
    state_keys = ("Q", "P", "lipschitz")
    cache_keys = ("P",)
    scope = "tensor"
    integrates_probe = True
    options = KronOptions

    @classmethod
    def init_state(
        cls, shape: torch.Size, options: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        shape = work_shape(shape, options["merge_dims"])
        numel = shape.numel()
        factors = []
        for n in shape:
            if factor_is_dense(n, numel, options):
                factors.append(torch.eye(n, dtype=dtype, device=device))
            else:
                factors.append(torch.ones(n, dtype=dtype, device=device))
        cache = cls.cache_dtype(options, dtype, device)
        return {
            "Q": factors,
            "P": [f.to(cache, copy=True) for f in factors],
            "lipschitz": torch.zeros(len(factors), dtype=work_dtype(dtype), device=device),
            "stores_p": options["fit"] == "pro4p",
        }

    @classmethod
    def cache_dtype(cls, options: Mapping[str, Any], storage: torch.dtype, device: torch.device) -> torch.dtype:
        return apply_dtype(options, storage, device)

    @classmethod
    def cost(cls, shape: torch.Size, options: Mapping[str, Any]) -> tuple[float, float]:
        shape = work_shape(shape, options["merge_dims"])
        numel = shape.numel()
        memory, flops = 0.0, 0.0
        for n in shape:
            if factor_is_dense(n, numel, options):
                memory += 2 * n * n  # Q and the cached P
                flops += 4 * numel * n + 10 * n**3  # Gram and product along the dim, triangular algebra
            else:
                memory += 2 * n
                flops += 4 * numel
        return memory, flops

    @classmethod
    def made_for(cls, shape: torch.Size, state: Mapping[str, Any], fresh: Mapping[str, Any]) -> bool:
        """Any factorisation of the block fits (a state keeps the factor shapes it was made with, e.g.
        under an older factor rule): square or diagonal factors whose sizes multiply to its size, ``P``
        shaped as ``Q``, one bound per factor."""
        q, p, sizes = state["Q"], state["P"], [t.shape[0] for t in state["Q"]]
        factors_ok = all(t.shape in ((n,), (n, n)) for t, n in zip(q, sizes))
        return (
            factors_ok
            and [t.shape for t in p] == [t.shape for t in q]
            and tuple(state["lipschitz"].shape) == (len(q),)
            and math.prod(sizes) == max(shape.numel(), 1)
        )

    @classmethod
    def set_scale(cls, state: dict[str, Any], scale: Tensor) -> None:
        factor_scale = scale ** ((2.0 if _stores_p(state) else 1.0) / len(state["Q"]))
        for q in state["Q"]:
            identity = torch.eye(q.shape[0], dtype=q.dtype, device=q.device) if q.ndim == 2 else 1.0
            q.copy_(identity * factor_scale)
        cls._refresh_cache(state)

    @staticmethod
    def _apply_all(x: Tensor, factors: list[Tensor]) -> Tensor:
        """Every factor of a stack of blocks (``(B, ...)`` each) applied along its dim of ``x`` (``(B, *shape)``)."""
        for i, q in enumerate(factors):
            x = apply_along(x, q, i, batch=1)
        return x

    @classmethod
    def conform_state(cls, state: dict[str, Any], options: Mapping[str, Any]) -> None:
        """Store the factors as ``options["fit"]`` fits them, ``P`` unchanged: a state of another fit
        turns to PRO4P's ``P_i = Q_i^T Q_i``; one of PRO4P back to ``Q_i = chol(P_i)^T`` (upper triangular
        with a positive diagonal, as EQ keeps it; Q0.5EQ1.5 rotates it to symmetric)."""
        wanted = options["fit"] == "pro4p"
        if _stores_p(state) == wanted:
            return
        for stored in state["Q"]:
            factor = stored.to(work_dtype(stored.dtype))
            if wanted:
                factor = _cache_of(factor)
            elif factor.ndim == 1:
                factor = factor.sqrt()
            else:
                factor = _upper_cholesky_factor(factor)
            stored.copy_(factor)
        state["stores_p"] = wanted

    @classmethod
    def update(cls, state: dict[str, Any], v: Tensor | None, h: Tensor, options: Mapping[str, Any]) -> None:
        cls.conform_state(state, options)
        cls._store([state], cls._fitted([state], [v], [h], options))

    @classmethod
    def update_checked_many(
        cls,
        states: Sequence[dict[str, Any]],
        vs: Sequence[Tensor | None],
        hs: Sequence[Tensor],
        options: Mapping[str, Any],
        accept: Sequence[Tensor],
    ) -> list[Tensor]:
        """Blocks of equal factor shapes and dtypes (e.g. the same layer of every transformer block) are
        fitted as one stack, one batched product per product of the fit (a block's result equals its fit
        alone within the rounding of batched products); a block is written where its ``accept`` is true
        and its new tensors are finite (:func:`~.base.finite_sums`)."""
        batches: dict[tuple[Any, ...], list[int]] = {}
        for index, state in enumerate(states):
            q, p = state["Q"], state["P"]
            key = (*(t.shape for t in q), q[0].dtype, p[0].dtype, q[0].device, _stores_p(state))
            batches.setdefault(key, []).append(index)
        accepted: dict[int, Tensor] = {}
        for members in batches.values():
            batch = [states[i] for i in members]
            fitted = cls._fitted(batch, [vs[i] for i in members], [hs[i] for i in members], options)
            finite = torch.stack([finite_sums(stack, batch=1) for stack in fitted]).all(0)
            kept = torch.stack([accept[i] for i in members]) & finite
            cls._store(batch, fitted, kept)
            accepted.update(zip(members, kept.unbind()))
        return [accepted[i] for i in range(len(states))]

    @classmethod
    def _fitted(
        cls,
        states: Sequence[dict[str, Any]],
        vs: Sequence[Tensor | None],
        hs: Sequence[Tensor],
        options: Mapping[str, Any],
    ) -> list[Tensor]:
        """One fit of every block of ``states`` (equal factor shapes and dtypes) on its pair: stacks
        ``(B, ...)`` of the new tensors in :meth:`fitted_tensors` order (the factors, the cached ``P``, the
        bounds ``(B, k)``), in the stored dtypes; the states are left unchanged (module docstring for the
        fits)."""
        shape = _state_shape(states[0])
        stored = [[state["Q"][dim] for state in states] for dim in range(len(shape))]
        factors = [torch.stack(qs).to(work_dtype(qs[0].dtype)) for qs in stored]
        fit = options["fit"]
        symmetric = fit != "eq"
        # EQ: A = Q h against B = Q^{-T} v; Q0.5EQ1.5: A = P h (the cached P, lifted) against v; PRO4P: A = P h
        # (the stored factors) against v
        applied = factors
        if fit == "q0.5eq1.5":
            applied = [
                torch.stack([state["P"][dim] for state in states]).to(factors[0].dtype) for dim in range(len(shape))
            ]
        low = dtype_name(options["fit_dtype"], "fit_dtype")  # the products over the block: A and its Grams
        products = factors[0].dtype if low is None else DTYPES[low]
        h = torch.stack([h.reshape(shape) for h in hs]).to(products)
        a = cls._apply_all(h, [f.to(products) for f in applied])
        terms_b, terms_damping = cls._probe_terms(factors, applied, vs, shape, options["damping"], symmetric)
        lipschitz = torch.stack([state["lipschitz"] for state in states]).mT.contiguous()
        for dim, q in enumerate(factors):
            diagonal = q.ndim == 2
            term_a = gram_along(a, dim, diagonal, batch=1).to(q.dtype)
            if terms_damping[dim] is not None:
                term_a += terms_damping[dim]
            bound = cls._bound(term_a, terms_b[dim], diagonal)
            step = options["precond_lr"] / update_lipschitz(lipschitz[dim], bound, options["lipschitz_beta"])
            step = step.view(-1, *[1] * (q.ndim - 1))
            gradient = _minus_(term_a, terms_b[dim], diagonal)
            if diagonal:
                q.sub_(gradient.mul_(q).mul_(step))
            elif symmetric:
                q.sub_(gradient.matmul(q).mul_(step))
                if fit == "pro4p":
                    for _ in range(PRO4P_ROTATIONS):
                        procrustes_step3_(q)
                else:
                    procrustes_step_(q)
            else:
                q.sub_(torch.triu(gradient).matmul(q).mul_(step))
        cls._balance(factors)
        new_q = [q.to(qs[0].dtype) for q, qs in zip(factors, stored)]
        cache = states[0]["P"][0].dtype
        stores_p = _stores_p(states[0])
        new_p = [(q if stores_p else _cache_of(q.to(work_dtype(q.dtype)), batch=1)).to(cache) for q in new_q]
        return [*new_q, *new_p, lipschitz.mT]

    @staticmethod
    def _bound(term_a: Tensor, term_b: Tensor | float, diagonal: bool) -> Tensor:
        """A lower bound (one per block of a stack) of ``|Gamma + V|_2``, the two PSD terms of the fit's
        gradient (a float ``term_b``: that multiple of ``I``)."""
        if isinstance(term_b, Tensor):
            total = term_a + term_b
        else:
            total = term_a.clone()
            (total if diagonal else total.diagonal(dim1=-2, dim2=-1)).add_(term_b)
        return total.amax(-1) if diagonal else spd_norm_lower_bound(total)

    @classmethod
    def _store(cls, states: Sequence[dict[str, Any]], fitted: list[Tensor], kept: Tensor | None = None) -> None:
        """Write the stacks of :meth:`_fitted` into the blocks' states, only where ``kept`` (one per block)
        is true if it is given."""
        slots = [cls.fitted_tensors(state) for state in states]
        for position, new in enumerate(fitted):
            targets = [slot[position] for slot in slots]
            if kept is not None:
                new = torch.where(kept.view(-1, *[1] * (new.ndim - 1)), new, torch.stack(targets))
            torch._foreach_copy_(targets, list(new.unbind()))

    @classmethod
    def _probe_terms(
        cls,
        factors: list[Tensor],
        applied: list[Tensor],
        vs: Sequence[Tensor | None],
        shape: torch.Size,
        damping: float,
        symmetric: bool,
    ) -> tuple[list[Tensor | float], list[Tensor | None]]:
        """Per dim, for a stack of blocks (factors ``(B, ...)``), the probe side ``B_(i) B_(i)^T`` of the
        fit (a float: that multiple of ``I``) and the damping term added to the ``A`` side (``None``:
        none). With whitening (``vs`` all ``None``) the probe is integrated out: ``(N / n_i) I`` for the
        symmetric fits (``B = v``), ``Q_i^{-T} Q_i^{-1} prod_{j!=i} |Q_j^{-1}|_F^2`` for EQ."""
        if vs[0] is not None:
            b = torch.stack([v.reshape(shape) for v in vs]).to(factors[0].dtype)
            if not symmetric:
                for dim, q in enumerate(factors):
                    b = solve_transpose_along(b, q, dim, batch=1)
            return [gram_along(b, dim, q.ndim == 2, batch=1) for dim, q in enumerate(factors)], [None] * len(factors)
        terms_damping: list[Tensor | None] = [None] * len(factors)
        if damping > 0:  # E[damping^2 (M v)_(i) (M v)_(i)^T] with M the applied side (Q for EQ, else P)
            squares = [p.square() if p.ndim == 2 else p @ p.mT for p in applied]
            terms_damping = [term.mul_(damping**2) for term in cls._kron_expectation_terms(squares)]
        if not symmetric:
            return cls._kron_expectation_terms([cls._inverse_gram(q) for q in factors]), terms_damping
        return [shape.numel() / n for n in shape], terms_damping

    @staticmethod
    def _kron_expectation_terms(grams: list[Tensor]) -> list[Tensor]:
        """For ``X = (M_0 (x) M_1 ...) Z`` with white ``Z``: ``E[X_(i) X_(i)^T] = G_i prod_{j!=i} tr G_j``
        where ``G_i = M_i M_i^T``, for a stack of blocks (``(B, n, n)``, or ``(B, n)`` when diagonal)."""
        traces = torch.stack([g.sum(-1) if g.ndim == 2 else g.diagonal(dim1=-2, dim2=-1).sum(-1) for g in grams])
        return [g * (traces.prod(0) / traces[i]).view(-1, *[1] * (g.ndim - 1)) for i, g in enumerate(grams)]

    @staticmethod
    def _inverse_gram(q: Tensor) -> Tensor:
        """``Q^{-T} Q^{-1} = (Q Q^T)^{-1}`` for the probe term ``E_v[B_(i) B_(i)^T]`` (whitening), for a
        stack of factors.

        With the flip ``J`` (reversed rows and columns), ``L = J Q J`` is lower triangular and
        ``(Q Q^T)^{-1} = J (L L^T)^{-1} J``: one Cholesky inverse (``n^3 / 3`` multiply-adds for the
        triangular inverse and as many for the product) instead of a solve and a full product."""
        if q.ndim == 2:
            return q.reciprocal().square()
        return torch.cholesky_inverse(q.flip(-2, -1)).flip(-2, -1)

    @classmethod
    def precondition(cls, state: dict[str, Any], g: Tensor) -> Tensor:
        return cls.precondition_many([state], [g])[0]

    @classmethod
    def precondition_many(cls, states: Sequence[dict[str, Any]], gs: Sequence[Tensor]) -> list[Tensor]:
        """``P g`` of several blocks, in their cache's dtype; blocks of equal shape and factor shapes
        (e.g. the same layer of every transformer block) in one batched product per dense dim, the
        diagonal factors fused into the cast that stacks the inputs (module docstring). A block's result
        does not depend on the others in its batch (bit for bit on one CPU thread; with more, a CPU
        kernel may split batches of different sizes differently, within rounding)."""
        batches: dict[tuple[Any, ...], list[int]] = {}
        for index, (state, g) in enumerate(zip(states, gs)):
            cache = state["P"]
            copied = g.dtype != cache[0].dtype or any(p.ndim == 1 for p in cache)
            alone = index if not copied and g.numel() > BATCHED_NUMEL_LIMIT else None
            key = (g.shape, cache[0].dtype, cache[0].device, *(p.shape for p in cache), alone)
            batches.setdefault(key, []).append(index)
        results: dict[int, Tensor] = {}
        for (shape, dtype, *_), members in batches.items():
            factors = [_stacked([states[i]["P"][dim] for i in members]) for dim in range(len(states[members[0]]["P"]))]
            x = cls._stacked_input([gs[i] for i in members], factors, _state_shape(states[members[0]]), dtype)
            for dim, factor in enumerate(factors):
                if factor.ndim == 3:
                    x = apply_along(x, factor, dim, batch=1)
            results.update((i, y.reshape(shape)) for i, y in zip(members, x.unbind()))
        return [results[i] for i in range(len(gs))]

    @staticmethod
    def _stacked_input(gs: list[Tensor], factors: list[Tensor], shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The blocks' ``g`` (reshaped to ``shape``) stacked in ``dtype``, with every diagonal factor of
        ``factors`` (stacked, ``(B, n)`` or ``(B, n, n)``) applied: the first one fused into the pass
        that casts and stacks. One block that needs neither: a view."""
        diagonal = [dim for dim, factor in enumerate(factors) if factor.ndim == 2]
        if len(gs) == 1 and gs[0].dtype == dtype and not diagonal:
            return gs[0].reshape(shape).unsqueeze(0)
        x = torch.empty((len(gs), *shape), dtype=dtype, device=gs[0].device)
        for slot, g, *first in zip(x, gs, *[factors[dim] for dim in diagonal[:1]]):
            if first:
                torch.mul(g.reshape(shape), broadcast_along(first[0], len(shape), diagonal[0]), out=slot)
            else:
                slot.copy_(g.reshape(shape))
        for dim in diagonal[1:]:
            x = apply_along(x, factors[dim], dim, batch=1)
        return x

    @classmethod
    def mean_diagonal(cls, state: dict[str, Any]) -> Tensor:
        means = [(p if p.ndim == 1 else p.diagonal()).float().mean() for p in state["P"]]
        return torch.stack(means).prod()

    @staticmethod
    def _balance(factors: list[Tensor]) -> None:
        """Rescale a stack of blocks' factors (``(B, ...)`` each) to equal max-abs values per block without
        changing their Kronecker product."""
        if len(factors) < 2:
            return
        norms = torch.stack([q.abs().flatten(1).amax(-1) for q in factors])
        target = norms.log().mean(0).exp()
        for q, scale in zip(factors, (target / norms).unbind()):
            q.mul_(scale.view(-1, *[1] * (q.ndim - 1)))

    @staticmethod
    def _refresh_cache(state: dict[str, Any]) -> None:
        stores_p = _stores_p(state)
        for p, q in zip(state["P"], state["Q"]):
            p.copy_(q if stores_p else _cache_of(q.to(work_dtype(q.dtype))))
