"""The console a person sees: which of Ray's lines reach the terminal, the log file, progress lines, --verbose."""

import subprocess
import sys
import textwrap

from jobs.train import TrainConfig
from lib import console
from lib.config import parse_config
from tests.conftest import REPO

RAY_INFO = "2026-11-30 01:01:19,744\tINFO worker.py:2029 -- Started a local Ray instance."
CPP_HARMLESS = ("[2026-11-30 01:03:09,227 E 24462 24462] core_worker.cc:2465: Actor with class name: 'MapWorker' and "
                "ID: 'd7f9' has constructor arguments in the object store and max_restarts > 0. If the arguments")


def test_verbose_is_a_flag_of_every_job_and_not_a_setting(tmp_path):
    cfg = parse_config(TrainConfig, ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path), "--verbose"])
    assert not hasattr(cfg, "verbose")


def test_plain_progress_lines_say_count_rate_and_time_left(capsys, monkeypatch):
    monkeypatch.setattr(console, "PLAIN_PROGRESS_EVERY_S", 0.0)
    progress = console.Progress(200, "embed", unit="img", initial=50)
    progress.update(100)
    progress.close("embedded 200 images")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "embed: 100/200 img (" in lines[0] and "img/s" in lines[0] and "s left" in lines[0]
    assert lines[1].endswith("embedded 200 images")


def test_a_started_console_keeps_ray_lines_in_the_log_file_and_shows_the_rest(tmp_path):
    """The whole route in a fresh process, with the Ray layer's classifier as jobs.cli wires it: lines written to
    file descriptor 2 (as Ray's loggers and its C++ core do) are filtered; ours and the error line reach the
    terminal, the error last; the log file gets all."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from lib import console
        from onray.ray_lines import routine_ray_line
        console.start("demo", {str(tmp_path / "logs")!r}, log_only=routine_ray_line)
        os.write(2, {(RAY_INFO + chr(10)).encode()!r})
        os.write(2, {(CPP_HARMLESS + chr(10)).encode()!r})
        os.write(2, b"a line nobody filters\\n")
        console.log("ours")
        console.detail("for the log file only")
        assert console.log_path() is None  # no file before the job starts work
        console.open_log_file()
        console.error("demo: error: the end")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "a line nobody filters" in lines and any(line.endswith("] ours") for line in lines)
    assert lines[-1] == "demo: error: the end"
    assert not any("Started a local Ray" in line or "max_restarts" in line or "log file only" in line
                   for line in lines)
    logs = list((tmp_path / "logs").glob("demo-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    for expected in ("Started a local Ray", "max_restarts", "a line nobody filters", "] ours", "log file only",
                     "demo: error: the end"):
        assert expected in text, expected


def test_a_console_without_a_classifier_shows_every_line(tmp_path):
    """lib knows no Ray format: started without the Ray layer's classifier, fd 2's lines all reach the terminal."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from lib import console
        console.start("demo", {str(tmp_path / "logs")!r})
        os.write(2, {(RAY_INFO + chr(10)).encode()!r})
        console.open_log_file()
        console.error("demo: error: the end")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert RAY_INFO in done.stderr.splitlines()
    assert done.stderr.splitlines()[-1] == "demo: error: the end"


def test_a_verbose_console_shows_everything(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from lib import console
        console.start("demo", {str(tmp_path / "logs")!r}, verbose=True)
        os.write(2, {(RAY_INFO + chr(10)).encode()!r})
        console.detail("a detail")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "Started a local Ray" in done.stderr and "a detail" in done.stderr
