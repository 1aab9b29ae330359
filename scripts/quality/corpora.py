"""Text corpora that need no download: the standard library's docstrings, its language-reference topics and
arithmetic the suite generates.

Both come back as byte tokens (``torch.long`` in 0..255), split into a training and a held-out part.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

#: Folders of the standard-library tree that are not the standard library's own modules (third-party packages
#: where Python is installed in place) or are tests and demos.
EXCLUDED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"})


def as_tokens(text: bytes) -> Tensor:
    """Bytes as a ``long`` tensor of tokens."""
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def stdlib_modules() -> list[Path]:
    """The standard library's ``.py`` files (sorted), without third-party packages, tests and demos."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not EXCLUDED_FOLDERS & set(p.relative_to(root).parts))


def module_docstrings(path: Path) -> str:
    """The docstrings of a module, its classes and its functions, in source order, blank-line separated."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return "\n\n".join(doc for doc in docstrings if doc)


def stdlib_docstrings(held_out_every: int = 10) -> tuple[Tensor, Tensor]:
    """``(train, held_out)`` byte tokens of the standard library's docstrings; every ``held_out_every``-th module
    (in sorted path order) is held out, so the held-out text comes from modules never trained on."""
    train, held_out = [], []
    for index, path in enumerate(stdlib_modules()):
        text = module_docstrings(path)
        if text:
            (held_out if index % held_out_every == held_out_every - 1 else train).append(text)
    return as_tokens("\n\n".join(train).encode()), as_tokens("\n\n".join(held_out).encode())


def pydoc_topics(held_out_every: int = 10) -> tuple[Tensor, Tensor]:
    """``(train, held_out)`` byte tokens of the language reference's topics that ``pydoc`` shows
    (``pydoc_data.topics``: about 460k characters of prose and code); every ``held_out_every``-th topic (in
    sorted order) is held out."""
    from pydoc_data.topics import topics

    train, held_out = [], []
    for index, (_, text) in enumerate(sorted(topics.items())):
        (held_out if index % held_out_every == held_out_every - 1 else train).append(text)
    return as_tokens("\n\n".join(train).encode()), as_tokens("\n\n".join(held_out).encode())


def arithmetic_line(rng: random.Random) -> str:
    """One exercise with its exact answer: ``a+b=c``, ``a-b=c``, ``a*b=c`` or ``(a+b)*c=d`` (random operands)."""
    form = rng.randrange(4)
    if form == 3:
        a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(10)
        return f"({a}+{b})*{c}={(a + b) * c}"
    if form == 2:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}*{b}={a * b}"
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"{a}+{b}={a + b}" if form == 0 else f"{a}-{b}={a - b}"


def arithmetic_text(lines: int, seed: int) -> Tensor:
    """``lines`` exercises, one per line, drawn by a generator seeded with ``seed``, as byte tokens."""
    rng = random.Random(seed)
    return as_tokens("".join(arithmetic_line(rng) + "\n" for _ in range(lines)).encode())
