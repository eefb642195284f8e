"""Ray Data sets up its logging when it is first imported, with a handler on the ``sys.stderr`` of that moment:
imported here, at collection, that is the real stderr. Imported first inside a test (the jobs import the Ray side
only when they run), it would be that test's captured stream, closed after it, and every later Ray Data line
would be a logging error in another test's output."""

import ray.data  # noqa: F401
