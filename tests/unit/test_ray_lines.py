"""Ray's log-line formats (onray.ray_lines: text matching only, no Ray started): routine lines, error lines and
the known-harmless ones told apart, one line of each format as Ray 2.60 writes it."""

import subprocess
import sys

from lib import console
from onray.ray_lines import HARMLESS, ray_error_line, ray_level, routine_ray_line

RAY_INFO = "2026-11-30 01:01:19,744\tINFO worker.py:2029 -- Started a local Ray instance."
RAY_WARNING = "2026-11-30 01:01:15,260\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled"
RAY_ERROR = "2026-11-30 01:01:15,260\tERROR worker.py:12 -- something broke"
CPP_HARMLESS = ("[2026-11-30 01:03:09,227 E 24462 24462] core_worker.cc:2465: Actor with class name: 'MapWorker' and "
                "ID: 'd7f9' has constructor arguments in the object store and max_restarts > 0. If the arguments")
CPP_ERROR = "[2026-11-30 01:03:09,227 E 24462 24462] core_worker.cc:99: Failed to connect to the raylet"
CPP_INFO = "[2026-11-30 01:03:09,227 I 24462 24462] core_worker.cc:99: connected"
SERVE_INFO = 'INFO 2026-12-03 17:41:02,517 serve 4100 -- Started Serve in namespace "serve".'
SERVE_REQUEST_INFO = "INFO 2026-12-03 17:41:09,002 gallery_GalleryService q8x1 7f3e-request -- POST /search 200 28.1ms"
SERVE_ERROR = "ERROR 2026-12-03 17:41:09,002 gallery_GalleryService q8x1 -- Exception in replica"


def test_ray_routine_lines_are_told_from_errors_and_our_own():
    for line in (RAY_INFO, RAY_WARNING, CPP_HARMLESS, CPP_INFO, SERVE_INFO, SERVE_REQUEST_INFO):
        assert routine_ray_line(line), line
        assert not ray_error_line(line), line
    for line in (RAY_ERROR, CPP_ERROR, SERVE_ERROR):
        assert not routine_ray_line(line) and ray_error_line(line), line
    ours = "[01:03:00] densenet121: untrained val mAP@5 0.400"
    assert console.OURS.match(ours) and not routine_ray_line(ours) and not ray_error_line(ours)
    assert not routine_ray_line("Traceback (most recent call last):")


def test_levels_of_both_formats():
    assert [ray_level(line) for line in (RAY_INFO, RAY_WARNING, RAY_ERROR, CPP_ERROR, CPP_INFO)] == \
        ["I", "W", "E", "E", "I"]
    assert ray_level("INFO worker.py:1 -- no timestamp, not Ray's logging") is None


def test_every_harmless_pattern_hides_an_error_level_line():
    samples = [CPP_HARMLESS,
               "[2026-11-30 01:03:09,227 E 1 1] gcs_actor_manager.cc:1: Failed to kill actor abc, KillActor RPC failed",
               "2026-11-30 01:01:15,260\tERROR x.py:1 -- RayDeprecationWarning: `ExecutionOptions.exclude_resources`"]
    assert len(samples) == len(HARMLESS)
    for pattern, line in zip(HARMLESS, samples, strict=True):
        assert pattern.search(line) and ray_level(line) == "E", line
        assert routine_ray_line(line) and not ray_error_line(line), line


def test_the_formats_module_does_not_import_ray():
    code = "import sys, onray.ray_lines, jobs.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
