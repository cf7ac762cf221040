"""Which rows of each UNet call are conditional, however the WebUI splits its CFG batch.

A1111's CFG denoiser builds one batch per step, all conditional rows first (one per AND
sub-prompt of each image) and the unconditional rows after, then runs it through the UNet in one
call or in consecutive chunks (batch_cond_uncond off, prompts of different lengths), always in
order, and drops the unconditional rows entirely when it skips them. So: reset at each step with the
number of conditional rows, then each call covers the next rows of that batch.
"""

from __future__ import annotations


class RowTracker:
    """Turns a sequence of UNet calls into absolute rows of the step's batch."""

    def __init__(self) -> None:
        self.n_cond = 0
        self.offset = 0

    def new_step(self, n_cond: int) -> None:
        self.n_cond = n_cond
        self.offset = 0

    def next_call(self, batch: int) -> list[int]:
        """Conditional rows, local to this call, of the next `batch` rows of the step's batch."""
        start = self.offset
        self.offset += batch
        return [i - start for i in range(start, start + batch) if i < self.n_cond]
