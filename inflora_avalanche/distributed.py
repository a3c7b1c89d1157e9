"""Thin helpers over ``torch.distributed`` (DDP, samplers, collectives); all are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process (e.g. under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that logs and writes results and checkpoints."""
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s values, in place."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def gather_interleaved(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally sized ``tensor`` so that item ``j`` of rank ``r`` lands at ``j * world + r``.

    That is the dataset order of ``DistributedSampler(shuffle=False)`` shards.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    stacked = torch.stack(parts, dim=1)  # (items, world, ...)
    return stacked.reshape(-1, *tensor.shape[1:])


def unpadded_positions(seen: int, local: int, size: int, device: torch.device) -> torch.Tensor:
    """Which of the gathered (interleaved) items of a batch are real data: ``DistributedSampler`` pads the last
    shards up to equal length; ``seen`` items per rank came before this batch of ``local``, ``size`` in all."""
    world = world_size()
    positions = (seen + torch.arange(local, device=device)).repeat_interleave(world) * world
    positions += torch.arange(world, device=device).repeat(local)
    return positions < size


def sharded_loader(dataset, global_batch: int, device, num_workers: int, pin_memory, persistent_workers: bool,
                   drop_last: bool, shuffle: bool):
    """A DataLoader over this rank's ``DistributedSampler`` shard of ``dataset``, with this rank's share of the global
    batch; collated as Avalanche collates ``dataset``."""
    from avalanche.benchmarks.utils.data_loader import collate_from_data_or_kwargs
    from torch.utils.data import DataLoader, DistributedSampler

    args: dict = {}
    collate_from_data_or_kwargs(dataset, args)
    return DataLoader(
        dataset,
        batch_size=max(1, global_batch // world_size()),
        sampler=DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last),
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda" if pin_memory is None else pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=drop_last,
        **args,
    )


def set_sampler_epoch(loader, epoch: int) -> None:
    """Reshuffle a ``DistributedSampler``'s shards for ``epoch`` (a no-op for other loaders)."""
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
