"""What the demos share: their run folder's report, and batches drawn from in-memory tensors."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from ..train.run_dir import writing

__all__ = ["write_report", "tensor_batches"]


def write_report(out: Path, report: dict, table: str) -> None:
    """A demo's results in its run folder (report.json, table.txt), and the table on stdout."""
    with writing(out):  # a full or unwritable folder: one message naming it (exit 2 from the CLI)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "table.txt").write_text(table + "\n")
    print(table)


def tensor_batches(data: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    """The batches of ``DataLoader(data, batch_size, shuffle)`` -- the same samples in the same order from
    the same random stream -- with each batch taken by one indexing of the tensors instead of one
    ``__getitem__`` per sample and a collate (which cost the digits demo more than its training)."""
    order = RandomSampler(data) if shuffle else SequentialSampler(data)
    return DataLoader(data, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=False))
