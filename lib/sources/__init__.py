"""Where images come from: ``--source KIND[:ARGUMENT]``, one registered class per kind.

A source is listed in the driver (cheap: names and labels only, no pixels) and validated there,
so bad input fails in a second with one line, before any cluster work starts. Files are decoded later,
in parallel, by :func:`lib.data.writer.write_shard_batch` running on Ray Data, through the filesystem
object the listing names (``pyarrow.fs``: the local disk, object storage, ...).

Identity of an image (its ``id``) is the relative path ``<split>/<class>/<file>`` for image folders
(the copy of CIFAR-10 in ``shared/datasets`` says to treat (split, class, file name) as identity)
and ``<split>/<index>`` for the official CIFAR-10 batches (the index in the official order).

- :mod:`lib.sources.registry`: :func:`register_source`, :func:`parse_source`, :class:`DataSource`,
  :class:`Listing`, :class:`ListOptions`;
- :mod:`lib.sources.location`: a local path or URI and the ``pyarrow.fs`` filesystem it resolves to;
- :mod:`lib.sources.picking`: the seeded, platform-independent choice of items (:func:`stable_hash`,
  :func:`stratified_pick`) that image folders, the validation split and training subsets use;
- the built-in kinds: ``imagefolder`` (:mod:`lib.sources.imagefolder`) and ``cifar10`` (:mod:`lib.sources.cifar10`).

Adding a kind is one module with one ``@register_source("name")`` class (see docs/extending.md); every module
in this package is imported (and so registers its kinds) when the package is.
"""

from __future__ import annotations

import importlib
import pkgutil

from lib.sources.location import Location, file_uri, parse_location
from lib.sources.picking import stable_hash, stratified_pick
from lib.sources.registry import (
    SOURCE_SPLITS,
    DataSource,
    Listing,
    ListOptions,
    parse_source,
    register_source,
    source_forms,
    source_kinds,
    unregister_source,
)

__all__ = ["SOURCE_SPLITS", "DataSource", "ListOptions", "Listing", "Location", "file_uri", "parse_location",
           "parse_source", "register_source", "source_forms", "source_kinds", "stable_hash", "stratified_pick",
           "unregister_source"]

# Every module of this package is imported, so the kinds defined in it (imagefolder, cifar10, and any module
# added here) are registered whenever lib.sources is: a new kind in lib/sources/ is one file, nothing else.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
