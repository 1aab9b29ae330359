"""``PSGD``: the ``torch.optim.Optimizer`` shell around the preconditioner families.

One step, for every block (a tensor, or a whole param group for the whole-vector families):

1. ``m <- beta_t m + (1 - beta_t) g`` with ``beta_t = min(momentum, t / (t + 1))`` (an EMA that
   starts as a plain average, so no bias correction is needed).
2. On update steps (deterministic credit schedule, see :mod:`.schedules`): fit ``Q`` on one pair
   ``(v, h)`` from the group's curvature source (see :mod:`.curvature`), ``h + damping v`` in place
   of ``h`` (``P -> |H + damping I|^{-1}``). With ``secant_pairs`` also, on every step, on the
   secant pair ``(theta_t - theta_{t-1}, g_t - g_{t-1})`` of the last step.
3. ``u = P m``; the update-size guard scales ``u`` down to RMS ``<= max_update_rms``.
4. ``theta <- theta (1 - lr weight_decay) - lr u`` (decoupled weight decay).

A non-finite gradient or ``H v`` anywhere skips the whole step: parameters, momentum and
preconditioners stay exactly as they were; ``state["skipped_steps"]`` counts it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..distributed import (
    PreconditionerSharding,
    all_reduce_mean_,
    assign_owners,
    is_multiprocess,
    reject_sharded_parameters,
)
from .curvature import CURVATURES, differentiate, finite_difference_hvp, hessian_vector_products, probe_seed
from .preconditioners import Preconditioner, get_preconditioner
from .schedules import DEFAULT_UPDATE_SCHEDULE, Schedule, update_probability, validate_schedule

__all__ = ["PSGD"]

#: the per-block state every rank keeps under sharding (the update schedule must agree everywhere)
_SCHEDULE_COUNTERS = ("step", "skipped_steps", "update_credit")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(value: Any, name: str = "precond_dtype") -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dtype in _DTYPES.items():
            if dtype == value:
                return name
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return value.removeprefix("torch.")
    raise ValueError(f"{name}={value!r} is invalid: expected None or one of {sorted(_DTYPES)}")


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_group(group: dict[str, Any]) -> None:
    """Check and normalise one param group's options in place."""
    num = _is_number
    _check("lr", group["lr"], num(group["lr"]) and group["lr"] >= 0, "a number >= 0")
    _check("momentum", group["momentum"], num(group["momentum"]) and 0 <= group["momentum"] < 1, "a number in [0, 1)")
    wd = group["weight_decay"]
    _check("weight_decay", wd, num(wd) and wd >= 0, "a number >= 0")
    get_preconditioner(group["preconditioner"])
    curvature = group["curvature"]
    _check("curvature", curvature, curvature in CURVATURES, f"one of {list(CURVATURES)}")
    mu = group["precond_lr"]
    _check("precond_lr", mu, num(mu) and 0 < mu <= 1, "a number in (0, 1]")
    beta = group["lipschitz_beta"]
    _check("lipschitz_beta", beta, num(beta) and 0 <= beta < 1, "a number in [0, 1)")
    group["precond_update_prob"] = validate_schedule(group["precond_update_prob"])
    scale = group["precond_init_scale"]
    _check("precond_init_scale", scale, scale is None or (num(scale) and 0 < scale < math.inf), "None or a number > 0")
    rms = group["max_update_rms"]
    _check("max_update_rms", rms, rms is None or (num(rms) and rms > 0), "None (no guard) or a number > 0")
    damping = group["damping"]
    _check("damping", damping, num(damping) and damping >= 0, "a number >= 0")
    whiten_momentum = group["whiten_momentum"]
    _check("whiten_momentum", whiten_momentum, isinstance(whiten_momentum, bool), "True or False")
    secant = group["secant_pairs"]
    _check("secant_pairs", secant, isinstance(secant, bool), "True or False")
    _check(
        "secant_pairs",
        secant,
        not secant or curvature != "whiten",
        "False with curvature='whiten' (a secant pair samples the Hessian, which whitening does not fit): "
        "use curvature='hvp' or 'fd'",
    )
    group["precond_dtype"] = _dtype_name(group["precond_dtype"])
    size = group["max_dense_size"]
    _check("max_dense_size", size, isinstance(size, int) and not isinstance(size, bool) and size >= 0, "an int >= 0")
    rank = group["rank"]
    rank_is_int = isinstance(rank, int) and not isinstance(rank, bool)
    _check("rank", rank, rank_is_int and rank >= 0, "an int >= 0 (0: diagonal)")
    skew = group["max_skew"]
    _check("max_skew", skew, num(skew) and skew >= 0, "a number >= 0 (math.inf: every factor dense)")
    seed = group["seed"]
    _check("seed", seed, isinstance(seed, int) and not isinstance(seed, bool), "an int")


class PSGD(Optimizer):
    r"""Preconditioned SGD with Lie-group preconditioners fitted online (Li; arXiv 2402.04553).

    The preconditioner ``P = Q^T Q`` is fitted by the criterion ``E[h^T P h + v^T P^{-1} v]`` from
    pairs ``(v, h)`` and tends to ``|H|^{-1}`` (``curvature="hvp"`` or ``"fd"``) or to
    ``E[g g^T]^{-1/2}`` (``curvature="whiten"``). Every option can be overridden per param group.

    Args:
        params: parameters or param groups.
        lr: learning rate of the parameter update.
        preconditioner: family name: ``"kron"`` (per tensor, one factor per dim), ``"diag"``
            (elementwise), or one preconditioner over the whole flattened param group: ``"lra"``
            (diagonal plus rank-``rank`` correction), ``"xmat"`` (diagonal plus anti-diagonal) or
            ``"dense"`` (full triangular ``Q``; small groups only); see
            :data:`hf_psgd.optim.preconditioners.PRECONDITIONERS`.
        curvature: ``"whiten"`` (``h`` = gradient), ``"hvp"`` (exact Hessian-vector products) or
            ``"fd"`` (finite differences of gradients; needs ``step(closure)``).
        momentum: EMA factor of the gradient; the momentum is what gets preconditioned.
        weight_decay: decoupled weight decay (``theta *= 1 - lr * weight_decay``).
        precond_lr: dimensionless step size of the preconditioner fit, in ``(0, 1]``.
        lipschitz_beta: EMA factor of the running bound ``L`` that normalises the fit's step
            (0.9 smooths noisy whitening pairs; 0 suits exact, noise-free ``H v``).
        precond_update_prob: a constant probability or a schedule dict (see
            :mod:`hf_psgd.optim.schedules`); default 1.0 for 200 steps, decaying to 0.03.
        precond_init_scale: initial ``Q = scale I``; ``None`` sets it from the first pair as
            ``(mean v^2)^{1/4} (mean h^4)^{-1/8}`` (deferred while ``h`` is all zeros).
        max_update_rms: guard: ``P m`` is scaled down to this RMS per block; ``None`` disables it.
        damping: ``h + damping v`` is fitted instead of ``h`` (bounds ``P`` by ``1 / damping``).
        whiten_momentum: with ``curvature="whiten"``, fit on the momentum instead of the gradient.
        secant_pairs: with ``curvature="hvp"`` or ``"fd"``, also fit on every step on the secant
            pair ``(s, y) = (theta_t - theta_{t-1}, g_t - g_{t-1})`` of the last step (``y ~ H s``
            along the path taken, as in quasi-Newton methods; no extra gradient), rescaled to
            ``|s|^2 = n`` like a probe. For deterministic objectives only (full batch, no dropout):
            with mini-batches ``y`` is dominated by batch-to-batch gradient noise. Keeps a copy of
            the parameters and the gradient per block.
        precond_dtype: storage dtype of the preconditioner (``None``: float32, or float64 for
            float64 parameters). Fits always run in at least float32; Kron also applies its cached
            factors in this dtype, so ``"bfloat16"`` halves the memory and makes the products of
            every step cheaper (bf16 matrix products), at bf16 precision of the update.
        max_dense_size, max_skew: Kron's rule for a triangular factor on a dim of size ``n`` of a
            tensor with ``N`` elements: ``1 < n <= max_dense_size`` and ``n^2 <= max_skew N``.
            ``max_dense_size`` also caps the size of a param group with ``preconditioner="dense"``.
        rank: rank of the low-rank part of ``preconditioner="lra"`` (0: diagonal).
        seed: seed of the probe vectors (a pure function of seed, parameter index and step) and of
            LRA's random initial ``U``.
        shard_preconditioners: in a multi-process job, give every preconditioner block one owner
            rank (balanced by memory, update FLOPs and update size, see :func:`hf_psgd.distributed.assign_owners`)
            that alone holds its preconditioner and momentum and computes its update; one
            ``all_gather`` per step shares the updates. ``None``: on when ``torch.distributed`` is
            initialised with more than one process. The whole-vector families (one block per param
            group) put each param group on one rank. Gradients must already be averaged (DDP);
            ``H v`` and gradients that PSGD computes itself are averaged over the processes.
        communication_dtype: dtype of the exchanged updates (``None``: float32, float64 when a
            parameter is float64); every rank, owner included, applies the communicated values.

    Under sharding, ``state_dict()`` needs :meth:`consolidate_state_dict` on every process first
    (a collective; ``PSGDTrainer`` does it when it saves); the result is the same world-size
    independent state that a single process saves, and ``load_state_dict`` takes it at any world
    size. :meth:`statistics` covers this process's blocks.

    Curvature ``"hvp"`` takes ``H v`` from one of: ``step(closure)`` with a closure that returns the
    loss (PSGD differentiates it with ``create_graph=True``); gradients that already carry a graph
    (``loss.backward(create_graph=True)`` on steps where :meth:`will_update_preconditioner` is
    true; PSGD detaches them afterwards); or products handed over with :meth:`accumulate_hvp` for
    the probes from :meth:`hvp_probes`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        preconditioner: str = "kron",
        curvature: str = "whiten",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        precond_lr: float = 0.1,
        lipschitz_beta: float = 0.9,
        precond_update_prob: Schedule = DEFAULT_UPDATE_SCHEDULE,
        precond_init_scale: float | None = None,
        max_update_rms: float | None = 1.1,
        damping: float = 1e-9,
        whiten_momentum: bool = False,
        secant_pairs: bool = False,
        precond_dtype: torch.dtype | str | None = None,
        max_dense_size: int = 8192,
        max_skew: float = 1.0,
        rank: int = 10,
        seed: int = 0,
        shard_preconditioners: bool | None = None,
        communication_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            preconditioner=preconditioner,
            curvature=curvature,
            momentum=momentum,
            weight_decay=weight_decay,
            precond_lr=precond_lr,
            lipschitz_beta=lipschitz_beta,
            precond_update_prob=precond_update_prob,
            precond_init_scale=precond_init_scale,
            max_update_rms=max_update_rms,
            damping=damping,
            whiten_momentum=whiten_momentum,
            secant_pairs=secant_pairs,
            precond_dtype=precond_dtype,
            max_dense_size=max_dense_size,
            max_skew=max_skew,
            rank=rank,
            seed=seed,
        )
        _validate_group(dict(defaults))
        self._param_index: dict[Tensor, int] = {}
        self._handed_hvp: dict[Tensor, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned_nonfinite = False
        self._owners: dict[Tensor, int] | None = None
        self._sharding: PreconditionerSharding | None = None
        self._consolidated: dict[str, Any] | None = None
        super().__init__(params, defaults)
        self._sharding = self._make_sharding(shard_preconditioners, communication_dtype)

    def _make_sharding(self, shard: Any, communication_dtype: Any) -> PreconditionerSharding | None:
        _check("shard_preconditioners", shard, shard in (None, True, False), "None (automatic), True or False")
        dtype_name = _dtype_name(communication_dtype, "communication_dtype")
        if shard is None:
            shard = is_multiprocess()
        elif shard and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(
                "shard_preconditioners=True is invalid here: it needs an initialised torch.distributed process "
                "group (accelerate launch, torchrun or init_process_group); expected None (automatic) or False"
            )
        if not shard:
            return None
        params = [p for group in self.param_groups for p in group["params"]]
        default = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return PreconditionerSharding(None, _DTYPES[dtype_name] if dtype_name else default)

    # ----------------------------------------------------------------------------- groups, blocks

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        reject_sharded_parameters(group["params"])
        for p in group["params"]:
            self._param_index.setdefault(p, len(self._param_index))

    @staticmethod
    def _family(group: Mapping[str, Any]) -> type[Preconditioner]:
        return get_preconditioner(group["preconditioner"])

    def _blocks(self, group: Mapping[str, Any]) -> list[list[Tensor]]:
        """The group's trainable parameters, split into preconditioner blocks."""
        params = [p for p in group["params"] if p.requires_grad]
        if self._family(group).scope == "tensor":
            return [[p] for p in params]
        return [params] if params else []

    def _block_owners(self) -> dict[Tensor, int]:
        """Owner rank of every block (keyed by the block's first parameter); all 0 unsharded.
        Blocks that appear later (``add_param_group``, newly trainable parameters) are balanced
        among themselves; an assigned block never moves (its owner holds its state)."""
        owners = self._owners if self._owners is not None else {}
        new = [(group, block) for group in self.param_groups for block in self._blocks(group) if block[0] not in owners]
        if new:
            world = self._sharding.world_size if self._sharding is not None else 1
            costs = [self._family(group).cost(self._block_shape(block), group) for group, block in new]
            numels = [self._block_shape(block).numel() for _, block in new]
            ranks = assign_owners([m for m, _ in costs], [f for _, f in costs], numels, world)
            owners.update({block[0]: rank for (_, block), rank in zip(new, ranks)})
        self._owners = owners
        return owners

    def _owns(self, block: list[Tensor]) -> bool:
        if self._sharding is None:
            return True
        owner = self._owners.get(block[0]) if self._owners is not None else None
        if owner is None:  # a block not assigned yet: assign every new one (a pass over all blocks)
            owner = self._block_owners()[block[0]]
        return owner == self._sharding.rank

    @staticmethod
    def _gather(block: list[Tensor], tensors: Mapping[Tensor, Tensor]) -> Tensor:
        """The block-shaped view of per-parameter tensors (zeros where one is missing)."""
        if len(block) == 1:
            return tensors[block[0]]
        return torch.cat([tensors[p].reshape(-1) if p in tensors else p.new_zeros(p.numel()) for p in block])

    @staticmethod
    def _scatter(block: list[Tensor], flat: Tensor) -> list[Tensor]:
        if len(block) == 1:
            return [flat]
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in block]), block)]

    @staticmethod
    def _block_shape(block: list[Tensor]) -> torch.Size:
        return block[0].shape if len(block) == 1 else torch.Size([sum(p.numel() for p in block)])

    @staticmethod
    def _state_dtype(group: Mapping[str, Any], param: Tensor) -> torch.dtype:
        if group["precond_dtype"] is not None:
            return _DTYPES[group["precond_dtype"]]
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def _init_block_state(self, group: dict[str, Any], block: list[Tensor]) -> dict[str, Any]:
        """The block's state, created on first use: the schedule counters on every rank; the
        preconditioner and momentum only on the block's owner."""
        state = self.state[block[0]]
        if state:
            return state
        state.update(step=0, skipped_steps=0, update_credit=1.0 - update_probability(group["precond_update_prob"], 0))
        if not self._owns(block):
            return state
        shape = self._block_shape(block)
        first = block[0]
        state.update(self._family(group).init_state(shape, group, self._state_dtype(group, first), first.device))
        if group["momentum"] > 0:
            state["momentum"] = torch.zeros(shape, dtype=first.dtype, device=first.device)
        state["precond_updates"] = 0
        state["scale_pending"] = group["precond_init_scale"] is None
        if group["precond_init_scale"] is not None:
            scale = torch.tensor(float(group["precond_init_scale"]), device=first.device)
            self._family(group).set_scale(state, scale)
        return state

    # ----------------------------------------------------------------------------- update schedule

    def _will_update(self, group: Mapping[str, Any], block: list[Tensor]) -> bool:
        state = self.state.get(block[0])
        if not state:
            return True
        probability = update_probability(group["precond_update_prob"], state["step"])
        return state["update_credit"] + probability >= 1.0 - 1e-9

    def will_update_preconditioner(self, curvature: str | None = None) -> bool:
        """Whether the next ``step()`` fits at least one preconditioner (restricted to groups with
        the given ``curvature`` if one is named). Cheap: reads counters only."""
        return any(
            self._will_update(group, block)
            for group in self.param_groups
            if curvature is None or group["curvature"] == curvature
            for block in self._blocks(group)
        )

    def statistics(self) -> dict[str, float]:
        """Figures for training logs, summed or ranged over all preconditioner blocks:
        ``precond_updates`` (fits done), ``skipped_steps`` (non-finite steps skipped, per block
        count of the most-skipped block), ``update_prob`` (largest current update probability) and
        ``precond_scale_min`` / ``precond_scale_median`` / ``precond_scale_max`` (of ``tr(P) / n``
        over the blocks: a health figure that shows a preconditioner collapsing or blowing up; the
        median is the typical block, since the extremes can come from parameters with little or no
        gradient, such as attention key biases). One host sync; meant for logging steps.
        Under sharding: this process's blocks only (no collective)."""
        updates, skipped, probability, scales = 0, 0, 0.0, []
        for group in self.param_groups:
            family = self._family(group)
            for block in self._blocks(group):
                state = self.state.get(block[0])
                if not state or not self._owns(block):
                    continue
                updates += state["precond_updates"]
                skipped = max(skipped, state["skipped_steps"])
                probability = max(probability, update_probability(group["precond_update_prob"], state["step"]))
                scales.append(family.mean_diagonal(state))
        figures = {"precond_updates": float(updates), "skipped_steps": float(skipped), "update_prob": probability}
        if scales:
            stacked = torch.stack([s.to(scales[0].device) for s in scales])
            low, middle, high = torch.stack([stacked.min(), stacked.median(), stacked.max()]).tolist()
            figures.update(precond_scale_min=low, precond_scale_median=middle, precond_scale_max=high)
        return figures

    # ----------------------------------------------------------------------------- probes and H v

    def _probe(self, param: Tensor, group: Mapping[str, Any], step: int) -> Tensor:
        generator = self._generators.get(param.device)
        if generator is None:
            generator = self._generators[param.device] = torch.Generator(device=param.device)
        generator.manual_seed(probe_seed(group["seed"], self._param_index[param], step))
        dtype = self._state_dtype(group, param)
        return torch.randn(
            param.shape, generator=generator, dtype=torch.promote_types(dtype, torch.float32), device=param.device
        )

    def _block_step(self, block: list[Tensor]) -> int:
        state = self.state.get(block[0])
        return state["step"] if state else 0

    def hvp_probes(self) -> dict[Tensor, Tensor]:
        """The probe ``v`` of every parameter whose preconditioner the next ``step()`` fits from
        exact Hessian-vector products. A training loop that computes ``H v`` itself (for example
        summed over micro-batches) hands the products back with :meth:`accumulate_hvp`."""
        probes = {}
        for group in self.param_groups:
            if group["curvature"] != "hvp":
                continue
            for block in self._blocks(group):
                if self._will_update(group, block):
                    step = self._block_step(block)
                    probes.update({p: self._probe(p, group, step) for p in block})
        return probes

    def accumulate_hvp(self, products: Mapping[Tensor, Tensor]) -> None:
        """Add ``H v`` contributions (for the probes of :meth:`hvp_probes`) for the next ``step()``."""
        for param, product in products.items():
            if param not in self._param_index:
                raise ValueError("accumulate_hvp got a tensor that is not a parameter of this optimizer")
            if product.shape != param.shape:
                raise ValueError(
                    f"accumulate_hvp: product of shape {tuple(product.shape)} "
                    f"for a parameter of shape {tuple(param.shape)}"
                )
            product = product.detach()
            previous = self._handed_hvp.get(param)
            self._handed_hvp[param] = product.clone() if previous is None else previous.add_(product)

    # ----------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One optimisation step; returns the closure's loss when a closure is given.

        With ``curvature="hvp"`` or ``"fd"`` the closure must return the loss without calling
        ``backward()`` (PSGD differentiates it); with ``"whiten"`` it follows the usual
        ``torch.optim`` convention (zero the gradients, backward, return the loss).
        """
        self._consolidated = None
        plans = []  # (group, block, fits the preconditioner this step)
        for group in self.param_groups:
            for block in self._blocks(group):
                plans.append((group, block, self._will_update(group, block)))
        need_h = {
            p: group["curvature"]
            for group, block, fits in plans
            if fits and group["curvature"] != "whiten"
            for p in block
        }

        loss = None
        graph_grads: dict[Tensor, Tensor] = {}
        if closure is not None and any(group["curvature"] != "whiten" for group in self.param_groups):
            params = [p for _, block, _ in plans for p in block]
            with torch.enable_grad():
                loss = closure()
            grads = differentiate(loss, params, create_graph=any(c == "hvp" for c in need_h.values()))
            for p, g in zip(params, grads):
                if g.requires_grad:
                    graph_grads[p] = g
                p.grad = g.detach()
            if self._sharding is not None:
                all_reduce_mean_([p.grad for p in params])
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _, block, _ in plans:
            for p in block:
                if p.grad is not None and p.grad.requires_grad:
                    graph_grads.setdefault(p, p.grad)
                    p.grad = p.grad.detach()

        plans = [(g, b, fits) for g, b, fits in plans if any(p.grad is not None for p in b)]
        grads = {p: p.grad for _, block, _ in plans for p in block if p.grad is not None}
        handed, self._handed_hvp = self._handed_hvp, {}
        products = self._curvature_products(plans, need_h, grads, graph_grads, handed, closure)
        graph_grads.clear()

        if not self._all_finite(list(grads.values()) + list(products.values())):
            self._skip(plans)
            return loss
        updates: dict[Tensor, Tensor] = {}
        for group, block, fits in plans:
            update = self._block_update(group, block, fits, grads, products)
            if update is not None:
                updates[block[0]] = update
        self._guard(plans, updates)
        self._apply_updates(plans, updates)
        return loss

    def _curvature_products(self, plans, need_h, grads, graph_grads, handed, closure) -> dict[Tensor, Tensor]:
        """``H v`` (or its finite-difference estimate) for every parameter that needs one."""
        products: dict[Tensor, Tensor] = {}
        from_graph, from_fd = [], []
        for group, block, fits in plans:
            if not fits or group["curvature"] == "whiten":
                continue
            step = self._block_step(block)
            for p in block:
                if p not in grads:
                    continue
                probe = self._probe(p, group, step)
                if group["curvature"] == "fd":
                    from_fd.append((p, probe))
                elif p in handed:
                    products[p] = handed[p]
                elif p in graph_grads:
                    from_graph.append((p, probe))
                else:
                    raise RuntimeError(
                        "curvature='hvp' needs a Hessian-vector product on this step (the preconditioner is "
                        "fitted now) but the gradients carry no autograd graph. Either call "
                        "loss.backward(create_graph=True) on steps where optimizer.will_update_preconditioner() "
                        "is true, or pass a closure that returns the loss to step(closure), or hand over H v "
                        "for optimizer.hvp_probes() with optimizer.accumulate_hvp()."
                    )
        if from_graph:
            params = [p for p, _ in from_graph]
            hv = hessian_vector_products([graph_grads[p] for p in params], params, [v for _, v in from_graph])
            products.update(zip(params, hv))
        if from_fd:
            if closure is None:
                raise RuntimeError(
                    "curvature='fd' needs step(closure) with a deterministic closure that returns the loss "
                    "(same batch, no dropout randomness): PSGD re-evaluates it at perturbed parameters"
                )
            params = [p for p, _ in from_fd]
            hv = finite_difference_hvp(closure, params, [grads[p] for p in params], [v for _, v in from_fd])
            products.update(zip(params, hv))
        if self._sharding is not None and (from_graph or from_fd):
            all_reduce_mean_([products[p] for p, _ in from_graph + from_fd])
        return products

    @staticmethod
    def _all_finite(tensors: list[Tensor]) -> bool:
        if not tensors:
            return True
        norms = torch._foreach_norm(tensors)
        return bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all())

    def _skip(self, plans) -> None:
        for group, block, _ in plans:
            self._init_block_state(group, block)["skipped_steps"] += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                "PSGD skipped a step because a gradient or Hessian-vector product was NaN or Inf; parameters, "
                "momentum and preconditioners were left unchanged (state['skipped_steps'] counts skips). "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _block_update(self, group, block, fits, grads, products) -> Tensor | None:
        """Advance the block's schedule counters; on its owner also the momentum, the fit and the
        update ``u = P m`` (block-shaped, before the guard), which is returned (``None`` elsewhere)."""
        state = self._init_block_state(group, block)
        step = state["step"]
        probability = update_probability(group["precond_update_prob"], step)
        state["update_credit"] += probability - (1.0 if fits else 0.0)
        state["step"] = step + 1
        if not self._owns(block):
            return None
        family = self._family(group)
        g = self._gather(block, grads)
        direction = g
        if group["momentum"] > 0:
            direction = state["momentum"].lerp_(g, 1.0 - min(group["momentum"], step / (step + 1)))
        if fits:
            self._fit(group, family, state, block, g, direction, products, step)
        if group["secant_pairs"]:
            self._fit_secant(group, family, state, block, g)
        return family.precondition(state, direction)

    @staticmethod
    def _guard(plans, updates: dict[Tensor, Tensor]) -> None:
        """The update-size guard: every block's ``u`` scaled down in place to RMS ``<= max_update_rms``
        of its group. One ``_foreach_norm`` for all blocks; on the CPU only the blocks above the limit
        are touched (elsewhere every block is multiplied, which avoids a host sync)."""
        guarded = [
            (group["max_update_rms"] * math.sqrt(updates[block[0]].numel()), updates[block[0]])
            for group, block, _ in plans
            if block[0] in updates and group["max_update_rms"] is not None
        ]
        if not guarded:
            return
        limits, tensors = zip(*guarded)
        norms = torch._foreach_norm(list(tensors))
        device = norms[0].device
        norms = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
        scales = (torch.tensor(limits, dtype=torch.float64, device=device) / norms.clamp_min(1e-30)).clamp(max=1.0)
        if device.type == "cpu":
            for update, scale in zip(tensors, scales.tolist()):
                if scale < 1.0:
                    update.mul_(scale)
        else:
            for update, scale in zip(tensors, scales.unbind()):
                update.mul_(scale.to(update.device))

    def _apply_updates(self, plans, updates: dict[Tensor, Tensor]) -> None:
        """Share the owners' updates (sharded: one ``all_gather``), then ``theta <- theta (1 - lr
        wd) - lr u`` for every block of every group."""
        if self._sharding is not None:
            owners = self._block_owners()
            blocks = [block for _, block, _ in plans]
            mine = {i: updates[block[0]] for i, block in enumerate(blocks) if block[0] in updates}
            numels = [self._block_shape(block).numel() for block in blocks]
            shared = self._sharding.exchange(numels, [owners[block[0]] for block in blocks], mine)
            updates = {block[0]: u.view(self._block_shape(block)) for block, u in zip(blocks, shared)}
        for group in self.param_groups:
            params, deltas = [], []
            for owner_group, block, _ in plans:
                if owner_group is group:
                    params.extend(block)
                    deltas.extend(self._scatter(block, updates[block[0]]))
            if not params:
                continue
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            deltas = [u.to(p.dtype) for u, p in zip(deltas, params)]
            torch._foreach_add_(params, deltas, alpha=-group["lr"])

    def _fit(self, group, family, state, block, g, direction, products, step: int) -> None:
        whiten = group["curvature"] == "whiten"
        v = None
        if not (whiten and family.integrates_probe):
            v = self._gather(block, {p: self._probe(p, group, step) for p in block})
        if whiten:
            h = direction if group["whiten_momentum"] else g
        else:
            h = self._gather(block, products)
        h = h.to(torch.promote_types(self._state_dtype(group, block[0]), torch.float32))
        if state["scale_pending"]:
            scale = h.pow(4).mean().pow(-0.125)
            if v is not None:
                scale *= v.square().mean().pow(0.25)
            if not bool(torch.isfinite(scale) and scale > 0):
                return
            family.set_scale(state, scale)
            state["scale_pending"] = False
        if v is not None and group["damping"] > 0:
            h = h.add(v, alpha=group["damping"])
        family.update(state, v, h, group)
        state["precond_updates"] += 1

    def _fit_secant(self, group, family, state, block, g: Tensor) -> None:
        """Fit on ``(s, y) = (theta - theta_prev, g - g_prev)`` scaled by ``sqrt(n) / |s|`` (the size
        of a Gaussian probe, so ``lipschitz_beta`` tracks both kinds of pair on one scale), with
        ``y + damping s``; then remember ``theta`` and ``g`` for the next step. Nothing to fit on the
        first step, while the initial scale is pending, or when ``theta`` did not move."""
        dtype = torch.promote_types(self._state_dtype(group, block[0]), torch.float32)
        param = self._gather(block, {p: p.detach() for p in block}).to(dtype)
        grad = g.to(dtype)
        if "secant_param" in state and not state["scale_pending"]:
            s = param - state["secant_param"]
            norm = s.norm()
            if bool(norm > 0):
                scale = math.sqrt(s.numel()) / norm
                s, y = s * scale, (grad - state["secant_grad"]).mul_(scale)
                if group["damping"] > 0:
                    y.add_(s, alpha=group["damping"])
                family.update(state, s, y, group)
        if "secant_param" in state:
            state["secant_param"].copy_(param)
            state["secant_grad"].copy_(grad)
        else:
            state["secant_param"], state["secant_grad"] = param.clone(), grad.clone()

    # ----------------------------------------------------------------------------- state dict

    def _owned_state_params(self) -> set[Tensor]:
        """The parameters that key the state of blocks this process owns."""
        return {block[0] for group in self.param_groups for block in self._blocks(group) if self._owns(block)}

    def consolidate_state_dict(self) -> None:
        """Under sharding, gather every owner's state so that :meth:`state_dict` returns the full
        state on every process until the next ``step()``. A collective: call it on every process.
        Without sharding it does nothing."""
        if self._sharding is None:
            return
        local = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        owned = self._owned_state_params()
        mine = {index: state for index, state in local["state"].items() if params[index] in owned}
        mine = _copy_to_device(mine, torch.device("cpu"))
        self._consolidated = {"state": self._sharding.gather_states(mine), "param_groups": local["param_groups"]}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in the format of ``torch.optim``; the same at every world size. Under
        sharding it is the one gathered by the last :meth:`consolidate_state_dict` (before any
        later ``step()``), unless no step has made any state yet."""
        if self._sharding is None or not any(self.state.values()):  # nothing sharded yet (Accelerate's prepare)
            return super().state_dict()
        if self._consolidated is None:
            raise RuntimeError(
                f"PSGD's preconditioners are sharded over {self._sharding.world_size} processes: call "
                "optimizer.consolidate_state_dict() on every process first (a collective), then state_dict() on any "
                "of them. PSGDTrainer does this when it saves a checkpoint; with Accelerate, call it before "
                "accelerator.save_state(); or build PSGD with shard_preconditioners=False."
            )
        return self._consolidated

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps every state tensor's saved dtype (the base
        class casts floating state to the parameter dtype, which would round an fp32
        preconditioner of a bf16 parameter). Takes a state saved at any world size; under sharding
        this process keeps the full state of its own blocks and the schedule counters of the rest."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for group in self.param_groups for p in group["params"]]
        owned = self._owned_state_params() if self._sharding is not None else None
        self._consolidated = None
        for index, value in saved_state.items():
            param = params[index]
            if owned is not None and param not in owned:
                value = {key: value[key] for key in _SCHEDULE_COUNTERS}
            self.state[param] = _copy_to_device(value, param.device)


def _copy_to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _copy_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_device(v, device) for v in value)
    return value
