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
    """Holds the info of the physical batch most recently handed to the user's loop, and of the one trained last.

    A training side that reads the infos sets ``trains``; from then on every physical batch the loader yields must
    be trained (its backward finished, :meth:`mark_trained`) before the next one is published. A loop that fetches
    batches ahead (a prefetching wrapper) would otherwise read the next batch's mask for the current rows, and one
    that skips a batch would release part of a Poisson sample.
    """

    def __init__(self) -> None:
        self.current: PhysicalBatchInfo | None = None
        #: the physical batch whose backward finished last (set by the training side)
        self.trained: PhysicalBatchInfo | None = None
        #: whether a training side reads the infos (and so checks that each yielded batch is trained in turn)
        self.trains = False
        #: the last physical batch of the logical batch that the training side released last (noised and stepped)
        self.released: PhysicalBatchInfo | None = None

    def publish(self, info: PhysicalBatchInfo | None) -> None:
        """Make ``info`` the current physical batch (None clears it, at the end of an iteration).

        Raises if a training side reads the infos and the current batch was not trained before the next one.
        """
        if info is not None and self.trains and self.current is not None and self.current is not self.trained:
            raise RuntimeError(
                "the next physical batch was requested before the current one was trained (no backward() finished "
                "for it): each batch the loader yields must go through forward and backward before the next is "
                "fetched. A wrapper that fetches batches ahead (a prefetcher, accelerate's prepare) would pair one "
                "batch's rows with the next one's padding mask, and skipping a batch would release part of a "
                "Poisson sample. Iterate the loader returned by make_private_fast directly and run every batch it "
                "yields, empty ones included"
            )
        self.current = info

    def mark_trained(self, info: PhysicalBatchInfo) -> None:
        """Record that the backward over ``info``'s rows has finished (called by the training side)."""
        self.trained = info
