"""The data side of opacus_fast: exact Poisson sampling, physical batches and the masks of padded rows.

It knows nothing about clipping; it only publishes, per physical batch, a :class:`PhysicalBatchInfo` into a
:class:`BatchContext` that the training side reads.
"""

from .context import BatchContext, PhysicalBatchInfo
from .loader import DPDataLoader
from .sampler import DistributedPoissonBatchSampler, PoissonBatchSampler

__all__ = ["BatchContext", "DPDataLoader", "DistributedPoissonBatchSampler", "PhysicalBatchInfo", "PoissonBatchSampler"]
