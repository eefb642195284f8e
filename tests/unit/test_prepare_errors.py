"""Bad input to jobs.prepare that is caught before Ray starts: one line on stderr, exit 2, no output."""

import subprocess
import sys

import pytest

from jobs import prepare
from tests.conftest import make_image_folder


def run(capsys, *argv):
    code = prepare.cli(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if not line.startswith("[")]  # drop progress lines


def assert_one_line_error(code, lines, *fragments):
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("jobs.prepare: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_source(tmp_path, capsys):
    code, lines = run(capsys, "--source", f"imagefolder:{tmp_path / 'nope'}", "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(code, lines, "source folder does not exist", str(tmp_path / "nope"))
    assert not (tmp_path / "d").exists()  # nothing created


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "test" / "cat").mkdir(parents=True)
    code, lines = run(capsys, "--source", f"imagefolder:{tmp_path / 'src'}", "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(code, lines, "no images found in", str(tmp_path / "src"))
    assert not (tmp_path / "d").exists()


def test_classes_under_only_one_split(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", 2, 2, classes=("cat", "dog"))
    make_image_folder(src, 2, 0, classes=("frog",))
    (src / "test" / "frog").rmdir()
    code, lines = run(capsys, "--source", f"imagefolder:{src}", "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(code, lines, "['frog'] only under", str(src / "train"))


def test_only_one_class(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", 3, 2, classes=("cat",))
    code, lines = run(capsys, "--source", f"imagefolder:{src}", "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(code, lines, "only one class folder ('cat')", str(src))


def test_unwritable_data_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, lines = run(capsys, "--source", "imagefolder:/anything", "--data-dir", str(blocker / "data"))
    assert_one_line_error(code, lines, "cannot write to output folder", str(blocker / "data"))
    assert blocker.read_text() == "not a folder"


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text("source: cifar10\ndata_dir: /tmp/x\nval_fractoin: 0.2\n")
    code, lines = run(capsys, "--config", str(config))
    assert_one_line_error(code, lines, "unknown key 'val_fractoin'", str(config))


@pytest.mark.parametrize("flag, value, fragment", [
    ("--val-fraction", "1.5", "--val-fraction must be between 0 and 1"),
    ("--source", "mnist", "unknown --source 'mnist'"),
])
def test_bad_values(tmp_path, capsys, flag, value, fragment):
    argv = {"--source": f"imagefolder:{tmp_path}", "--data-dir": str(tmp_path / "d"), flag: value}
    code, lines = run(capsys, *[x for kv in argv.items() for x in kv])
    assert_one_line_error(code, lines, fragment)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.prepare", "--source", f"imagefolder:{tmp_path / 'none'}",
                          "--data-dir", str(tmp_path / "d")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.strip().splitlines() if not line.startswith("[")] == [
        f"jobs.prepare: error: source folder does not exist: {tmp_path / 'none'}"]
