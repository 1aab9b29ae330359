"""PSGDTrainer: optimizer names (Python, CLI, YAML), exact H v inside Trainer steps, checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hf_helpers import classification_dataset, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_dataset
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import HfArgumentParser, Trainer, TrainerCallback

from hf_psgd import PSGD, PSGDTrainer, PSGDTrainingArguments
from hf_psgd.integrations.hvp_backward import check_twice_differentiable


def _args(tmp_path: Path, **overrides) -> PSGDTrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        optim="psgd_kron",
        optim_args="curvature=hvp,precond_update_prob=1.0",
    )
    options.update(overrides)
    return PSGDTrainingArguments(**options)


# ------------------------------------------------------------------------------------------ names


def test_name_route_from_python_cli_and_yaml(tmp_path: Path) -> None:
    args = _args(tmp_path, optim="psgd_diag", optim_args="curvature=whiten,precond_lr=0.2,max_update_rms=none")
    assert args.optim == "psgd_diag"
    assert '"optim": "psgd_diag"' in args.to_json_string()
    cls, kwargs = PSGDTrainer.get_optimizer_cls_and_kwargs(args)
    assert cls is PSGD
    assert kwargs == {
        "lr": 1e-2,
        "preconditioner": "diag",
        "curvature": "whiten",
        "precond_lr": 0.2,
        "max_update_rms": None,
    }

    parser = HfArgumentParser(PSGDTrainingArguments)
    (cli,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "psgd_kron", "--optim_args", "curvature=hvp,seed=3"]
    )
    assert cli.optim == "psgd_kron" and PSGDTrainer.get_optimizer_cls_and_kwargs(cli)[1]["seed"] == 3

    sharding = _args(tmp_path, optim="psgd_kron", optim_args="shard_preconditioners=false,communication_dtype=bfloat16")
    kwargs = PSGDTrainer.get_optimizer_cls_and_kwargs(sharding)[1]
    assert kwargs["shard_preconditioners"] is False and kwargs["communication_dtype"] == "bfloat16"
    automatic = _args(tmp_path, optim="psgd_kron", optim_args="shard_preconditioners=none")
    assert PSGDTrainer.get_optimizer_cls_and_kwargs(automatic)[1]["shard_preconditioners"] is None
    schedule = _args(tmp_path, optim="psgd_kron", optim_args="precond_update_prob=flat_steps:100;decay:0.01")
    kwargs = PSGDTrainer.get_optimizer_cls_and_kwargs(schedule)[1]
    assert kwargs["precond_update_prob"] == {"flat_steps": 100.0, "decay": 0.01}
    constant = _args(tmp_path, optim="psgd_kron", optim_args="precond_update_prob=0.25")
    assert PSGDTrainer.get_optimizer_cls_and_kwargs(constant)[1]["precond_update_prob"] == 0.25

    recipe = tmp_path / "args.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\noptim: psgd_diag\noptim_args: seed=4,curvature=hvp\n")
    (from_yaml,) = parser.parse_yaml_file(str(recipe))
    assert PSGDTrainer.get_optimizer_cls_and_kwargs(from_yaml)[1] == {
        "lr": from_yaml.learning_rate,
        "preconditioner": "diag",
        "seed": 4,
        "curvature": "hvp",
    }


def test_builtin_names_keep_working(tmp_path: Path) -> None:
    args = _args(tmp_path, optim="adamw_torch", optim_args=None)
    cls, _ = PSGDTrainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW


@pytest.mark.parametrize(
    ("optim", "optim_args", "message"),
    [
        ("psgd_shampoo", None, "optim='psgd_shampoo' is not a PSGD optimizer; choose one of "),
        ("psgd_kron", "curvature=newton", "curvature='newton' is invalid"),
        ("psgd_kron", "precond_lr=fast", "precond_lr='fast' is invalid"),
        ("psgd_kron", "betas=0.9", "unknown key 'betas'"),
        ("psgd_kron", "lr=0.1", "'lr' is set by TrainingArguments.learning_rate"),
        ("psgd_kron", "precond_lr=2", "precond_lr=2.0 is invalid: expected None (the curvature's default) or a number"),
        ("psgd_kron", "precond_update_prob=flat:9", "precond_update_prob has unknown keys ['flat']"),
        ("psgd_kron", "precond_update_prob=decay:x", "precond_update_prob='decay:x' is invalid"),
        ("psgd_kron", "precond_update_prob=decay", "precond_update_prob='decay' is invalid"),
        (  # refused here, not at the first step: Trainer calls step() without a closure
            "psgd_kron",
            "curvature=fd",
            "curvature='fd' needs step(closure) over a deterministic batch, which Trainer does not give; "
            "use curvature=whiten or curvature=hvp",
        ),
    ],
)
def test_bad_names_and_optim_args_are_named(tmp_path: Path, optim: str, optim_args: str | None, message: str) -> None:
    with pytest.raises(ValueError) as error:
        _args(tmp_path, optim=optim, optim_args=optim_args)
    assert message in str(error.value)


def test_cli_reports_bad_optim_args(tmp_path: Path) -> None:
    parser = HfArgumentParser(PSGDTrainingArguments)
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "psgd_kron", "--optim_args", "foo=1"]
        )


# ------------------------------------------------------------------------------------------ H v in Trainer


@pytest.fixture
def handed_products(monkeypatch):
    """Record every (probes, products) pair the Trainer hands to PSGD."""
    records = []
    original = PSGD.accumulate_hvp

    def spy(self, products):
        probes = self.hvp_probes()
        records.append(({p: probes[p].clone() for p in products}, {p: h.clone() for p, h in products.items()}))
        original(self, products)

    monkeypatch.setattr(PSGD, "accumulate_hvp", spy)
    return records


def _assert_handed_hvp_is_exact(
    model: nn.Module, reference: nn.Module, loss_of: Callable[[nn.Module], Tensor], handed_products
) -> None:
    """The one H v the Trainer handed to PSGD for ``model`` equals the H v of ``loss_of(reference)`` (``reference``:
    an untouched copy of the untrained ``model``) for the same probe, by double backward with math attention."""
    ((probes, products),) = handed_products
    by_name = dict(model.named_parameters())
    reference.to(next(iter(probes.values())).device)
    names, params = zip(*reference.named_parameters())
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_of(reference), params, create_graph=True)
        expected = torch.autograd.grad(grads, params, [probes[by_name[name]] for name in names])
    for name, hv in zip(names, expected):
        torch.testing.assert_close(
            products[by_name[name]], hv, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"H v of {name}: {m}"
        )


def _causal_lm_loss(data: Dataset) -> Callable[[nn.Module], Tensor]:
    """A causal LM's loss on all of ``data`` as one batch, normalised like Trainer's (token sum over
    ``num_items_in_batch``, the batch's label count)."""
    batch = torch.tensor(data["input_ids"])

    def loss(model: nn.Module) -> Tensor:
        tokens = batch.to(next(model.parameters()).device)
        return model(input_ids=tokens, labels=tokens, num_items_in_batch=tokens.numel()).loss

    return loss


@pytest.mark.parametrize("accumulation", [1, 4])
def test_trainer_hvp_equals_hand_computed_hvp(
    tmp_path: Path, handed_products, accumulation: int, device: torch.device
) -> None:
    """The H v PSGD receives in a Trainer step is that of the whole accumulated batch's loss, for
    the step's probe; computed here by hand with torch.autograd on the same batch, normalised like
    Trainer's gradient (token sum over ``num_items_in_batch``, the batch's label count)."""
    model = tiny_gpt2()  # default sdpa attention: the trainer must switch to the math backend
    data = token_dataset(rows=8)
    args = _args(
        tmp_path,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        use_cpu=device.type == "cpu",
    )
    PSGDTrainer(model=model, args=args, train_dataset=data).train()
    _assert_handed_hvp_is_exact(model, tiny_gpt2(), _causal_lm_loss(data), handed_products)


def test_trainer_hvp_of_a_bert_classifier_equals_hand_computed_hvp(tmp_path: Path, handed_products) -> None:
    """BERT's classification loss accepts but ignores ``num_items_in_batch``, so Trainer does not
    divide it by the accumulation steps: its gradient is the sum of the micro-batch means. H v must
    be scaled the same way: here, with 2 equal micro-batches, twice the full-batch mean's."""
    model = tiny_bert_classifier()
    data = classification_dataset(rows=8)
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0)
    PSGDTrainer(model=model, args=args, train_dataset=data).train()

    inputs = {"input_ids": torch.tensor(data["input_ids"]), "labels": torch.tensor(data["labels"])}
    _assert_handed_hvp_is_exact(model, tiny_bert_classifier(), lambda ref: 2 * ref(**inputs).loss, handed_products)


def test_hvp_only_on_fitting_steps_and_logs_psgd_figures(tmp_path: Path, handed_products) -> None:
    history = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    args = _args(tmp_path, max_steps=6, optim_args="curvature=hvp,precond_update_prob=0.5")
    PSGDTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(), callbacks=[Keep()]).train()
    assert len(handed_products) == 3  # steps 0, 2, 4
    training_logs = [entry for entry in history if "loss" in entry]
    assert training_logs[-1]["psgd/precond_updates"] > 0
    assert training_logs[-1]["psgd/update_prob"] == 0.5
    assert training_logs[-1]["psgd/skipped_steps"] == 0
    last = training_logs[-1]
    assert 0 < last["psgd/precond_scale_min"] <= last["psgd/precond_scale_median"] <= last["psgd/precond_scale_max"]


def test_reentrant_checkpointing_is_refused_before_a_wrong_hvp(tmp_path: Path) -> None:
    args = _args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    trainer = PSGDTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
    with pytest.raises(ValueError, match="use_reentrant=True"):
        trainer.train()


def test_non_reentrant_checkpointing_hands_the_exact_hvp(tmp_path: Path, handed_products) -> None:
    """Checkpointed layers recompute their forward inside the backward: the H v PSGD receives must
    still equal the one computed by hand on a model without checkpointing."""
    model = tiny_gpt2()
    data = token_dataset(rows=4)
    args = _args(tmp_path, activation_checkpointing=True, max_steps=1)
    PSGDTrainer(model=model, args=args, train_dataset=data).train()

    assert model.is_activation_checkpointing
    _assert_handed_hvp_is_exact(model, tiny_gpt2(), _causal_lm_loss(data), handed_products)


def test_attention_without_double_backward_fails_fast() -> None:
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2': exact Hessian-vector products"):
        check_twice_differentiable(model)


def test_bf16_autocast_trains_with_fp32_preconditioner(tmp_path: Path) -> None:
    args = _args(tmp_path, bf16=True, max_steps=4)
    trainer = PSGDTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    factors = [q for s in state.values() for q in s["Q"]]
    assert factors and all(q.dtype == torch.float32 for q in factors)


def test_plain_trainer_with_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    args = _args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=4)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=token_dataset(),
        optimizer_cls_and_kwargs=(PSGD, {"lr": 1e-2, "precond_update_prob": 1.0}),
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, PSGD)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_plain_trainer_with_a_psgd_name_is_refused_when_built(tmp_path: Path) -> None:
    """transformers has no public registry of optimizer names: plain Trainer would fail at train() with its
    own message; it is refused at construction, naming PSGDTrainer. Given an optimizer, the name is unused."""
    args = _args(tmp_path, optim="psgd_kron", optim_args=None, max_steps=1)
    assert args.get_process_log_level() >= 0  # outside a Trainer (example scripts call it first)
    with pytest.raises(ValueError, match=r"optim='psgd_kron' needs hf_psgd\.PSGDTrainer .*bases of Trainer"):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset())
    Trainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset(), optimizer_cls_and_kwargs=(PSGD, {}))
    PSGDTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset())


def test_plain_trainer_with_hvp_says_to_use_psgd_trainer(tmp_path: Path) -> None:
    """Plain Trainer's backward keeps no graph: the first fitting step says what gives one."""
    args = _args(tmp_path, optim="adamw_torch", optim_args=None, max_steps=1)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=token_dataset(rows=4),
        optimizer_cls_and_kwargs=(PSGD, {"lr": 0.3, "curvature": "hvp"}),
    )
    with pytest.raises(RuntimeError, match="With transformers.Trainer, use PSGDTrainer"):
        trainer.train()


@pytest.mark.parametrize(
    ("optim", "optim_args", "expected"),
    [("psgd_kron", None, 3e-3), ("psgd_kron", "curvature=hvp", 0.3), ("psgd_diag", "curvature=whiten", 3e-3)],
)
def test_learning_rate_defaults_to_psgd_default_for_the_curvature(
    tmp_path: Path, caplog, optim: str, optim_args: str | None, expected: float
) -> None:
    """Trainer's 5e-5 barely moves a whitening PSGD and an HVP one not at all: ``None`` resolves per curvature,
    once, where the scheduler and the optimizer read it."""
    with caplog.at_level("INFO", logger="hf_psgd.integrations.arguments"):
        args = _args(tmp_path, learning_rate=None, optim=optim, optim_args=optim_args)
    assert args.learning_rate == expected
    assert len([r for r in caplog.records if "learning_rate not given" in r.message]) == 1
    trainer = PSGDTrainer(model=nn.Linear(2, 1), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [expected] * len(trainer.optimizer.param_groups)
    assert trainer.lr_scheduler.base_lrs == [expected] * len(trainer.optimizer.param_groups)


def test_learning_rate_given_is_kept_and_other_optimizers_keep_trainers_default(tmp_path: Path) -> None:
    assert _args(tmp_path, learning_rate=0.02).learning_rate == 0.02
    assert _args(tmp_path, learning_rate=None, optim="adamw_torch", optim_args=None).learning_rate == 5e-5
    parser = HfArgumentParser(PSGDTrainingArguments)
    assert parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])[0].learning_rate == 5e-5
    (given,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "psgd_kron"])
    assert given.learning_rate == 3e-3


def test_pin_memory_defaults_to_whether_an_accelerator_is_present(tmp_path: Path) -> None:
    """PyTorch warns on every DataLoader that pins memory without an accelerator."""
    default = PSGDTrainingArguments(output_dir=str(tmp_path), optim="psgd_kron", report_to="none")
    assert default.dataloader_pin_memory is torch.accelerator.is_available()
    parser = HfArgumentParser(PSGDTrainingArguments)
    (explicit,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--dataloader_pin_memory", "true"])
    assert explicit.dataloader_pin_memory is True


def test_loss_falls_with_hvp_and_whitening(tmp_path: Path) -> None:
    """30 steps on a learnable pattern: the loss on the training rows ends at least 0.5 nats below
    the untrained model's (3.81 nats; whitening reaches about 2.0, hvp about 2.7)."""
    data = token_dataset(rows=32)
    for optim_args, lr in (("curvature=whiten", 1e-2), ("curvature=hvp", 0.3)):
        args = _args(tmp_path, max_steps=30, learning_rate=lr, optim_args=optim_args, lr_scheduler_type="constant")
        trainer = PSGDTrainer(model=tiny_gpt2(), args=args, train_dataset=data)
        untrained = trainer.evaluate(data)["eval_loss"]
        trainer.train()
        trained = trainer.evaluate(data)["eval_loss"]
        assert trained < untrained - 0.5, (optim_args, untrained, trained)


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("curvature", ["whiten", "hvp"])
def test_resume_from_checkpoint_is_bitwise_identical(tmp_path: Path, curvature: str, device: torch.device) -> None:
    """2N steps in one go, or N steps, a checkpoint, and N more from it: identical parameters (on a
    GPU within float tolerance: its embedding backward adds atomically, in no fixed order)."""
    optim_args = f"curvature={curvature},precond_update_prob=0.5"
    on_cpu = device.type == "cpu"
    straight = PSGDTrainer(
        model=tiny_llama(),
        args=_args(tmp_path / "a", max_steps=6, optim_args=optim_args, use_cpu=on_cpu),
        train_dataset=token_dataset(rows=24),
    )
    straight.train()

    first = _args(
        tmp_path / "b", max_steps=6, optim_args=optim_args, save_strategy="steps", save_steps=3, use_cpu=on_cpu
    )
    interrupted = PSGDTrainer(model=tiny_llama(), args=first, train_dataset=token_dataset(rows=24))
    interrupted.train()  # writes checkpoint-3 and checkpoint-6; resume from the middle one
    resumed = PSGDTrainer(model=tiny_llama(), args=first, train_dataset=token_dataset(rows=24))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))

    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        if on_cpu:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)
