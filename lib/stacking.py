"""Stacking several backbones: a stacked classifier and a stacked embedding.

Inputs are dicts ``backbone name -> embeddings (N, D_name)`` whose rows are the same N images in the
same order; names are sorted, so dict order never changes a result. Each backbone's block is
L2-normalised before anything else, so no backbone dominates by scale.

- Classification: :func:`fit_stacking_classifier` is a real stacking ensemble. Level 0 is one
  logistic regression per backbone, each seeing only its own columns; level 1 is a logistic
  regression fitted on the level-0 class probabilities predicted *out of fold* (stratified K-fold
  on the train split), so the meta-learner learns how far to trust each backbone on data that backbone
  did not fit. The level-0 models are then refitted on the whole train split for prediction.
- Retrieval: :func:`fit_stacked_projection` learns a projection of the concatenated embeddings
  from labelled fit data (train, or train + val: never test), and :meth:`StackedProjection.transform`
  applies it to any split, row by row, and L2-normalises the result.

Neither fitting function has a parameter for test labels; :func:`evaluate_stacking` takes them only
to score predictions made without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lib.errors import UserError
from lib.retrieval.index import l2_normalize

ProjectionMethod = Literal["lda", "pca"]


def _check_blocks(embeddings: Mapping[str, np.ndarray], names: list[str] | None = None) -> list[str]:
    """Validate a name -> (N, D) dict (same N everywhere, the expected names); returns the sorted names."""
    if not embeddings:
        raise UserError("stacking needs the embeddings of at least one backbone")
    found = sorted(embeddings)
    if names is not None and found != names:
        raise UserError(f"stacking was fitted on backbones {', '.join(names)} but got {', '.join(found)}")
    rows = {name: np.shape(embeddings[name]) for name in found}
    if any(len(shape) != 2 for shape in rows.values()) or len({shape[0] for shape in rows.values()}) != 1:
        raise UserError("every backbone's embeddings must be (N, D) arrays over the same N images, got "
                        + ", ".join(f"{name} {shape}" for name, shape in rows.items()))
    return found


def concatenate_normalized(embeddings: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[slice]]:
    """name -> (N, D_name) -> (N, sum D) float32: each block L2-normalised, blocks in sorted-name order.

    Also returns the column slice of each block (same order), for level-0 models that see one block.
    """
    names = _check_blocks(embeddings)
    blocks = [l2_normalize(embeddings[name]) for name in names]
    edges = np.cumsum([0] + [block.shape[1] for block in blocks])
    return np.concatenate(blocks, axis=1), [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


# --------------------------------------------------------------------------- classification


@dataclass
class StackingModel:
    """A fitted stacking ensemble over the backbones ``names`` (sorted)."""

    names: list[str]
    classifier: Any  # sklearn.ensemble.StackingClassifier

    def predict(self, embeddings: Mapping[str, np.ndarray]) -> np.ndarray:
        """name -> (N, D_name) embeddings -> (N,) predicted labels."""
        _check_blocks(embeddings, self.names)
        features, _ = concatenate_normalized(embeddings)
        return self.classifier.predict(features)


def fit_stacking_classifier(embeddings: Mapping[str, np.ndarray], labels: np.ndarray, folds: int = 5,
                            seed: int = 0, max_iter: int = 1000) -> StackingModel:
    """Fit level 0 (one logistic regression per backbone) and level 1 (a logistic regression on their
    out-of-fold class probabilities) on the train split: ``embeddings`` name -> (N, D_name), ``labels`` (N,).

    Out-of-fold probabilities come from ``folds`` stratified, seeded folds (scikit-learn's
    ``StackingClassifier``, which uses ``cross_val_predict``); the meta-learner never sees a
    probability that a level-0 model produced for a row it was fitted on.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline

    names = _check_blocks(embeddings)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise UserError("the stacking classifier needs at least two classes in the train split")
    if counts.min() < folds:
        raise UserError(f"the stacking classifier's {folds} folds need at least {folds} train items per class "
                        f"(class {classes[counts.argmin()].item()!r} has {counts.min()})")
    features, columns = concatenate_normalized(embeddings)
    level0 = [(name, Pipeline([("columns", ColumnTransformer([(name, "passthrough", block)])),
                               ("logistic", LogisticRegression(max_iter=max_iter, random_state=seed))]))
              for name, block in zip(names, columns, strict=True)]
    classifier = StackingClassifier(
        estimators=level0,
        final_estimator=LogisticRegression(max_iter=max_iter, random_state=seed),
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        stack_method="predict_proba")
    classifier.fit(features, labels)
    return StackingModel(names=names, classifier=classifier)


@dataclass
class StackingResult:
    """Accuracies of a stacking ensemble; ``test_predictions`` (Q,) were made without test labels."""

    train_acc: float
    test_acc: float
    test_predictions: np.ndarray
    model: StackingModel


def evaluate_stacking(train: Mapping[str, np.ndarray], train_labels: np.ndarray,
                      test: Mapping[str, np.ndarray], test_labels: np.ndarray, folds: int = 5,
                      seed: int = 0) -> StackingResult:
    """Fit :func:`fit_stacking_classifier` on ``train`` only; score it on train and test.

    ``train``/``test``: name -> (N, D_name) / (Q, D_name); labels (N,) / (Q,). ``test_labels`` are
    compared with the predictions and used for nothing else. The train accuracy is in-sample
    (the refitted level-0 models and the meta-learner on the rows they were fitted on).
    """
    model = fit_stacking_classifier(train, train_labels, folds=folds, seed=seed)
    train_predictions = model.predict(train)
    test_predictions = model.predict(test)
    return StackingResult(train_acc=float(np.mean(train_predictions == np.asarray(train_labels))),
                          test_acc=float(np.mean(test_predictions == np.asarray(test_labels))),
                          test_predictions=test_predictions, model=model)


# --------------------------------------------------------------------------- retrieval


@dataclass
class StackedProjection:
    """A fitted projection of concatenated, per-backbone normalised embeddings.

    ``model`` is a fitted scikit-learn transformer (``LinearDiscriminantAnalysis`` or whitening ``PCA``).
    """

    names: list[str]
    method: str
    model: Any

    @property
    def dim(self) -> int:
        """Dimensions of the stacked embedding."""
        return int(self.model.transform(np.zeros((1, self.model.n_features_in_))).shape[1])

    def transform(self, embeddings: Mapping[str, np.ndarray]) -> np.ndarray:
        """name -> (N, D_name) -> (N, dim) float32, L2-normalised. Each row depends on that row only."""
        _check_blocks(embeddings, self.names)
        features, _ = concatenate_normalized(embeddings)
        return l2_normalize(self.model.transform(features))


def fit_stacked_projection(embeddings: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                           method: ProjectionMethod = "lda", n_components: int | None = None) -> StackedProjection:
    """Learn the stacked embedding's projection from fit data: ``embeddings`` name -> (N, D_name), ``labels`` (N,).

    Pass train (or train + val) here, never test. Methods:

    - ``"lda"`` (default): linear discriminant analysis on the labels, with Ledoit-Wolf shrinkage of
      the within-class covariance (stable when the concatenation has many dimensions). It keeps up to
      (classes - 1) directions that separate the classes relative to their spread, which is what
      cosine retrieval by class rewards.
    - ``"pca"``: PCA whitening, unsupervised (``labels`` ignored): decorrelates the backbones'
      redundant directions and equalises the variances of the ``n_components`` kept.
    """
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    names = _check_blocks(embeddings)
    features, _ = concatenate_normalized(embeddings)
    if method == "lda":
        if labels is None:
            raise ValueError("method='lda' needs the fit split's labels")
        labels = np.asarray(labels)
        n_classes = len(np.unique(labels))
        if n_classes < 2:
            raise UserError("the stacked embedding (LDA) needs at least two classes in the fit split")
        limit = min(n_classes - 1, features.shape[1])
        model = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto",
                                           n_components=min(n_components or limit, limit))
        model.fit(features, labels)
    elif method == "pca":
        limit = min(features.shape)
        model = PCA(n_components=min(n_components or limit, limit), whiten=True, svd_solver="full")
        model.fit(features)
    else:
        raise UserError(f"unknown stacking projection {method!r} (choose lda or pca)")
    return StackedProjection(names=names, method=method, model=model)


def stack_embeddings(fit: Mapping[str, np.ndarray], fit_labels: np.ndarray,
                     apply_to: Mapping[str, Mapping[str, np.ndarray]], method: ProjectionMethod = "lda",
                     n_components: int | None = None) -> dict[str, np.ndarray]:
    """Fit the projection on ``fit`` (train or train + val) and apply it to each split of ``apply_to``.

    ``apply_to``: split name -> (name -> (N_split, D_name)); returns split name -> (N_split, dim)
    float32, L2-normalised, e.g. ``{"train": ..., "test": ...}`` for
    :func:`lib.retrieval.protocols.evaluate_protocols`.
    """
    projection = fit_stacked_projection(fit, fit_labels, method=method, n_components=n_components)
    return {split: projection.transform(blocks) for split, blocks in apply_to.items()}
