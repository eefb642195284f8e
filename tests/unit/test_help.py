"""``--help`` of every job answers without importing Ray (and, for the jobs whose config allows it, torch): a person
asking for the flags on a busy machine does not wait for either.

One fresh interpreter asks every job for its help in turn (``jobs.<stage>.cli(["--help"])``: the module's imports
and its parser, what ``python -m jobs.<stage> --help`` runs) and reports what it had imported after each: the
torch-free jobs first, so that torch showing up names the job that brought it."""

import json
import subprocess
import sys
import textwrap

from jobs.cli import STAGES
from tests.conftest import REPO

# Their config classes still live in modules that import torch (lib.training, lib.evaluation, lib.pipeline,
# benchmarks.common): those --help answers import torch, not Ray.
CONFIG_IMPORTS_TORCH = ("benchmark", "evaluate", "pipeline", "train", "tune")

ASK_EVERY_JOB = textwrap.dedent("""
    import contextlib, importlib, io, json, sys
    found = {}
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        from jobs import cli
        cli.main(["--help"])
        found["cifar-embed"] = ["stages:" in shown.getvalue(), "torch" in sys.modules, "ray" in sys.modules]
    for stage in sys.argv[1:]:
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            try:
                importlib.import_module(f"jobs.{stage}").cli(["--help"])
            except SystemExit as done:
                answered = done.code == 0 and "usage:" in shown.getvalue()
        found[stage] = [answered, "torch" in sys.modules, "ray" in sys.modules]
    print(json.dumps(found))
""")


def test_every_help_answers_without_importing_ray_and_most_without_torch():
    stages = sorted(set(STAGES) - set(CONFIG_IMPORTS_TORCH)) + list(CONFIG_IMPORTS_TORCH)
    done = subprocess.run([sys.executable, "-c", ASK_EVERY_JOB, *stages], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(found) == ["cifar-embed", *stages]
    assert all(answered for answered, _, _ in found.values()), found
    assert not [stage for stage, (_, _, ray) in found.items() if ray], found
    torch_free = ["cifar-embed", *sorted(set(STAGES) - set(CONFIG_IMPORTS_TORCH))]
    assert not [stage for stage in torch_free if found[stage][1]], found
