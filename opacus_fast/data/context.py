"""The channel through which the data side tells the training side about the current physical batch.

The Poisson loader publishes one :class:`PhysicalBatchInfo` per physical batch it yields; the clipping engine
reads the mask (padded rows get clip factor 0) and the optimizer reads ``is_last`` (noise is added once per
logical batch). Neither side imports the other: both only know this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PhysicalBatchInfo:
    """What the training side needs to know about one physical batch.

    Attributes:
        mask: bool tensor of shape (rows,), True for real examples and False for padding rows; None when every
            row is real.
        num_real: number of real (unmasked) examples in this physical batch.
        index: position of this physical batch within its logical batch (0-based).
        is_last: True for the last physical batch of its logical batch.
        step: index of the logical batch (0-based) since the loader's iteration began.
    """

    mask: torch.Tensor | None
    num_real: int
    index: int
    is_last: bool
    step: int


class BatchContext:
    """Holds the info of the physical batch most recently handed to the user's loop."""

    def __init__(self) -> None:
        self.current: PhysicalBatchInfo | None = None

    def publish(self, info: PhysicalBatchInfo | None) -> None:
        """Make ``info`` the current physical batch (None clears it)."""
        self.current = info
