"""Train a small byte-level GPT with PSGD under FSDP2 (``fully_shard``) in N processes, on a CPU
(gloo) or on GPUs (NCCL), and checkpoint it through ``torch.distributed.checkpoint``:

    torchrun --nproc_per_node 2 scripts/train_fsdp2.py --steps 100 --out outputs/fsdp2

Every transformer block and the root are sharded on dim 0; each rank trains on its part of every
global batch (FSDP2 averages the gradients), PSGD gives every preconditioner one owner rank (see the
README, "Multi-process training"). At the end the model and the optimizer are saved sharded (each
rank writes its own part); ``--resume`` continues from such a checkpoint at any process count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tiny_gpt import GPTConfig, TinyGPT, random_batch, stdlib_bytes
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from hf_psgd import PSGD
from hf_psgd.distributed import end_multiprocess_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows of 65 bytes)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--preconditioner", default="kron", help="kron, diag, lra, xmat or dense")
    parser.add_argument("--out", type=Path, default=Path("outputs/fsdp2"))
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    )
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab=256, seq=64, dim=64, layers=2, heads=4)).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = PSGD(model.parameters(), lr=args.lr, preconditioner=args.preconditioner)
    checkpoint = args.out / "checkpoint"
    start = 0
    if args.resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "step": torch.zeros((), dtype=torch.long)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        start = int(state["step"])
    corpus = stdlib_bytes(200_000)
    generator = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        tokens = random_batch(corpus, args.batch, 64, generator)  # the same global batches on every rank
        if step < start:
            continue
        optimizer.zero_grad()
        loss = model.loss(tokens.chunk(world)[rank].to(device))
        loss.backward()
        optimizer.step()
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} (rank 0's part of the batch)", flush=True)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(args.steps)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(checkpoint, overwrite=True))
    if rank == 0:
        print(f"saved {checkpoint} ({world} processes)", flush=True)
    end_multiprocess_run()


if __name__ == "__main__":
    main()
