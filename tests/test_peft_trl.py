"""PSGD with exact H v over LoRA adapter weights: PEFT under PSGDTrainer, and TRL's SFT trainer."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import Dataset
from hf_helpers import tiny_llama, tiny_tokenizer, token_dataset
from peft import LoraConfig, get_peft_model

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


def test_trl_sft_with_lora_and_hvp(tmp_path: Path) -> None:
    """TRL's fused LM-head loss is not twice differentiable: HVP steps go through plain logits."""
    texts = [f"question {a} plus {b} answer {a + b}" for a in range(6) for b in range(6)]
    tokenizer = tiny_tokenizer(texts)
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = PSGDSFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=0.3,
        optim="psgd_kron",
        optim_args="curvature=hvp,precond_update_prob=0.5",
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=16,
        disable_tqdm=True,
        logging_steps=1,
    )
    assert config.optim == "psgd_kron"
    trainer = PSGDSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    optimizer = trainer.optimizer.optimizer
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    assert states and all(s["precond_updates"] == 2 for s in states)
    assert all("lora_" in name for name, p in trainer.model.named_parameters() if p.requires_grad)
