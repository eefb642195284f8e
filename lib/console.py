"""Progress lines for people watching a job: one timestamped line on stderr (stdout keeps the results)."""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    """Write one progress line to stderr.

    Written to the stream directly: inside Ray Train workers ``print`` is patched to tee into
    Train's logger as well, which would show every line twice.
    """
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()
