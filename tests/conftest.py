"""Fixtures shared by the test modules."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device the test runs on: the CPU, and a CUDA device where there is one (marked ``cuda``:
    ``pytest -m cuda`` runs the GPU subset, as ``scripts/bench_gpu.py`` does)."""
    return torch.device(request.param)


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo process group for the test (destroyed after it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
