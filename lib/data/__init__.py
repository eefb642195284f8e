"""The prepared data set DATA: :mod:`lib.data.reader` (manifest and Parquet reading, completeness and damage
checks), :mod:`lib.data.writer` (what jobs.prepare writes), :mod:`lib.data.images` (image files -> pixels)
and :mod:`lib.data.subsets` (the per-class training subsets cached under ``RUN/subsets/``).

Layout::

    DATA/train/part-*.parquet   id: string, image: uint8 (H, W, 3), label: int64, label_name: string
    DATA/val/part-*.parquet     (a stratified, seeded slice of the source's train split)
    DATA/test/part-*.parquet    (the source's test split)
    DATA/manifest.json          classes, counts[split][class], source, seed, skipped, converted, files

``image`` uses Arrow's canonical ``fixed_shape_tensor`` extension type, so plain pyarrow
(``to_numpy_ndarray()``), pandas and Ray Data (``read_parquet``) all read it as an image array.
The manifest is written last; a folder without a valid manifest is incomplete by definition.
"""
