"""One faiss wheel per environment: the extras never combine two, and the import refuses a mixed install."""

import re
from pathlib import Path

import pytest
import tomllib

from lib.errors import UserError
from lib.retrieval.index import FAISS_WHEELS, check_faiss_install, faiss_wheels

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())


def faiss_requirements(requirements):
    names = [re.split(r"[<>=!;\[ ]", req, maxsplit=1)[0].strip().lower() for req in requirements]
    return [name for name in names if name in FAISS_WHEELS]


def test_the_base_install_has_no_faiss_and_each_extra_exactly_one():
    project = PYPROJECT["project"]
    assert faiss_requirements(project["dependencies"]) == []
    extras = project["optional-dependencies"]
    assert faiss_requirements(extras["cpu"]) == ["faiss-cpu"]
    assert faiss_requirements(extras["gpu"]) == ["faiss-gpu-cu12"]
    assert faiss_requirements(extras["dev"]) == []  # the test tools combine with either


def test_this_environment_has_exactly_one_faiss_wheel():
    assert len(faiss_wheels()) == 1


def test_a_mixed_or_missing_faiss_install_is_one_line_naming_the_fix():
    with pytest.raises(UserError) as caught:
        check_faiss_install(["faiss-cpu", "faiss-gpu-cu12"])
    message = str(caught.value)
    assert "faiss-cpu and faiss-gpu-cu12 are both installed" in message
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12" in message and "'.[gpu]'" in message
    with pytest.raises(UserError, match=r"faiss is not installed: pip install -e '\.\[cpu\]'"):
        check_faiss_install([])
    check_faiss_install(["faiss-gpu-cu12"])
