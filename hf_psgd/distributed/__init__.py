"""Sharding PSGD's preconditioners over the processes of a ``torch.distributed`` job.

Knows ``torch.distributed``, not transformers and not the preconditioner math: the optimizer shell
(:mod:`hf_psgd.optim.psgd`) hands it block sizes and costs and asks whose block is whose, then
exchanges the owners' updates through it. A single process needs none of this.
"""

from .collectives import all_reduce_mean_, end_multiprocess_run, is_multiprocess
from .fsdp2 import FullyShardedOwners
from .ownership import assign_owners
from .sharding import DataParallelOwners

__all__ = [
    "DataParallelOwners",
    "FullyShardedOwners",
    "all_reduce_mean_",
    "assign_owners",
    "end_multiprocess_run",
    "is_multiprocess",
]
