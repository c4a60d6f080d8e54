"""The channel through which the data side tells the training side about the current physical batch.

The Poisson loader publishes one :class:`PhysicalBatchInfo` per physical batch it yields; the clipping engine
reads the mask (padded rows get clip factor 0) and records the batch it trained, whose ``is_last`` the optimizer
reads (noise is added once per logical batch). Neither side imports the other: both only know this module.
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
    """Holds the info of the physical batch most recently handed to the user's loop (and of the one before it in
    the same iteration), and what the training side did with them.
    """

    def __init__(self) -> None:
        self.current: PhysicalBatchInfo | None = None
        #: the batch published before ``current`` in the same iteration (None at its start)
        self.previous: PhysicalBatchInfo | None = None
        #: the physical batch whose backward finished last (set by the training side)
        self.trained: PhysicalBatchInfo | None = None
        #: the last physical batch of the logical batch that the training side released last (noised and stepped)
        self.released: PhysicalBatchInfo | None = None
        #: since the last release: whether the model ran a forward pass that builds a graph, and how many backward
        #: passes produced clipped parameter gradients (set by the training side)
        self.forward_since_release = False
        self.clipped_since_release = 0

    def publish(self, info: PhysicalBatchInfo | None) -> None:
        """Make ``info`` the current physical batch (None clears it, at the end of an iteration)."""
        self.previous = self.current if info is not None else None
        self.current = info

    def mark_trained(self, info: PhysicalBatchInfo) -> None:
        """Record that the backward over ``info``'s rows has finished (called by the training side)."""
        self.trained = info
