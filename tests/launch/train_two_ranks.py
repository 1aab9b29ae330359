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


def train(out: Path, optim_args: str, accumulation: int) -> PSGDTrainer:
    """4 steps of micro-batches of 2 rows: with 2 processes and ``accumulation=2``, or 1 process and
    ``accumulation=4``, the same 8 rows per step."""
    args = PSGDTrainingArguments(
        output_dir=str(out / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
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
    return trainer


def main(out: Path, optim_args: str) -> None:
    trainer = train(out, optim_args, accumulation=2)
    world = trainer.accelerator.num_processes
    rank = trainer.accelerator.process_index
    torch.save(
        {"world": world, "params": {n: p.detach() for n, p in trainer.model.named_parameters()}}, out / f"rank{rank}.pt"
    )
    end_multiprocess_run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
