"""The training loader every image datamodule shares."""

from __future__ import annotations

import math

from torch.utils.data import DataLoader, Dataset


def training_loader(dataset: Dataset, batch_size: int, trainer=None, num_workers: int = 0) -> DataLoader:
    """Shuffled batches of ``dataset`` that drop a ragged last batch, unless each process's share is no larger than
    one batch: then that share is the one batch, since dropping it would leave an epoch with no step (a small
    labelled cut would train nothing and still export). Under DDP Lightning splits the set among ``trainer``'s
    processes (each gets ceil(N / world size) images) and keeps ``drop_last``, so the share is what counts."""
    world = trainer.world_size if trainer is not None else 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=math.ceil(len(dataset) / world) > batch_size,
        num_workers=num_workers,
    )
