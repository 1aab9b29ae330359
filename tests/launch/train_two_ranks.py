"""Run under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU): a PSGDTrainer run
with exact H v and gradient accumulation; every rank saves its final parameters to OUT/rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_helpers import tiny_llama, token_dataset  # noqa: E402

from hf_psgd import PSGDTrainer, PSGDTrainingArguments  # noqa: E402
from hf_psgd.distributed import end_multiprocess_run  # noqa: E402


def main(out: Path, optim_args: str) -> None:
    args = PSGDTrainingArguments(
        output_dir=str(out / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.3,
        optim="psgd_kron",
        optim_args=optim_args,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    trainer = PSGDTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(rows=32))
    trainer.train()
    world = trainer.accelerator.num_processes
    rank = trainer.accelerator.process_index
    torch.save(
        {"world": world, "params": {n: p.detach() for n, p in trainer.model.named_parameters()}}, out / f"rank{rank}.pt"
    )
    end_multiprocess_run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
