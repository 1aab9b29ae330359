"""A GPT-2-style causal LM in plain torch and a byte-level corpus that needs no download.

Shared by the demo and the benchmarks. The attention is written out (softmax(QK^T / sqrt(d)) with a
causal mask) so the model is twice differentiable on any device, as exact Hessian-vector
products need. The corpus is the source of Python's own standard library, read as bytes.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass
class GPTConfig:
    vocab: int = 256
    seq: int = 64
    dim: int = 128
    layers: int = 2
    heads: int = 4


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim)
        )
        self.register_buffer("mask", torch.ones(config.seq, config.seq, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        attention = scores.masked_fill(self.mask[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.pos = nn.Parameter(torch.zeros(config.seq, config.dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        self.head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: Tensor) -> Tensor:
        """Next-token cross-entropy of a ``(batch, seq + 1)`` token tensor."""
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def stdlib_bytes(limit: int = 2_000_000) -> Tensor:
    """The first ``limit`` bytes of the standard library's ``.py`` files (sorted paths) as tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def random_batch(corpus: Tensor, batch: int, seq: int, gen: torch.Generator) -> Tensor:
    """``batch`` random windows of ``seq + 1`` tokens."""
    starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([corpus[s : s + seq + 1] for s in starts.tolist()])
