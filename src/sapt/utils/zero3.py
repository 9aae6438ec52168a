"""DeepSpeed ZeRO-3 support: reading and writing parameters that are partitioned across processes.

Under ZeRO-3 every parameter holds only its shard (`param.data` is empty; the real shape is in
`param.ds_shape`) except inside a module's own forward, where DeepSpeed gathers it. SAPT reads its
parameters outside forward too: to freeze a block into the frozen stack, to snapshot the best
block, to save the router. Those places wrap the read in `gathered(...)`. Frozen blocks are buffers,
which ZeRO never partitions. Without DeepSpeed (or below stage 3) `gathered` does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """Managed by ZeRO-3 (possibly kept whole: see `is_split`)."""
    return hasattr(param, "ds_id")


def is_split(param: torch.Tensor) -> bool:
    """Really split across processes: this process holds a shard smaller than the whole tensor. ZeRO-3
    keeps tensors under its persistence threshold whole on every process (transformers sets that
    threshold to 10 × hidden size)."""
    if not is_partitioned(param) or getattr(param, "ds_persist", False):
        return False
    return param.ds_tensor is not None and param.ds_tensor.numel() < param.ds_numel


@contextmanager
def gathered(params: Iterable[torch.Tensor | None], modify: bool = False):
    """Full values of `params` inside the block. With `modify`, what rank 0 writes to them is
    partitioned back to every rank on exit (every rank must enter, as for any collective)."""
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def init_deepspeed_comm(training_args) -> None:
    """Make DeepSpeed's communication layer use the process group the Trainer's arguments set up.

    With CUDA, accelerate does this itself. On the CPU path (gloo) it starts torch.distributed only,
    and a ZeRO-3 model built by `from_pretrained` would then see a world of one process."""
    if not training_args.deepspeed:
        return
    import deepspeed

    _ = training_args.device  # starts torch.distributed as the launch asked (gloo on the CPU)
    deepspeed.init_distributed(dist_backend=training_args.ddp_backend)
