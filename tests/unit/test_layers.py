"""The layers import downward only: lib -> onray (the Ray layer) -> tuning -> jobs; benchmarks beside jobs.

Imports anywhere in a module count, including those inside functions.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# package -> the project packages it must never import
FORBIDDEN = {
    "lib": {"onray", "tuning", "jobs", "benchmarks", "ray"},
    "onray": {"tuning", "jobs", "benchmarks"},
    "tuning": {"jobs", "benchmarks"},
    "benchmarks": {"jobs"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_layer_imports_upward(package):
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules, f"{package}/ has no modules"
    upward = {f"{path.relative_to(REPO)} imports {name}"
              for path in modules for name in imported_packages(path) & FORBIDDEN[package]}
    assert not upward, sorted(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from jobs.train import main\n    import ray.data\n")
    assert imported_packages(module) == {"jobs", "ray"}


def test_jobs_are_thin():
    """Each job is a config, a main that calls one function and what to print: at most 150 non-blank lines,
    and none defines the Train worker loop or a Ray Data pipeline."""
    for path in sorted((REPO / "jobs").glob("*.py")):
        text = path.read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) <= 150, f"{path.name}: {len(lines)} non-blank lines"
        assert "train_loop_per_worker" not in text and "map_batches" not in text, path.name
