"""A PSGDTrainer run for the checkpoint tests, the same at any world size (global batch 4): run it
with plain ``python`` (1 process) or under ``accelerate launch --multi_gpu --num_processes 2``.

    trainer_checkpoint.py OUT OPTIM_ARGS [CHECKPOINT]

trains 6 steps with a checkpoint every 3 into OUT/run (resuming from CHECKPOINT if given) and saves
the final parameters to OUT/final.pt (main process). The learning rate is PSGD's default for the
curvature: whitening at 0.3 would be chaotic and amplify the rounding of the two-process gradient
average to percents of the weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_helpers import tiny_llama, token_dataset  # noqa: E402

from hf_psgd import PSGDTrainer, PSGDTrainingArguments  # noqa: E402
from hf_psgd.distributed import end_multiprocess_run  # noqa: E402

GLOBAL_BATCH = 4


def main(out: Path, optim_args: str, checkpoint: str | None) -> None:
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    args = PSGDTrainingArguments(
        output_dir=str(out / "run"),
        max_steps=6,
        save_steps=3,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=None,
        optim="psgd_kron",
        optim_args=optim_args,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        use_cpu=True,
        max_grad_norm=0.0,
    )
    trainer = PSGDTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(rows=32))
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, out / "final.pt")
    end_multiprocess_run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
