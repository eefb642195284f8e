"""A training step waits for the device only where the algorithm needs it: the code a step runs has no host read
(``.item()``, ``.cpu()``, ``.tolist()``, ``float(tensor)``) and builds no tensor from Python values on the device
(``torch.tensor(..., device=...)``, a blocking copy each step). The epoch's totals are read once, after the loop.
pytorch-metric-learning's miners build their index tuples with ``torch.where`` (the one wait left, by design)."""

import ast
import inspect
import textwrap

import pytest

from lib import augment, losses, training

HOST_READS = ("item", "cpu", "tolist", "numpy")


def host_syncs(function) -> list[str]:
    """The host reads and per-call device tensors in ``function``'s source, as ``line: code``."""
    source = textwrap.dedent(inspect.getsource(function))
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        target = node.func
        if isinstance(target, ast.Attribute) and target.attr in HOST_READS:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(target, ast.Attribute) and target.attr == "tensor" and any(k.arg == "device" for k in node.keywords):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(target, ast.Name) and target.id in ("float", "int") and node.args \
                and not isinstance(node.args[0], ast.Constant):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


STEP_FUNCTIONS = [augment.normalize, augment.augment_batch, augment.random_affine_params, losses.pairwise_spread,
                  losses.valid_triplets, training.augmented_batches,
                  *(cls.forward for cls in (losses.TripletObjective, losses.MultiSimilarityObjective,
                                            losses.ProxyAnchorObjective, losses.SupConObjective))]


@pytest.mark.parametrize("function", STEP_FUNCTIONS, ids=lambda f: f.__qualname__)
def test_what_a_step_runs_never_waits_for_the_device(function):
    assert host_syncs(function) == []


def test_the_epoch_loop_reads_its_totals_once_after_the_last_step():
    syncs = host_syncs(training.train_epoch)
    assert {line.split(": ", 1)[1] for line in syncs} == {"totals.cpu().tolist()", "totals.cpu()"}  # one expression
    loop = next(n for n in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(training.train_epoch))))
                if isinstance(n, ast.For))
    assert all(int(line.split(":")[0]) > loop.end_lineno for line in syncs)  # after the loop, not inside it


def test_the_check_sees_a_host_read():
    def step(x):
        return float(x.sum()) + x.item()

    assert len(host_syncs(step)) == 2
