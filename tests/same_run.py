"""What "the same training" means in tests: equal up to float rounding, not to the last bit.

Two runs of one training agree bit for bit only where the float arithmetic is reproducible. MKL with more
than one thread on some CPUs (and cuBLAS/cuDNN on GPUs) changes the last bits from run to run (issue 11),
and a different thread count always may. Measured on the tiny models of these tests (runs split 1 thread /
2 threads, against an uninterrupted run): rounding moves the losses by < 1e-6 and the trained weights by
< 2e-5 (relative); a wrong resume (optimizer state or generator not restored, a step skipped) moves the
losses by > 2e-4 and the weights by > 7e-3. The tolerances sit between, with a margin of 10x on each side.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

LOSS_RTOL = 2e-5
WEIGHTS_RTOL = 3e-4


def weights_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|a - b| / |a| over all tensors together: one relative distance, not dominated by a near-zero entry."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    norm = sum(float(a[k].double().square().sum()) for k in a)
    return (diff / norm) ** 0.5


def assert_same_losses(a: Sequence[float], b: Sequence[float]) -> None:
    assert len(a) == len(b), f"{len(a)} losses vs {len(b)}"
    worst = max((abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)), default=0.0)
    assert worst <= LOSS_RTOL, f"losses differ by {worst:.2e} (relative): more than float rounding"


def assert_same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    distance = weights_distance(a, b)
    assert distance <= WEIGHTS_RTOL, f"weights differ by {distance:.2e} (relative): more than float rounding"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block on n intra-op threads, so a test sees the rounding that another thread count brings."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
