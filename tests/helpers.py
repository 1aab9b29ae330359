"""Ground-truth problems shared by the tests: known Hessians, Rosenbrock, a tiny transformer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def random_symmetric(n: int, low: float = 1.0, high: float = 10.0, indefinite: bool = False, seed: int = 0) -> Tensor:
    """A random symmetric n x n matrix with eigenvalue magnitudes log-spaced in [low, high]
    (alternating signs when ``indefinite``), float64."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64)
    if indefinite:
        values = values * torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)
    return basis @ torch.diag(values) @ basis.T


def matrix_abs(h: Tensor) -> Tensor:
    """|H| = V |Lambda| V^T."""
    values, vectors = torch.linalg.eigh(h)
    return vectors @ torch.diag(values.abs()) @ vectors.T


def matrix_power(h: Tensor, power: float) -> Tensor:
    values, vectors = torch.linalg.eigh(h)
    return vectors @ torch.diag(values.pow(power)) @ vectors.T


def relative_identity_error(product: Tensor) -> float:
    """RMS of the entries of ``product - I`` (0 when the preconditioner is exact)."""
    n = product.shape[0]
    return ((product - torch.eye(n, dtype=product.dtype)).norm() / math.sqrt(n)).item()


def rosenbrock(x: Tensor) -> Tensor:
    """The N-dimensional Rosenbrock function (minimum 0 at all ones)."""
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


class TinyTransformer(nn.Module):
    """A 1-layer causal transformer LM with hand-written (twice differentiable) attention."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        attention = scores.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj(torch.einsum("bhqk,bkhd->bqhd", attention, v).reshape(b, t, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def copy_task_batch(gen: torch.Generator, batch: int = 16, vocab: int = 32, seq: int = 8) -> Tensor:
    """Sequences whose second half repeats the first: learnable, so the loss must fall."""
    half = torch.randint(0, vocab, (batch, seq // 2), generator=gen)
    return torch.cat([half, half], dim=1)


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
