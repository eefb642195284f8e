"""The training-subset cache: ``--train-per-class`` / ``--val-per-class`` rows chosen once, written once.

:func:`per_class_subset` chooses the ids (seeded, per class, independent of file order);
:func:`write_subset` writes those rows of a prepared split as a few Parquet files in a folder under
``RUN/subsets/`` (:meth:`lib.paths.RunPaths.subset`) that appears whole or not at all, so every trainer,
Tune trial and resumed run reads the same small files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from lib.data.reader import PreparedData
from lib.parquet import read_parquet, write_parquet
from lib.sources.picking import stable_hash

# Rows per Parquet row group of a subset file: a training worker reads (and a streamed epoch holds) whole row
# groups, so they stay as small as jobs.prepare's files (onray.prepare.ROWS_PER_BLOCK)
SUBSET_ROW_GROUP_ROWS = 2500


def per_class_subset(ids: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Ids of ``per_class`` images of every class (all when 0 or when a class has fewer), chosen by seed;
    (M,) object array of str, sorted."""
    if per_class <= 0:
        return np.asarray(ids)
    chosen = []
    for label in np.unique(labels):
        members = [str(i) for i in np.asarray(ids)[labels == label]]
        chosen.extend(sorted(members, key=lambda i: stable_hash(seed, i))[:per_class])
    return np.asarray(sorted(chosen), dtype=object)


def write_subset(data: PreparedData, split: str, ids: np.ndarray, folder: str | os.PathLike, parts: int) -> list[str]:
    """The rows of ``split`` whose id is in ``ids`` as ``parts`` Parquet files in ``folder`` (written once).

    A training subset (``--train-per-class``) is chosen by the driver and written here once, so each trainer,
    each Tune trial and each resumed run reads a few small files instead of the whole split filtered again.
    The folder appears whole or not at all (written aside, then renamed), so concurrent writers and an
    interrupted write are harmless; the caller names the folder after everything that decides its rows.
    """
    import pyarrow.compute as pc

    folder = Path(folder)
    names = [f"part-{i:03d}.parquet" for i in range(max(1, parts))]
    if not all((folder / name).is_file() for name in names):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            wanted = pa.array(np.asarray(ids).astype(str))
            tables = []
            for path in data.files(split):
                table = read_parquet(path)
                tables.append(table.filter(pc.is_in(table.column("id"), value_set=wanted)))
            subset = pa.concat_tables(tables)
            bounds = np.linspace(0, len(subset), len(names) + 1).astype(int)
            for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True):
                write_parquet(subset.slice(start, stop - start), staged / name, row_group_size=SUBSET_ROW_GROUP_ROWS)
            try:
                os.rename(staged, folder)
            except OSError:  # another writer finished first (or a partial folder is in the way)
                if not all((folder / name).is_file() for name in names):
                    shutil.rmtree(folder, ignore_errors=True)
                    os.rename(staged, folder)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return [str(folder / name) for name in names]
