import numpy as np
import pytest

from lib.errors import UserError
from lib.retrieval.protocols import evaluate_protocols, linear_probe
from lib.stacking import (
    concatenate_normalized,
    evaluate_stacking,
    fit_stacked_projection,
    fit_stacking_classifier,
    stack_embeddings,
)

N_CLASSES = 4


def complementary_backbones(rng, n_per_class):
    """Two "backbones" that each see half the story: ``a`` separates classes {0, 1} from {2, 3} and
    0 from 1, but cannot tell 2 from 3; ``b`` the other way round. Only a combination gets all four."""
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    n = len(labels)
    a_codes = np.array([[3, 0], [0, 3], [-3, 0], [-3, 0]], float)  # 2 and 3 coincide
    b_codes = np.array([[-3, 0], [-3, 0], [3, 0], [0, 3]], float)  # 0 and 1 coincide
    a = np.hstack([a_codes[labels], np.zeros((n, 6))]) + rng.normal(size=(n, 8)) * 0.8 + [0, 0, 10, 0, 0, 0, 0, 0]
    b = np.hstack([b_codes[labels], np.zeros((n, 4))]) + rng.normal(size=(n, 6)) * 0.8 + [0, 0, 0, 0, 10, 0]
    return {"a": a, "b": b}, labels


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    train, train_labels = complementary_backbones(rng, 60)
    test, test_labels = complementary_backbones(rng, 30)
    return train, train_labels, test, test_labels


def test_concatenation_normalises_each_block_in_name_order():
    features, columns = concatenate_normalized({"b": np.full((2, 3), 5.0), "a": np.ones((2, 2))})
    assert features.shape == (2, 5) and columns == [slice(0, 2), slice(2, 5)]
    assert np.allclose(np.linalg.norm(features[:, columns[0]], axis=1), 1)
    assert np.allclose(np.linalg.norm(features[:, columns[1]], axis=1), 1)


def test_stacking_classifier_combines_backbones(splits):
    train, train_labels, test, test_labels = splits
    stacked = evaluate_stacking(train, train_labels, test, test_labels, folds=3)
    singles = [linear_probe(train[name], train_labels, test[name], test_labels)[1] for name in ("a", "b")]
    # each backbone alone confuses one pair of classes (at most ~75 %); stacked, all four are told apart
    assert max(singles) < 0.8
    assert stacked.test_acc > 0.9 and stacked.train_acc > 0.9 and stacked.test_acc > 1 / N_CLASSES
    assert stacked.test_predictions.shape == test_labels.shape


def test_meta_learner_is_fitted_on_out_of_fold_probabilities(splits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    train, train_labels, _, _ = splits
    model = fit_stacking_classifier(train, train_labels, folds=3, seed=1)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=1)
    out_of_fold = [cross_val_predict(LogisticRegression(max_iter=1000, random_state=1),
                                     concatenate_normalized({name: train[name]})[0], train_labels, cv=folds,
                                     method="predict_proba") for name in ("a", "b")]
    meta = LogisticRegression(max_iter=1000, random_state=1).fit(np.hstack(out_of_fold), train_labels)
    assert np.allclose(model.classifier.final_estimator_.coef_, meta.coef_, atol=1e-6)


def test_poisoned_test_labels_change_nothing_but_the_score(splits):
    train, train_labels, test, test_labels = splits
    honest = evaluate_stacking(train, train_labels, test, test_labels, folds=3)
    poisoned_labels = np.random.default_rng(1).permutation(test_labels)
    poisoned = evaluate_stacking(train, train_labels, test, poisoned_labels, folds=3)
    assert np.array_equal(poisoned.test_predictions, honest.test_predictions)
    assert np.array_equal(poisoned.model.classifier.final_estimator_.coef_,
                          honest.model.classifier.final_estimator_.coef_)
    assert poisoned.train_acc == honest.train_acc
    assert poisoned.test_acc == pytest.approx(np.mean(honest.test_predictions == poisoned_labels))
    assert poisoned.test_acc < honest.test_acc  # the labels did reach the score, and only the score


def test_stacked_embedding_retrieves_better_than_either_backbone(splits):
    train, train_labels, test, test_labels = splits
    stacked = stack_embeddings(train, train_labels, {"train": train, "test": test})
    assert stacked["test"].shape == (len(test_labels), N_CLASSES - 1)  # LDA keeps classes - 1 directions
    assert np.allclose(np.linalg.norm(stacked["test"], axis=1), 1, atol=1e-5)
    stacked_map = evaluate_protocols(stacked["train"], train_labels, stacked["test"], test_labels,
                                     use_gpu=False)["L"]["map@5"]
    single_maps = [evaluate_protocols(train[name], train_labels, test[name], test_labels, use_gpu=False)["L"]["map@5"]
                   for name in ("a", "b")]
    assert stacked_map > max(single_maps) + 0.1


def test_stacked_embedding_of_a_test_row_depends_on_that_row_only(splits):
    train, train_labels, test, test_labels = splits
    projection = fit_stacked_projection(train, train_labels)
    whole = projection.transform(test)
    # fitting never sees test rows or labels, and applying it is row by row: a subset maps the same
    subset = projection.transform({name: values[::7] for name, values in test.items()})
    assert np.allclose(subset, whole[::7], atol=1e-6)
    # poisoning the *fit* labels does change the projection, so the labels are really what it learns from
    shuffled = fit_stacked_projection(train, np.random.default_rng(2).permutation(train_labels)).transform(test)
    assert not np.allclose(shuffled, whole, atol=1e-3)


def test_pca_whitening_projection_ignores_labels(splits):
    train, train_labels, test, _ = splits
    first = fit_stacked_projection(train, train_labels, method="pca", n_components=5).transform(test)
    second = fit_stacked_projection(train, None, method="pca", n_components=5).transform(test)
    assert first.shape == (len(next(iter(test.values()))), 5) and np.allclose(first, second)


def test_bad_inputs_are_user_errors(splits):
    train, train_labels, test, _ = splits
    projection = fit_stacked_projection(train, train_labels)
    with pytest.raises(UserError, match="fitted on backbones a, b but got a"):
        projection.transform({"a": test["a"]})
    with pytest.raises(UserError, match="same N images"):
        fit_stacked_projection({"a": train["a"], "b": train["b"][:10]}, train_labels)
    with pytest.raises(UserError, match="at least 5 train items per class"):
        fit_stacking_classifier({"a": train["a"][:12]}, train_labels[::20], folds=5)
    with pytest.raises(UserError, match="unknown stacking projection"):
        fit_stacked_projection(train, train_labels, method="umap")
