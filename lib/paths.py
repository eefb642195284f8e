"""The run folder's layout, spelled once.

::

    RUN/data/                      the pipeline's prepared data (jobs.prepare's DATA)
    RUN/models/<backbone>/         jobs.train: model.pt, metrics.jsonl, config.json, summary.json, ...
    RUN/tune/<backbone>/           jobs.tune: trials.md, tune.png, best.json, Tune's own folders
    RUN/embeddings/<name>/         jobs.evaluate: {train,val,test}.parquet + source.json per model
    RUN/subsets/<name>/            training subsets of DATA, written once and read by every trainer and trial
    RUN/eval/                      jobs.evaluate: metrics.json, results.md, pictures, the faiss index
    RUN/logs/                      every job's log file (<stage>-<time>-<pid>.log: Ray's own lines go there)
    RUN/pipeline.json              jobs.pipeline: stage timings
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def absolute(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded, made absolute (Ray workers run in other working directories)."""
    return Path(path).expanduser().absolute()


@dataclass(frozen=True)
class RunPaths:
    """Where each stage reads and writes inside one RUN folder."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> RunPaths:
        return cls(absolute(run_dir))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, backbone: str) -> Path:
        return self.models / backbone

    def tune(self, backbone: str) -> Path:
        return self.root / "tune" / backbone

    def best_hparams(self, backbone: str) -> Path:
        """The tuning result ``jobs.train --hparams`` takes."""
        return self.tune(backbone) / "best.json"

    @property
    def embeddings_root(self) -> Path:
        return self.root / "embeddings"

    def embeddings(self, name: str) -> Path:
        return self.embeddings_root / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        """Where each job run on this RUN keeps its log file (:func:`lib.console.use_log_dir`)."""
        return self.root / "logs"

    def subset(self, name: str) -> Path:
        """A training subset of DATA written once for every trainer (:func:`lib.data.subsets.write_subset`)."""
        return self.root / "subsets" / name

    @property
    def pipeline_record(self) -> Path:
        return self.root / "pipeline.json"

    def trained_backbones(self) -> list[str]:
        """Backbones with a finished training (``summary.json`` and ``model.pt``), sorted."""
        return sorted(p.parent.name for p in self.models.glob("*/summary.json") if (p.parent / "model.pt").is_file())
