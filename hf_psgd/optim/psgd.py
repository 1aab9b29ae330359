"""``PSGD``: the ``torch.optim.Optimizer`` shell around the preconditioner families.

One step, for every block (a tensor, or a whole param group for the whole-vector families):

1. ``m <- beta_t m + (1 - beta_t) g`` with ``beta_t = min(momentum, t / (t + 1))`` (an EMA that
   starts as a plain average, so no bias correction is needed).
2. On update steps (deterministic credit schedule, :mod:`.schedules`): fit ``Q`` on one pair
   ``(v, h)`` from the group's curvature source (:mod:`.curvature`, :mod:`.fitting`); with
   ``secant_pairs`` also, every step, on the last step's secant pair (:mod:`.secant`).
3. ``u = P m``; the update-size guard scales ``u`` to an RMS between Adam's for ``m`` (with whitening,
   ``adam_floor``), ``max_update_rms`` and ``max_update_growth`` (:mod:`.update`).
4. ``theta <- theta (1 - lr weight_decay) - lr u`` (decoupled weight decay).

A non-finite gradient or ``H v`` anywhere masks the step on every process, decided on the device
with no host synchronisation: parameters, momentum and preconditioners stay as they were, the step
counters move on and ``skipped_steps`` counts it. Which process does what is the distribution
strategy's business (:mod:`.distribution`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .blocks import BlockPlan, block_statistics, plan_blocks, work_dtype
from .checkpoint import check_loaded_state, conform_loaded_cache, copy_to_device, upgrade_loaded_state
from .curvature import HandedProducts, ProbeSource, curvature_products, step_gradients
from .distribution import resolve_distribution
from .fitting import checked_updates, fit_preconditioners
from .options import check_param_group, fill_missing_options, merge_defaults, option_specs, validate_group
from .schedules import DEFAULT_UPDATE_SCHEDULE, Schedule, update_probability
from .secant import fit_secant_pair
from .update import adam_floors, all_finite, apply_updates_, clip_amplitudes_, guard_scales, tensor_norms

__all__ = ["PSGD"]

#: arguments of ``PSGD.__init__`` that are not per-group options
_NOT_OPTIONS = ("self", "params", "shard_preconditioners", "communication_dtype", "family_options")


class PSGD(Optimizer):
    r"""Preconditioned SGD with Lie-group preconditioners fitted online (Li; arXiv 2402.04553).

    ``P = Q^T Q`` is fitted by the criterion ``E[h^T P h + v^T P^{-1} v]`` from pairs ``(v, h)`` and
    tends to ``|H|^{-1}`` (``curvature="hvp"`` or ``"fd"``) or to ``E[g g^T]^{-1/2}``
    (``curvature="whiten"``). Every option can be overridden per param group.

    Args:
        params: parameters or param groups.
        lr: learning rate of the parameter update; ``None``: the curvature's default
            (:data:`~.options.CURVATURE_DEFAULTS`, as for ``precond_lr`` and ``damping``), resolved into
            each param group at construction.
        preconditioner: a family of :data:`hf_psgd.optim.PRECONDITIONERS`: ``"kron"`` (per tensor, one
            factor per dim), ``"diag"`` (elementwise), or one over the whole flattened param group:
            ``"lra"`` (diagonal plus low rank), ``"xmat"`` (diagonal plus anti-diagonal), ``"dense"``.
        curvature: ``"whiten"`` (``h`` = gradient), ``"hvp"`` (exact ``H v``) or ``"fd"`` (finite
            differences of gradients; needs ``step(closure)``).
        momentum: EMA factor of the gradient; the momentum is what gets preconditioned.
        weight_decay: decoupled weight decay (``theta *= 1 - lr * weight_decay``).
        precond_lr: dimensionless step size of the fit, in ``(0, 1]``; ``None``: the curvature's default
            (0.2 whitening, 0.1 ``hvp`` / ``fd``).
        lipschitz_beta: EMA factor of the running bound ``L`` that normalises the fit's step.
        precond_update_prob: a constant probability or a schedule dict (:mod:`.schedules`).
        precond_init_scale: initial ``Q = scale I``; ``None`` sets it from the first pair (:mod:`.fitting`).
        max_update_rms: guard: ``P m`` scaled down to this RMS per block; ``None`` disables it.
        max_update_amplitude: with ``curvature="whiten"`` and a family that fits one scale per element (or pair)
            of the whole param group (``"lra"``, ``"xmat"``), every element of ``P m`` clipped to ``[-a, a]`` before
            the guard (whitened steps have an RMS of about 1; psgd_torch clips at 10): such a ``P`` grows to its
            damping bound where a gradient vanishes for long (an absent token's embedding row), and one
            returning gradient there would otherwise make the guard shrink every parameter's step
            (:func:`~.update.clip_amplitudes_`); counted in ``clipped_updates``. ``None``: no clip. Kron, Diag
            and Dense are not clipped: on Kron it changed nothing but the cost (1.04-1.06x -> 1.07-1.14x of
            AdamW's iteration), on Diag it lost the MiniLM and LoRA fine-tunes more than it won the Llama; Dense
            is not measured.
        max_update_growth: with ``curvature="hvp"`` or ``"fd"``, ``P m`` scaled down, where larger, to this
            multiple of the running RMS (EMA, beta 0.9) of the block's earlier guarded updates: Newton-type
            steps grow without bound where the curvature vanishes (``P ~ |H|^-1``), and one gradient spike
            there then moves the parameters far (:func:`~.update.guard_scales`). Sustained growth passes at
            most ``r = 0.9 + 0.1 max_update_growth`` per step: 1.03 at the default 1.3 (1.10 at 2.0 let a LoRA
            fine-tune's steps compound 9% per step until its loss tripled). ``None``: no growth cap.
        adam_floor: with ``curvature="whiten"``, ``P m`` scaled up, where smaller, to ``adam_floor``
            times the RMS of Adam's step for ``m`` with one second moment per block
            (:func:`~.update.adam_floors`): whitening takes far smaller steps than Adam where gradients
            are consistent (fine-tuning). ``None`` (or 0): no floor.
        damping: ``h + damping v`` is fitted instead of ``h`` (bounds ``P`` by ``1 / damping``); ``None``: the
            curvature's default (1e-9 whitening; 1e-2 ``hvp`` / ``fd``, in the loss's Hessian units: set
            it to the scale of the curvature you want resolved, e.g. ``1e-9`` for exact Newton steps on a
            deterministic problem).
        whiten_momentum: with ``curvature="whiten"``, fit on the momentum instead of the gradient.
        secant_pairs: with ``"hvp"`` or ``"fd"``, also fit on the last step's secant pair (:mod:`.secant`).
        precond_dtype: preconditioner storage dtype (``None``: float32, float64 for float64 parameters).
        seed: seed of the probe vectors (a pure function of seed, parameter index and step).
        compile_kernels: run the families' preconditioning and checked fit through ``torch.compile``
            (one compiled function each, recompiled per shape by dynamo; the first steps pay the
            compilation). Off by default.
        shard_preconditioners: in a multi-process job, give every block one owner rank that alone
            keeps its state and computes its update (``None``: when more than one process runs, or
            the parameters are FSDP2 shards, where it cannot be ``False``).
        communication_dtype: dtype of the updates exchanged under sharding.
        **family_options: the families' own options (``max_dense_size`` and ``max_skew`` of Kron,
            ``rank`` of LRA, ...): the fields of their ``options`` dataclasses.

    Curvature ``"hvp"`` takes ``H v`` from ``step(closure)`` (PSGD differentiates the loss), from
    gradients that carry a graph (``backward(create_graph=True)`` when
    :meth:`will_update_preconditioner` is true), or from :meth:`accumulate_hvp` for the probes of
    :meth:`hvp_probes`. Under data-parallel sharding ``state_dict()`` is a collective that every
    process calls (Accelerate's ``save_state`` does); its result is the same at any world size. Under
    FSDP2 it holds the process's own blocks, for ``torch.distributed.checkpoint``. A ``step()`` with lr
    0 and zero gradients (``torch.distributed.checkpoint``'s state initialisation) only creates state.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        preconditioner: str = "kron",
        curvature: str = "whiten",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        precond_lr: float | None = None,
        lipschitz_beta: float = 0.9,
        precond_update_prob: Schedule = DEFAULT_UPDATE_SCHEDULE,
        precond_init_scale: float | None = None,
        max_update_rms: float | None = 1.1,
        max_update_amplitude: float | None = 10.0,
        max_update_growth: float | None = 1.3,
        adam_floor: float | None = 0.75,
        damping: float | None = None,
        whiten_momentum: bool = False,
        secant_pairs: bool = False,
        precond_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        compile_kernels: bool = False,
        shard_preconditioners: bool | None = None,
        communication_dtype: torch.dtype | str | None = None,
        **family_options: Any,
    ) -> None:
        given = dict(locals())
        shell = {name: given[name] for name in inspect.signature(PSGD.__init__).parameters if name not in _NOT_OPTIONS}
        defaults = merge_defaults(shell, family_options)
        validate_group(dict(defaults))
        self._probes = ProbeSource()
        self._handed_hvp = HandedProducts(self._probes.index)
        self._warned_nonfinite = False
        self._gathered: dict[str, Any] | None = None
        self._compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
        super().__init__(params, defaults)
        self._sharding = (shard_preconditioners, communication_dtype)
        self._distribution = resolve_distribution(shard_preconditioners, communication_dtype, self.param_groups)

    @classmethod
    def option_specs(cls) -> dict[str, tuple[Any, str]]:
        """Every option's ``(default, annotation)``: the shell's and every registered family's."""
        return option_specs(cls.__init__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_param_group(param_group, self.defaults)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group)
        self._probes.add(group["params"])

    # ----------------------------------------------------------------------------- plans and state

    def _plans(self) -> list[BlockPlan]:
        """This step's blocks, each with an owner and the decision whether it fits ``Q``."""
        plans = plan_blocks(self.param_groups, self.state)
        if plans and isinstance(plans[0].key, DTensor) != self._distribution.sharded_parameters:
            self._adopt_parameters()
        self._distribution.assign(plans)
        for plan in plans:
            state = self.state.get(plan.key)  # credit: fit when it reaches 1 (.schedules)
            credit = state and state["update_credit"] + update_probability(plan.schedule, state["step"])
            plan.fits = not state or credit >= 1.0 - 1e-9
        return plans

    def _adopt_parameters(self) -> None:
        """Take parameter objects swapped into ``param_groups`` before the first step (Accelerate puts
        FSDP2's ``DTensor`` parameters there in ``prepare``): a new strategy, probes indexed anew."""
        self._distribution = resolve_distribution(*self._sharding, self.param_groups)
        self._probes.reindex([p for group in self.param_groups for p in group["params"]])

    def _init_state(self, plan: BlockPlan) -> dict[str, Any]:
        """The block's state, created on first use (the preconditioner only on its owner)."""
        state = self.state[plan.key]
        if not state:
            state.update(plan.new_state(self._distribution.owns(plan)))
        return state

    def will_update_preconditioner(self, curvature: str | None = None) -> bool:
        """Whether the next ``step()`` fits at least one preconditioner (of a group with the given
        ``curvature``, if one is named). Cheap: reads counters only."""
        return any(plan.fits for plan in self._plans() if curvature in (None, plan.group["curvature"]))

    def statistics(self) -> dict[str, float]:
        """Figures for training logs over this process's blocks (:func:`.blocks.block_statistics`); warns
        once when a step was skipped (a non-finite gradient or ``H v``)."""
        plans = [plan for plan in self._plans() if self.state.get(plan.key) and self._distribution.owns(plan)]
        figures = block_statistics([(plan, self.state[plan.key]) for plan in plans])
        if figures["skipped_steps"] > 0 and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                "PSGD skipped a step because a gradient or Hessian-vector product was NaN or Inf: the update was "
                "masked, momentum and preconditioners were left unchanged (state['skipped_steps'] counts skips). "
                "Shown once.",
                RuntimeWarning,
                stacklevel=2,
            )
        return figures

    # ----------------------------------------------------------------------------- probes and H v

    def _probe(self, param: Tensor, group: Mapping[str, Any], step: int) -> Tensor:
        return self._probes.draw(param, group["seed"], step, work_dtype(group, param))

    def _probe_step(self, plan: BlockPlan) -> int:
        return self.state.get(plan.key, {}).get("step", 0)

    def hvp_probes(self) -> dict[Tensor, Tensor]:
        """The probe ``v`` of every parameter whose preconditioner the next ``step()`` fits from exact
        ``H v``; a loop that computes ``H v`` itself hands it back with :meth:`accumulate_hvp`."""
        plans = [plan for plan in self._plans() if plan.fits and plan.group["curvature"] == "hvp"]
        return {p: self._probe(p, plan.group, self._probe_step(plan)) for plan in plans for p in plan.params}

    def accumulate_hvp(self, products: Mapping[Tensor, Tensor]) -> None:
        """Add ``H v`` contributions (for the probes of :meth:`hvp_probes`) for the next ``step()``."""
        self._handed_hvp.add(products)

    # ----------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One optimisation step; returns the closure's loss when a closure is given. With
        ``curvature="hvp"`` or ``"fd"`` the closure returns the loss without calling ``backward()``
        (PSGD differentiates it); with ``"whiten"`` it zeroes the gradients and calls ``backward()``."""
        self._gathered = None
        plans = self._plans()
        params = [p for plan in plans for p in plan.params]
        differentiated = closure is not None and any(g["curvature"] != "whiten" for g in self.param_groups)
        hvp = any(plan.fits and plan.group["curvature"] == "hvp" for plan in plans)
        loss, graph_grads = step_gradients(closure, params, differentiated, create_graph=hvp)
        if differentiated:
            self._distribution.average_([p.grad for p in params])

        plans = [plan for plan in plans if any(p.grad is not None for p in plan.params)]
        grads = {p: p.grad for plan in plans for p in plan.params if p.grad is not None}
        if self._initialises_state(closure, grads):
            for plan in plans:
                self._init_state(plan)
            return loss
        handed = self._handed_hvp.take()
        probes = {
            p: (plan.group["curvature"], self._probe(p, plan.group, self._probe_step(plan)))
            for plan in plans
            if plan.fits and plan.group["curvature"] != "whiten"
            for p in plan.params
            if p in grads
        }
        products = curvature_products(probes, grads, graph_grads, handed, closure)
        graph_grads.clear()
        self._distribution.average_([products[p] for p, (c, _) in probes.items() if c == "fd" or p not in handed])

        local = self._distribution.local
        grad_norms = dict(zip(grads, tensor_norms([local(g) for g in grads.values()])))
        product_norms = tensor_norms([local(t) for t in products.values()])
        keep = self._distribution.agree(all_finite([*grad_norms.values(), *product_norms]))
        self._count_skips(plans, keep)
        for bucket in self._distribution.buckets(plans):
            updates, scales = self._guarded_updates(bucket, grads, products, keep, grad_norms)
            if self._distribution.exchanges:  # an update leaves its owner scaled, in at least float32
                updates = {
                    key: u.to(torch.promote_types(u.dtype, torch.float32)) * scales[key] for key, u in updates.items()
                }
                scales = {}
            updates = self._distribution.exchange(bucket, updates)
            unscaled = keep.new_ones((), dtype=torch.float32)
            for group in self.param_groups:  # a parameter without gradient never moves
                triples = [
                    (local(p), updates[p], scales.get(plan.key, unscaled))
                    for plan in bucket
                    if plan.group is group
                    for p in plan.params
                    if p in grads
                ]
                apply_updates_(triples, group["lr"], group["weight_decay"], keep)
        return loss

    def _guarded_updates(
        self,
        plans: list[BlockPlan],
        grads: Mapping[Tensor, Tensor],
        products: Mapping[Tensor, Tensor],
        keep: Tensor,
        grad_norms: Mapping[Tensor, Tensor],
    ) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
        """The update ``u = P m`` of every block this process owns and its guard factor (0-dim; zero
        where ``keep`` is false), both keyed by ``plan.key`` (the whole gradients the owner gathers for
        it are freed on return; ``grad_norms``: the norm of what this process holds of each gradient).
        Each phase runs over all blocks at once: momenta (multi-tensor), fits, ``P m`` (batched by the
        family), guard."""
        whole_grads = self._distribution.gather_gradients(plans, grads)
        owned = [(plan, step) for plan in plans if (step := self._advance_counters(plan)) is not None]
        gradients = [plan.gather(whole_grads) for plan, _ in owned]
        directions = self._momentum_directions(owned, gradients, keep)
        self._fit(owned, gradients, directions, products, keep)
        updates = self._precondition([plan for plan, _ in owned], directions)
        limits = [
            plan.group["max_update_amplitude"]
            if plan.group["curvature"] == "whiten" and plan.family.clips_whitened_updates
            else None
            for plan, _ in owned
        ]
        for (plan, _), clipped in zip(owned, clip_amplitudes_(list(updates.values()), limits)):
            if clipped is not None:
                self.state[plan.key]["clipped_updates"] += clipped & keep.to(clipped.device)
        floors = self._adam_floors(owned, gradients, directions, keep, grad_norms)
        growth = [
            (self.state[plan.key]["update_rms"], plan.group["max_update_growth"])
            if plan.group["max_update_growth"] and plan.group["curvature"] != "whiten"
            else None
            for plan, _ in owned
        ]
        max_rms = [plan.group["max_update_rms"] for plan, _ in owned]
        scales = guard_scales(list(updates.values()), max_rms, keep, floors, growth)
        return updates, dict(zip(updates, scales))

    def _adam_floors(
        self,
        owned: list[tuple[BlockPlan, int]],
        gradients: list[Tensor],
        directions: list[Tensor],
        keep: Tensor,
        grad_norms: Mapping[Tensor, Tensor],
    ) -> list[Tensor | None]:
        """``adam_floor`` times Adam's update RMS for every owned block whose group whitens with a floor
        (``None`` for the others), its gradient energy moved (:func:`~.update.adam_floors`). A block's gradient norm
        comes from its parameters' norms where this process holds them whole, else from ``gradients``."""
        floored = [
            i for i, (plan, _) in enumerate(owned) if plan.group["adam_floor"] and plan.group["curvature"] == "whiten"
        ]
        if self._distribution.sharded_parameters:
            norms = tensor_norms([gradients[i] for i in floored])
        else:
            members = [[grad_norms[p] for p in owned[i][0].params if p in grad_norms] for i in floored]
            norms = [torch.stack(n).square().sum().sqrt() if len(n) > 1 else n[0] for n in members]
        energies = [self.state[owned[i][0].key]["grad_energy"] for i in floored]
        found = adam_floors(energies, norms, [directions[i] for i in floored], keep)
        floors: list[Tensor | None] = [None] * len(owned)
        for i, floor in zip(floored, found):
            floors[i] = floor * owned[i][0].group["adam_floor"]
        return floors

    def _initialises_state(self, closure: Callable[[], Tensor] | None, grads: Mapping[Tensor, Tensor]) -> bool:
        """Whether this step is ``torch.distributed.checkpoint``'s state initialisation (``step()`` with
        lr 0 and zero gradients, to get a state to load into): it creates the state and changes nothing."""
        if closure is not None or any(float(group["lr"]) != 0.0 for group in self.param_groups):
            return False
        zero = not any(bool(self._distribution.local(g).any()) for g in grads.values())
        return bool(self._distribution.agree(torch.tensor(zero)))

    def _count_skips(self, plans: list[BlockPlan], keep: Tensor) -> None:
        """``state["skipped_steps"] += 1`` where ``keep`` is false, for every block (one multi-tensor add
        on the device)."""
        counters = [self._init_state(plan)["skipped_steps"] for plan in plans]
        if not counters:  # no gradient at all this step
            return
        skipped = keep.logical_not().to(counters[0].device, torch.int64)
        torch._foreach_add_(counters, [skipped] * len(counters))  # tensor lists: no scalar read on the host

    def _advance_counters(self, plan: BlockPlan) -> int | None:
        """Advance the block's step counter and update credit; its step before that on the block's
        owner, ``None`` elsewhere."""
        state = self._init_state(plan)
        step = state["step"]
        state["update_credit"] += update_probability(plan.schedule, step) - float(plan.fits)
        state["step"] = step + 1
        return step if self._distribution.owns(plan) else None

    def _momentum_directions(
        self, owned: list[tuple[BlockPlan, int]], gradients: list[Tensor], keep: Tensor
    ) -> list[Tensor]:
        """The direction ``m`` of every owned ``(block, step)``: its momentum, moved towards the gradient
        (one multi-tensor lerp per weight), or the gradient itself without momentum. Where ``keep`` is
        false the momentum lerps towards itself (it stays exactly) and a direction without momentum is zero."""
        directions: list[Tensor] = list(gradients)
        lerps: dict[float, list[int]] = {}
        for index, (plan, step) in enumerate(owned):
            momentum = plan.group["momentum"]
            if momentum > 0:
                lerps.setdefault(1.0 - min(momentum, step / (step + 1)), []).append(index)
            else:
                directions[index] = torch.where(keep, gradients[index], 0)
        for weight, members in lerps.items():
            momenta = [self.state[owned[i][0].key]["momentum"] for i in members]
            moved = [torch.where(keep, gradients[i], m) for i, m in zip(members, momenta)]
            torch._foreach_lerp_(momenta, moved, weight)
            for i, m in zip(members, momenta):
                directions[i] = m
        return directions

    def _fit(
        self,
        owned: list[tuple[BlockPlan, int]],
        gradients: list[Tensor],
        directions: list[Tensor],
        hv: Mapping[Tensor, Tensor],
        keep: Tensor,
    ) -> None:
        """The fits of ``Q`` of the owned blocks that fit this step, batched per family and param group
        (:func:`~.fitting.fit_preconditioners`; one compiled call per block where ``compile_kernels``), then
        the secant fits where asked; all masked where ``keep`` is false."""
        batches: dict[tuple[type, int], tuple[dict[str, Any], list[tuple[dict[str, Any], Tensor | None, Tensor]]]] = {}
        for (plan, step), g, direction in zip(owned, gradients, directions):
            if plan.fits:
                pair = self._fit_pair(plan, step, g, direction, hv)
                batches.setdefault((plan.family, id(plan.group)), (plan.group, []))[1].append(pair)
        for (family, _), (group, pairs) in batches.items():
            if group["compile_kernels"]:
                checked = self._kernel(checked_updates, True)
                for pair in pairs:
                    fit_preconditioners(family, [pair], group, keep, checked)
            else:
                fit_preconditioners(family, pairs, group, keep)
        for (plan, _), g in zip(owned, gradients):
            if plan.group["secant_pairs"]:
                dtype = work_dtype(plan.group, plan.key)
                param = plan.gather({p: p.detach() for p in plan.params}).to(dtype)
                fit_secant_pair(plan.family, self.state[plan.key], param, g.to(dtype), plan.group, keep)

    def _fit_pair(
        self, plan: BlockPlan, step: int, g: Tensor, direction: Tensor, hv: Mapping[Tensor, Tensor]
    ) -> tuple[dict[str, Any], Tensor | None, Tensor]:
        """The block's state and its pair ``(v, h)`` for this step's fit: ``v`` its probe (``None`` where
        the family integrates it out under whitening), ``h`` the gradient (the momentum with
        ``whiten_momentum``) or ``H v``, in the block's work dtype."""
        group, family = plan.group, plan.family
        whiten = group["curvature"] == "whiten"
        v = None
        if not (whiten and family.integrates_probe):
            v = plan.gather({p: self._probe(p, group, step) for p in plan.params})
        h = (direction if group["whiten_momentum"] else g) if whiten else plan.gather(hv)
        return self.state[plan.key], v, h.to(work_dtype(group, plan.key))

    def _precondition(self, plans: list[BlockPlan], directions: list[Tensor]) -> dict[Tensor, Tensor]:
        """``u = P m`` of every owned block, keyed by ``plan.key``: batched per family
        (:meth:`~.preconditioners.Preconditioner.precondition_many`), or one compiled call per block
        where ``compile_kernels``."""
        batches: dict[tuple[type, bool], list[int]] = {}
        for index, plan in enumerate(plans):
            batches.setdefault((plan.family, plan.group["compile_kernels"]), []).append(index)
        updates: dict[int, Tensor] = {}
        for (family, compiled), members in batches.items():
            states = [self.state[plans[i].key] for i in members]
            if compiled:
                precondition = self._kernel(family.precondition, True)
                results = [precondition(state, directions[i]) for state, i in zip(states, members)]
            else:
                results = family.precondition_many(states, [directions[i] for i in members])
            updates.update(zip(members, results))
        return {plans[i].key: updates[i] for i in range(len(plans))}

    def _kernel(self, function: Callable[..., Any], compiled: bool) -> Callable[..., Any]:
        """``function``, or its ``torch.compile``d form (made once per function) where ``compiled``."""
        if not compiled:
            return function
        if function not in self._compiled:
            self._compiled[function] = torch.compile(function)
        return self._compiled[function]

    # ----------------------------------------------------------------------------- state dict

    def _owned_indices(self) -> set[int]:
        """Indices (in ``state_dict`` order) of the parameters that key the blocks this process owns."""
        index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        return {index[plan.key] for plan in self._plans() if self._distribution.owns(plan)}

    def consolidate_state_dict(self) -> None:
        """Gather every owner's state now (a collective under sharding: every process calls it), so
        that :meth:`state_dict` returns all of it, on any one process, until the next ``step()``."""
        self._gathered = self._distribution.gather_state(super().state_dict(), self._owned_indices())

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in the format of ``torch.optim``. Under data-parallel sharding the same
        at every world size and a collective (as Accelerate's ``save_state`` calls it, on every process);
        under FSDP2 this process's blocks and every block's counters (for
        ``torch.distributed.checkpoint``, which saves each rank's part). After
        :meth:`consolidate_state_dict`, every owner's state until the next ``step()``."""
        local = super().state_dict()
        if self._gathered is not None:
            return {"state": self._gathered["state"], "param_groups": local["param_groups"]}
        gather = self._distribution.gather_state
        return self._distribution.state_dict(local, lambda: gather(local, self._owned_indices()))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps every state tensor's saved dtype (the base
        class would round an fp32 preconditioner of a bf16 parameter), and refuses a state of other
        shapes or families or with non-finite values (:func:`.checkpoint.check_loaded_state`); options
        added since the save get their defaults. Takes a state saved at any world size (sharded: keeps its own)."""
        saved_ids = [key for group in state_dict["param_groups"] for key in group["params"]]
        position = {key: i for i, key in enumerate(saved_ids)}  # ids, or FQNs from torch.distributed.checkpoint
        saved_state = {position[key]: value for key, value in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": {}})
        fill_missing_options(self.param_groups, self.defaults)
        params = [p for group in self.param_groups for p in group["params"]]
        plans = {plan.key: plan for plan in self._plans()}
        owned = self._owned_indices()
        self._gathered = None
        for index, value in saved_state.items():
            if params[index] in plans:
                check_loaded_state(plans[params[index]], value, index, owned=index in owned)
            value = self._distribution.keep_loaded(index in owned, value)
            device = params[index].device
            self.state[params[index]] = upgrade_loaded_state(copy_to_device(value, device), device)
            if params[index] in plans:
                conform_loaded_cache(plans[params[index]], self.state[params[index]])
