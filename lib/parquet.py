"""Parquet files with page checksums: every file the project writes carries a CRC per data page, and every read
in the driver verifies them, so bytes changed inside a file after it was written (a bad disk, a copy cut short and
patched, a hand edit) are one clear line instead of wrong pixels or embeddings.

Files written before checksums existed have none and still read (a page without a CRC is not checked). Ray Data's
own reads of the prepared splits do not verify them; the driver-side reads do (``PreparedData``, embeddings, the
saved index's rows, subsets, the gallery's images).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from lib.errors import UserError


@contextlib.contextmanager
def checked(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[None]:
    """Turn a failed page checksum while reading ``paths`` into one :class:`UserError` naming them."""
    try:
        yield
    except OSError as err:
        if "checksum" not in str(err).lower() and "page integrity" not in str(err).lower():
            raise
        names = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
        where = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
        raise UserError(f"damaged file: {where} fails its page checksum (its bytes changed after it was written); "
                        f"rerun the job that wrote it") from None


def write_parquet(table: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``pyarrow.parquet.write_table`` with a CRC on every data page."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, write_page_checksum=True, **kwargs)


def read_parquet(path: str | os.PathLike, columns: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """``pyarrow.parquet.read_table`` of one file, every page's checksum verified (see :func:`checked`)."""
    import pyarrow.parquet as pq

    with checked(path):
        return pq.read_table(path, columns=None if columns is None else list(columns),
                             page_checksum_verification=True, **kwargs)


def read_dataset(paths: Sequence[str | os.PathLike], columns: Sequence[str], filters: Any = None) -> Any:
    """Several files read as one table (``pyarrow.parquet.ParquetDataset``), checksums verified."""
    import pyarrow.parquet as pq

    with checked(paths):
        return pq.ParquetDataset([str(p) for p in paths], filters=filters,
                                 page_checksum_verification=True).read(columns=list(columns))
