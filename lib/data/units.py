"""A training split as units a worker can read one at a time: its Parquet files' row groups.

A worker that streams its shard (``jobs.train --cache-budget``) reads unit by unit, each when its epoch needs it
(:func:`lib.batching.stream_layout`); one that caches it reads them all once. Both see the same rows in the same
order, so the batches of a seed do not depend on which it does. Ranks take every ``world``-th unit of the split
(:func:`units_of_rank`): a fixed shard for the whole run, the same whichever way it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.parquet import checked

# Fewer row groups than this many per worker are cut into slices: every rank gets rows, and a streamed epoch
# has more than one unit to hold at a time (a slice costs a read of its whole row group: small data only).
MIN_UNITS_PER_WORKER = 4


@dataclass(frozen=True)
class RowGroup:
    """One unit: ``rows`` rows from row ``start`` of row group ``row_group`` of the Parquet file ``file``."""

    file: str
    row_group: int
    start: int
    rows: int

    def as_list(self) -> list:
        return [self.file, self.row_group, self.start, self.rows]

    @classmethod
    def from_list(cls, values: list) -> RowGroup:
        file, row_group, start, rows = values
        return cls(str(file), int(row_group), int(start), int(rows))


def row_groups(files: list[str], workers: int = 1) -> list[RowGroup]:
    """Every row group of ``files``, file by file, from their footers (no pixel is read); when there are fewer
    than :data:`MIN_UNITS_PER_WORKER` per worker of ``workers``, each is cut into that many equal slices."""
    import pyarrow.parquet as pq

    groups = []
    for file in files:
        with checked(file):
            metadata = pq.ParquetFile(file).metadata
        groups.extend((str(file), index, metadata.row_group(index).num_rows)
                      for index in range(metadata.num_row_groups) if metadata.row_group(index).num_rows)
    slices = -(-MIN_UNITS_PER_WORKER * workers // max(1, len(groups)))
    units = []
    for file, index, rows in groups:
        bounds = np.linspace(0, rows, min(slices, rows) + 1).astype(int)
        units.extend(RowGroup(file, index, int(start), int(stop - start))
                     for start, stop in zip(bounds[:-1], bounds[1:], strict=True))
    return units


def units_of_rank(units: list[RowGroup], rank: int, world: int) -> list[RowGroup]:
    """Rank ``rank``'s units out of ``world``: every ``world``-th one, so each rank's share of a split stored
    class by class still holds every class."""
    return list(units[rank::world])


def _read(unit: RowGroup, columns: list[str]):
    import pyarrow.parquet as pq

    with checked(unit.file):
        table = pq.ParquetFile(unit.file, page_checksum_verification=True).read_row_group(unit.row_group,
                                                                                            columns=columns)
    return table.slice(unit.start, unit.rows)


def read_unit_labels(units: list[RowGroup]) -> np.ndarray:
    """The (N,) int64 labels of ``units``, in order: what P x K batches are planned from (no pixel is read)."""
    parts = [_read(unit, ["label"]).column("label").to_numpy() for unit in units]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def read_unit(unit: RowGroup) -> tuple[np.ndarray, np.ndarray]:
    """One unit's (rows, H, W, 3) uint8 images as stored and (rows,) int64 labels, page checksums verified."""
    from lib.data.reader import table_images

    table = _read(unit, ["image", "label"])
    return table_images(table), table.column("label").to_numpy().astype(np.int64)
