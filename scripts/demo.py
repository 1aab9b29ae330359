"""Demo: PSGD-Kron and AdamW side by side on a tiny byte-level GPT (offline, CPU, about a minute).

Both optimizers train the same model from the same initialisation on the same batches of Python
standard-library source, AdamW at ``--lr`` and PSGD at the rate the quality suite's rule gives for it
(``hf_psgd.learning_rate_from_adamw``: ``min(2 lr, 3e-3)``) unless ``--psgd-lr`` sets one; the script prints
both training losses as it goes and the held-out losses at the end.

    python scripts/demo.py [--steps 300] [--lr 1e-3] [--psgd-lr 2e-3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tiny_gpt import GPTConfig, TinyGPT, random_batch, stdlib_bytes

from hf_psgd import PSGD, learning_rate_from_adamw


def held_out_loss(model: TinyGPT, corpus: torch.Tensor, config: GPTConfig, batches: int = 20) -> float:
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return sum(model.loss(random_batch(corpus, 16, config.seq, gen)).item() for _ in range(batches)) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate")
    parser.add_argument("--psgd-lr", type=float, help="PSGD's learning rate (default: learning_rate_from_adamw(--lr))")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    psgd_lr = learning_rate_from_adamw(args.lr) if args.psgd_lr is None else args.psgd_lr
    print(f"learning rates: AdamW {args.lr:g}, PSGD-Kron {psgd_lr:g}")

    config = GPTConfig()
    corpus = stdlib_bytes()
    split = int(0.9 * corpus.numel())
    train, held_out = corpus[:split], corpus[split:]
    torch.manual_seed(0)
    models = {"PSGD-Kron": TinyGPT(config)}
    models["AdamW"] = copy.deepcopy(models["PSGD-Kron"])
    optimizers = {
        "PSGD-Kron": PSGD(models["PSGD-Kron"].parameters(), lr=psgd_lr),
        "AdamW": torch.optim.AdamW(models["AdamW"].parameters(), lr=args.lr),
    }
    seconds = dict.fromkeys(models, 0.0)
    gen = torch.Generator().manual_seed(0)
    print(f"{'step':>6} " + " ".join(f"{name:>12}" for name in models))
    for step in range(1, args.steps + 1):
        batch = random_batch(train, args.batch, config.seq, gen)
        losses = {}
        for name, model in models.items():
            start = time.perf_counter()
            optimizers[name].zero_grad()
            loss = model.loss(batch)
            loss.backward()
            optimizers[name].step()
            seconds[name] += time.perf_counter() - start
            losses[name] = loss.item()
        if step % 25 == 0 or step == 1:
            print(f"{step:>6} " + " ".join(f"{losses[name]:>12.4f}" for name in models))
    print("\nheld-out loss after", args.steps, "steps (seconds of training):")
    for name, model in models.items():
        print(f"  {name:<10} {held_out_loss(model, held_out, config):.4f}  ({seconds[name]:.1f} s)")


if __name__ == "__main__":
    main()
