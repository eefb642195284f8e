"""Browse a finished run: a similarity-search service and run gallery on Ray Serve.

    python -m jobs.serve --run-dir RUN [--port 8000] [--host 127.0.0.1] [--model NAME]
    serve run onray.serve:build_app run_dir=RUN [model=NAME]      # the same app under Serve's own CLI

Open http://127.0.0.1:8000/ for the page (results table, loss curves, t-SNE and clusters, test queries
with their neighbours; click any image to search from it, or upload a file), or ask the API:
``curl -F image=@cat.png -F k=5 http://127.0.0.1:8000/search``. The service runs until Ctrl-C.
See :mod:`onray.serve` for the endpoints.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from dataclasses import dataclass

from jobs.cli import command_line, run_job
from lib.config import check_ranges, option
from lib.console import log
from lib.devices import USE_GPU_HELP, UseGpu
from lib.errors import UserError


@dataclass(frozen=True)
class ServeConfig:
    """Serve nearest-neighbour search and a page to browse a run, from the index jobs.evaluate saved."""

    run_dir: str = option(help="run folder that jobs.evaluate completed")
    port: int = option(8000, help="HTTP port of Serve's proxy")
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0 opens the service to the network)")
    model: str = option("", help="default model to search with (default: the one whose index jobs.evaluate saved)")
    max_upload_mb: float = option(5.0, help="largest image upload accepted, in MiB")
    max_batch_size: int = option(16, help="most queries embedded and searched together (@serve.batch)")
    batch_wait_ms: float = option(2.0, help="how long a query waits for others to share its batch")
    use_gpu: UseGpu = option("auto", help=USE_GPU_HELP + " (the replica's forward passes)")
    gpus_per_replica: float = option(0.25, help="share of one GPU the replica takes when it runs on a GPU "
                                                "(the rest stays free for other work)")
    replica_cpus: int = option(0, help="CPUs of the replica, also its torch threads (0: up to 4 of this machine's)")

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must be between 1 and 65535, got {self.port}")
        if self.max_upload_mb <= 0 or self.max_batch_size <= 0 or self.batch_wait_ms < 0:
            raise UserError("--max-upload-mb and --max-batch-size must be positive, --batch-wait-ms not negative")
        check_ranges(self, non_negative=("replica_cpus",),
                     at_most={"max_upload_mb": 1024, "max_batch_size": 1024, "batch_wait_ms": 10_000,
                              "replica_cpus": 1024})
        if not 0.0 < self.gpus_per_replica <= 1.0:
            raise UserError(f"--gpus-per-replica must be in (0, 1], got {self.gpus_per_replica}")


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port") from None


def main(cfg: ServeConfig) -> None:
    from lib.paths import RunPaths
    from lib.search import check_saved_gallery

    run = RunPaths.of(cfg.run_dir)
    check_saved_gallery(run, cfg.model)  # a missing or damaged index: one line now, before Ray, not a replica failing
    check_port_free(cfg.host, cfg.port)
    import ray

    from lib.devices import available_cpus
    from lib.planning import plan_replica
    from onray.runtime import init_ray
    from onray.serve import GallerySettings, start_gallery

    init_ray()
    replica = plan_replica(cfg.use_gpu, int(ray.cluster_resources().get("GPU", 0)), cfg.gpus_per_replica,
                           cfg.replica_cpus or min(4, available_cpus()))
    signal.signal(signal.SIGTERM, stop)  # `kill` ends it like Ctrl-C: one line, exit 130
    url = start_gallery(GallerySettings(str(run.root), cfg.model, int(cfg.max_upload_mb * 1024 * 1024),
                                        max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
                                        replica_cpus=replica.cpus, replica_gpus=replica.gpus),
                        cfg.host, cfg.port)
    log(f"serving {run.root} at {url} on {f'{replica.gpus:g} of a GPU' if replica.on_gpu else f'{replica.cpus} CPU(s)'} "
        f"(POST {url}search; Ctrl-C stops)")
    while True:
        time.sleep(3600)


def stop(signum, frame) -> None:
    raise KeyboardInterrupt


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, ServeConfig, argv, prog="jobs.serve")


if __name__ == "__main__":
    sys.exit(command_line(cli))
