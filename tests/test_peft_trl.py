"""PSGD with exact H v over LoRA adapter weights: PEFT under PSGDTrainer, and TRL's SFT trainer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from hf_helpers import tiny_llama, tiny_tokenizer, token_dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from hf_psgd import PSGD, PSGDSFTConfig, PSGDSFTTrainer, PSGDTrainer, PSGDTrainingArguments


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_peft_lora_hvp_updates_adapters_only(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), _lora())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = PSGDTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=0.3,
        optim="psgd_kron",
        optim_args="curvature=hvp,precond_update_prob=1.0",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = PSGDTrainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, PSGD)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(optimizer.state[p]["precond_updates"] == 4 for group in optimizer.param_groups for p in group["params"])
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]) and param.grad is None, name
    assert any(not torch.equal(model.get_parameter(n), before) for n, before in adapters.items())


_SUMS = [f"question {a} plus {b} answer {a + b}" for a in range(6) for b in range(6)]


def _sft_trainer(trainer_class: type, config_class: type, output: Path, **options: Any) -> Any:
    """A tiny Llama with LoRA adapters under TRL's SFT trainer, on sums; same weights and data every call."""
    tokenizer = tiny_tokenizer(_SUMS)
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = config_class(
        output_dir=str(output),
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=16,
        disable_tqdm=True,
        logging_steps=1,
        **options,
    )
    return trainer_class(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": _SUMS}),
        eval_dataset=Dataset.from_dict({"text": _SUMS[:8]}),
        processing_class=tokenizer,
        peft_config=_lora(),
    )


def test_trl_sft_with_lora_and_hvp(tmp_path: Path) -> None:
    """TRL's fused LM-head loss is not twice differentiable: HVP steps go through plain logits."""
    psgd = {"optim": "psgd_kron", "optim_args": "curvature=hvp,precond_update_prob=0.5"}
    trainer = _sft_trainer(PSGDSFTTrainer, PSGDSFTConfig, tmp_path, max_steps=4, learning_rate=0.3, **psgd)
    assert trainer.args.optim == "psgd_kron"
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    optimizer = trainer.optimizer.optimizer
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    assert states and all(s["precond_updates"] == 2 for s in states)
    assert all("lora_" in name for name, p in trainer.model.named_parameters() if p.requires_grad)
    assert all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(logs) for logs in trainer.state.log_history[:4])


def test_plain_sft_trainer_with_a_psgd_name_is_refused_when_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs hf_psgd\.PSGDTrainer \(hf_psgd\.PSGDSFTTrainer for TRL.*SFTTrainer"):
        _sft_trainer(SFTTrainer, PSGDSFTConfig, tmp_path, max_steps=1, optim="psgd_kron")


def test_trl_metrics_of_an_hvp_step_are_those_of_sft_trainer(tmp_path: Path) -> None:
    """Step 1 fits from exact H v; TRL's metrics of it (taken before the optimizer step) and its loss equal
    SFTTrainer's with AdamW on the same weights and batch (DFT: a loss other than plain cross-entropy), and
    evaluation counts the tokens trained on."""
    hvp = {"optim": "psgd_kron", "optim_args": "curvature=hvp,precond_update_prob=1.0"}
    runs = []
    for trainer_class, config_class, options in [
        (SFTTrainer, SFTConfig, {"learning_rate": 1e-3}),
        (PSGDSFTTrainer, PSGDSFTConfig, {"learning_rate": 0.3, **hvp}),
    ]:
        trainer = _sft_trainer(trainer_class, config_class, tmp_path, max_steps=1, loss_type="dft", **options)
        trainer.train()
        runs.append((trainer.state.log_history[0], trainer.evaluate()))
    (reference, reference_eval), (logs, evaluation) = runs
    assert logs["psgd/precond_updates"] > 0
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "loss"):
        assert logs[key] == pytest.approx(reference[key], rel=1e-5), key
    assert evaluation["eval_num_tokens"] == reference_eval["eval_num_tokens"] == reference["num_tokens"] > 0


def test_sft_config_learning_rate_defaults(tmp_path: Path) -> None:
    """``PSGDSFTConfig``: PSGD's default for the curvature with a PSGD name, SFTConfig's own (2e-5) otherwise."""
    common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert PSGDSFTConfig(**common, optim="psgd_kron", optim_args="curvature=hvp").learning_rate == 0.3
    assert PSGDSFTConfig(**common, optim="psgd_lra").learning_rate == 3e-3
    assert PSGDSFTConfig(**common).learning_rate == SFTConfig(**common).learning_rate == 2e-5
    assert PSGDSFTConfig(**common, optim="psgd_kron", learning_rate=0.05).learning_rate == 0.05


def test_sft_config_keeps_trl_checkpointing_default_without_deprecation_warning(tmp_path: Path) -> None:
    """TRL defaults the deprecated ``gradient_checkpointing`` to True, which made every default config warn;
    PSGDSFTConfig sets ``activation_checkpointing`` instead, and an explicit value of either name is kept."""
    options = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = PSGDSFTConfig(optim="psgd_kron", **options)
        off = PSGDSFTConfig(optim="psgd_kron", activation_checkpointing=False, **options)
    assert (default.activation_checkpointing, default.gradient_checkpointing) == (True, True)
    assert (off.activation_checkpointing, off.gradient_checkpointing) == (False, False)
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        assert PSGDSFTConfig(gradient_checkpointing=False, **options).activation_checkpointing is False
