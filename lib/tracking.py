"""Experiment tracking with MLflow: off unless ``--mlflow URI`` (or ``$MLFLOW_TRACKING_URI``) names a server.

The jobs write everything that matters into RUN first (summaries, per-epoch rows, pictures, metrics); a
:class:`Tracker` copies those files into MLflow from the job's driver once a stage's outputs are complete:

- ``jobs.train``: one MLflow run per backbone (``stage=train``): the resolved config as params, every epoch's
  row of ``metrics.jsonl`` as metrics at step = epoch (epoch 0 is the untrained network), ``summary.json``,
  ``config.json``, ``metrics.jsonl``, ``loss_curve.png`` and ``model.pt`` as artefacts, and ``model.pt``
  registered as a version of the model ``cifar-embeddings-<backbone>`` tagged with its backbone and
  embedding dimension;
- ``jobs.tune``: one run per tuned backbone (``stage=tune``) with the tune's settings, its report files and
  the best score, and each trial of ``trials.json`` as a child run (its hyper-parameters, val mAP@5 per epoch,
  its status);
- ``jobs.evaluate``: one run (``stage=evaluate``) with ``metrics.json`` flattened into metrics, and
  ``metrics.json``, ``results.md`` and the report's pictures as artefacts.

Each run carries the SHA-256 of the RUN files it was made from (tag ``result_sha256``): a rerun of a finished
stage logs nothing twice, and a rerun after the server was down logs what it missed. The MLflow experiment is
named after the RUN folder (``$MLFLOW_EXPERIMENT_NAME`` overrides it).

Tracking never costs a job: a server that cannot be reached when the job starts, or that fails while a stage is
logged, is one line on the terminal and the job goes on without it. ``mlflow`` is imported only when a tracking
URI is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lib.console import log
from lib.errors import UserError
from lib.paths import RunPaths

URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
MLFLOW_HELP = (f"MLflow tracking URI (http://HOST:5000, sqlite:///mlflow.db, ...): runs, metrics, artefacts and the "
               f"trained model are logged there (default: ${URI_ENV}; neither: no tracking)")
REGISTERED_MODEL_PREFIX = "cifar-embeddings-"  # + backbone: the registered model each training adds a version to
RESULT_TAG = "result_sha256"
# HTTP settings for a job's client, unless the environment sets them: MLflow's defaults retry a dead server
# for minutes (7 retries, doubling back-off, 120 s timeouts) before a job could go on without it.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                   # the job prints its own line per logged run, not MLflow's two per run
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# Keys of a metrics.jsonl row that are not measurements.
NOT_METRICS = ("epoch", "resumed_from")
# The limits of one MLflow log_batch call (mlflow.utils.validation).
PARAMS_PER_BATCH, METRICS_PER_BATCH, PARAM_VALUE_CHARS = 100, 1000, 6000

# URIs found unreachable in this process: a pipeline's later stages do not probe (and print) again.
_unreachable: set[str] = set()


def tracking_uri(flag: str) -> str:
    """The URI a job tracks to: ``--mlflow``, else ``$MLFLOW_TRACKING_URI``, else ``""`` (no tracking)."""
    return flag or os.environ.get(URI_ENV, "")


def experiment_name(run_dir: str | os.PathLike) -> str:
    """The MLflow experiment of a RUN folder: ``$MLFLOW_EXPERIMENT_NAME``, else the folder's name."""
    return os.environ.get(EXPERIMENT_ENV) or RunPaths.of(run_dir).root.name


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric or param key: ``@`` spelled ``_at_`` (``val_map@5`` -> ``val_map_at_5``), any
    other character MLflow refuses replaced by ``_``."""
    return re.sub(r"[^\w.\- /]", "_", name.replace("@", "_at_"))


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: nested keys dotted (``loss_params.temperature``), lists comma-joined,
    values cut to MLflow's length limit."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{metric_key(str(key))}"
        if isinstance(value, dict):
            params.update(flat_params(value, f"{name}."))
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            params[name] = text[:PARAM_VALUE_CHARS]
    return params


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def flat_metrics(document: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested document, by dotted key (``resnet50.L.map_at_5``); other values left out."""
    metrics: dict[str, float] = {}
    for key, value in document.items():
        name = f"{prefix}{metric_key(str(key))}"
        if isinstance(value, dict):
            metrics.update(flat_metrics(value, f"{name}."))
        elif _number(value) is not None:
            metrics[name] = _number(value)
    return metrics


def epoch_metrics(history: Iterable[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(key, value, step) of every measurement in ``metrics.jsonl``'s rows, step = the row's epoch."""
    rows = []
    for row in history:
        for key, value in row.items():
            if key not in NOT_METRICS and _number(value) is not None:
                rows.append((metric_key(key), _number(value), int(row["epoch"])))
    return rows


def files_digest(run_root: Path, files: Iterable[Path]) -> str:
    """SHA-256 over the RUN folder's path and the bytes of ``files``: the identity of one logged result."""
    digest = hashlib.sha256(str(run_root).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _reason(err: BaseException) -> str:
    """A short why for the one line: the OS error inside a connection failure, else the message's first line."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if found:
        return found.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Tracker:
    """One job's MLflow client and experiment. Build it with :meth:`connect` (None when tracking is off or the
    server cannot be reached); every ``log_*`` method catches what MLflow raises, says so in one line and turns
    the tracker off, so the job goes on."""

    def __init__(self, client: Any, uri: str, run_root: Path, experiment_id: str, experiment: str) -> None:
        self.client, self.uri, self.run_root = client, uri, run_root
        self.experiment_id, self.experiment = experiment_id, experiment
        self.on = True

    @classmethod
    def connect(cls, flag: str, run_dir: str | os.PathLike) -> Tracker | None:
        """The tracker of a job on ``run_dir`` with ``--mlflow flag``; None without a URI, when ``mlflow`` is
        missing and only the environment asked for it, or when the server does not answer (one line).
        ``--mlflow`` given without ``mlflow`` installed is a :class:`UserError`."""
        uri = tracking_uri(flag)
        if not uri or uri in _unreachable:
            return None
        try:
            from mlflow.tracking import (
                MlflowClient,  # only here: a job without a tracking URI never imports mlflow
            )
        except ImportError:
            if flag:
                raise UserError("--mlflow needs the mlflow package: pip install 'cifar-embeddings[mlflow]'") from None
            log(f"mlflow: ${URI_ENV} is set but the mlflow package is not installed; going on without tracking")
            _unreachable.add(uri)
            return None
        for name, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # MLflow's INFO lines (waiting for a model version, ...) would reach the job's terminal
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        run_root, experiment = RunPaths.of(run_dir).root, experiment_name(run_dir)
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        except Exception as err:  # noqa: BLE001 - whatever the client raises, tracking must not stop the job
            log(f"mlflow: {uri} unreachable ({_reason(err)}); going on without tracking")
            _unreachable.add(uri)
            return None
        return cls(client, uri, run_root, experiment_id, experiment)

    # -- the stages ----------------------------------------------------------------------------------------------

    def log_training(self, backbone: str) -> str | None:
        """Log ``RUN/models/<backbone>/`` (a finished training) as one run and register its model; returns the
        run's id (None: nothing logged)."""
        folder = RunPaths(self.run_root).model(backbone)
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            return None
        return self._guarded(f"{backbone}'s training", self._log_training, backbone, folder, summary_path)

    def log_failed_training(self, backbone: str, config: dict[str, Any], why: str) -> str | None:
        """A backbone whose training failed: a FAILED run with its config and the reason (tag ``failure``)."""
        def work() -> str:
            run_id = self._start(backbone, "train", {"backbone": backbone, "failure": why[:5000]},
                                 flat_params(config), parent=None)
            self.client.set_terminated(run_id, status="FAILED")
            return run_id
        return self._guarded(f"{backbone}'s failed training", work)

    def log_tune(self, backbone: str) -> str | None:
        """Log ``RUN/tune/<backbone>/`` (a finished tune: ``best.json`` written) as a run with one child run per
        trial of ``trials.json``."""
        folder = RunPaths(self.run_root).tune(backbone)
        if not (folder / "best.json").is_file() or not (folder / "trials.json").is_file():
            return None
        return self._guarded(f"{backbone}'s tune", self._log_tune, backbone, folder)

    def log_evaluation(self) -> str | None:
        """Log ``RUN/eval/`` (a finished evaluation: ``metrics.json`` written) as one run."""
        folder = RunPaths(self.run_root).eval
        if not (folder / "metrics.json").is_file():
            return None
        return self._guarded("the evaluation", self._log_evaluation, folder)

    # -- how ----------------------------------------------------------------------------------------------------

    def _guarded(self, what: str, work, *args) -> str | None:
        if not self.on:
            return None
        try:
            return work(*args)
        except Exception as err:  # noqa: BLE001 - a tracking failure is a line, never a lost job
            log(f"mlflow: logging {what} to {self.uri} failed ({_reason(err)}); going on without tracking")
            self.on = False
            _unreachable.add(self.uri)
            return None

    def _already_logged(self, digest: str) -> bool:
        """True when a finished run of this experiment carries ``digest``; unfinished ones (a logging cut short)
        are deleted with their child runs, to be logged again."""
        logged = False
        for run in self.client.search_runs([self.experiment_id], f"tags.{RESULT_TAG} = '{digest}'"):
            if run.info.status == "FINISHED":
                logged = True
                continue
            for child in self.client.search_runs([self.experiment_id],
                                                 f"tags.mlflow.parentRunId = '{run.info.run_id}'"):
                self.client.delete_run(child.info.run_id)
            self.client.delete_run(run.info.run_id)
        return logged

    def _start(self, name: str, stage: str, tags: dict[str, str], params: dict[str, str],
               parent: str | None) -> str:
        tags = {"stage": stage, "run_dir": str(self.run_root), **tags}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        for chunk in _chunks([Param(key, value) for key, value in params.items()], PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def _log_metrics(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for chunk in _chunks([Metric(key, value, now, step) for key, value, step in rows], METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def _log_files(self, run_id: str, files: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in files:
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)

    def _said(self, what: str, run_id: str) -> str:
        log(f"mlflow: logged {what} to {self.uri}, experiment {self.experiment!r}, run {run_id}")
        return run_id

    def _log_training(self, backbone: str, folder: Path, summary_path: Path) -> str | None:
        digest = files_digest(self.run_root, [summary_path])
        if self._already_logged(digest):
            return None
        summary = json.loads(summary_path.read_text())
        config = summary.get("config", {})
        run_id = self._start(backbone, "train", {"backbone": backbone, RESULT_TAG: digest,
                                                 "embedding_dim": str(config.get("embedding_dim"))},
                             flat_params(config), parent=None)
        rows = epoch_metrics(_read_history(folder / "metrics.jsonl")) if (folder / "metrics.jsonl").is_file() else []
        best = {f"best.{key}": value for key, value in flat_metrics(summary.get("best", {})).items()}
        self._log_metrics(run_id, rows + [(key, value, 0) for key, value in best.items()]
                          + [("train_seconds", float(summary.get("train_seconds", 0.0)), 0)])
        self._log_files(run_id, [folder / name for name in ("summary.json", "config.json", "metrics.jsonl",
                                                             "loss_curve.png")])
        self._log_files(run_id, [folder / "model.pt"], "model")
        self._register(run_id, backbone, config)
        self.client.set_terminated(run_id)
        return self._said(f"{backbone}'s training", run_id)

    def _register(self, run_id: str, backbone: str, config: dict[str, Any]) -> None:
        """``model.pt`` (a state dict, loaded with ``weights_only``) as a new version of
        ``cifar-embeddings-<backbone>``, tagged with what a loader needs to rebuild the network."""
        from mlflow.exceptions import MlflowException

        name = REGISTERED_MODEL_PREFIX + backbone
        try:
            self.client.create_registered_model(name, description=f"{backbone} image embeddings (lib.backbones "
                                                                  f"state dict, model.pt)")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {"backbone": backbone, "embedding_dim": str(config.get("embedding_dim")),
                "image_size": str(config.get("image_size")), "run_dir": str(self.run_root)}
        self.client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags)

    def _log_tune(self, backbone: str, folder: Path) -> str | None:
        files = [folder / "best.json", folder / "trials.json"]
        digest = files_digest(self.run_root, files)
        if self._already_logged(digest):
            return None
        settings = json.loads((folder / "tune_config.json").read_text()) if (
            folder / "tune_config.json").is_file() else {}
        run_id = self._start(f"tune {backbone}", "tune", {"backbone": backbone, RESULT_TAG: digest},
                             flat_params(settings), parent=None)
        best = json.loads((folder / "best.json").read_text())
        self._log_metrics(run_id, [(f"best.{key}", value, 0) for key, value in flat_metrics(best).items()])
        self._log_files(run_id, [folder / name for name in ("best.json", "trials.md", "tune.png", "trials.json",
                                                             "tune_config.json")])
        trials = json.loads((folder / "trials.json").read_text())["trials"]
        for trial in trials:
            child = self._start(trial["trial_id"], "trial", {"backbone": backbone, "trial_status": trial["status"],
                                                              **({"error": trial["error"][:5000]}
                                                                 if trial["error"] else {})},
                                flat_params(trial["config"]), parent=run_id)
            self._log_metrics(child, [("val_map_at_5", score, epoch) for epoch, score in trial["history"]
                                      if score is not None])
            self.client.set_terminated(child, status="FAILED" if trial["status"] == "error" else "FINISHED")
        self.client.set_terminated(run_id)
        return self._said(f"{backbone}'s tune ({len(trials)} trial(s) as child runs)", run_id)

    def _log_evaluation(self, folder: Path) -> str | None:
        digest = files_digest(self.run_root, [folder / "metrics.json"])
        if self._already_logged(digest):
            return None
        metrics = json.loads((folder / "metrics.json").read_text())
        run_id = self._start("evaluate", "evaluate", {RESULT_TAG: digest},
                             flat_params(metrics.get("config", {})), parent=None)
        values = {**flat_metrics(metrics.get("models", {})),
                  **{f"clusters.{k}": v for k, v in flat_metrics(metrics.get("clusters", {})).items()}}
        self._log_metrics(run_id, [(key, value, 0) for key, value in values.items()])
        self._log_files(run_id, [folder / "metrics.json", folder / "results.md", *sorted(folder.glob("*.png"))])
        self.client.set_terminated(run_id)
        return self._said("the evaluation", run_id)
