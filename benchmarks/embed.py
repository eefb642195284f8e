"""The embed suite: images/s of jobs.evaluate's embedding stage (:func:`onray.embed.stream_embeddings`: Ray Data
reads every split of a prepared DATA and streams it through an actor pool of :class:`onray.embed.EmbedBatches`)
against a plain ``torch.inference_mode`` loop in this process (:func:`lib.embedding.embed_loop`) that reads the
same splits with pyarrow and embeds them with the same networks, batch size, precision and torch threads.

Each round of either side builds the networks and reads the data, as a job run does; the Ray side also
pays its actors' start-up.

Run alone: ``python -c "from benchmarks.embed import measure; from lib.data.reader import PreparedData;
print(measure(PreparedData.open('DATA')))"``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkConfig, _median, interleave, prepared
from lib.data.reader import SPLITS, PreparedData
from lib.devices import available_cpus


def measure(data: PreparedData, rounds: int = 3, backbones: tuple[str, ...] = ("resnet50",), image_size: int = 32,
            batch_size: int = 256, embedding_dim: int = 128, num_actors: int = 0) -> dict:
    """Embedding throughput of a whole prepared DATA (every split): the job's Ray Data actor-pool pass vs a
    plain PyTorch loop, interleaved ``rounds``, each side once per round.

    Both sides embed every image with every network in ``backbones`` (seeded random weights, the same
    on both sides), on the GPU when Ray's actors get one, else on the CPU with ``lib.devices.available_cpus()`` torch
    threads (the Ray side's actors split the cores; ``num_actors`` 0 is jobs.evaluate's choice). Reports
    median wall seconds, embeddings/s (images x networks), the ratio Ray / plain, and the largest difference
    between the two sides' vectors for the same ids (same function; bf16 sums in another order differ a little).
    """
    import ray
    import torch

    from lib.embedding import ModelSource, embed_loop, load_embedding_model
    from onray.embed import stream_embeddings
    from onray.plan import actor_plan
    from onray.runtime import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    sources = [ModelSource(f"benchmark-{b}", b, "none", embedding_dim, image_size) for b in backbones]
    plan = actor_plan("auto", num_actors)  # 0: jobs.evaluate's choice
    device = torch.device("cuda" if plan.on_gpu else "cpu")

    def through_ray() -> dict[str, dict[str, np.ndarray]]:
        return stream_embeddings(data, sources, plan, batch_size)

    def plain_loop() -> dict[str, dict[str, np.ndarray]]:
        models = [load_embedding_model(source, device) for source in sources]
        out = {}
        for split in SPLITS:
            arrays = data.read_split(split)
            out[split] = {"id": arrays.ids, "label": arrays.labels}
            for i, (source, model) in enumerate(zip(sources, models, strict=True)):
                out[split][f"embedding_{i}"] = embed_loop(source, model, arrays.images, batch_size, device)
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    try:
        measured = interleave({"ray_actor_pool": through_ray, "plain_torch": plain_loop}, rounds, keep="last")
    finally:
        torch.set_num_threads(threads)
    ray_out, plain_out = measured.last("ray_actor_pool"), measured.last("plain_torch")
    images = sum(len(plain_out[split]["id"]) for split in SPLITS)
    diff = 0.0
    for split in SPLITS:
        ray_order = np.argsort(ray_out[split]["id"].astype(str))
        plain_order = np.argsort(plain_out[split]["id"].astype(str))
        if not np.array_equal(ray_out[split]["id"][ray_order], plain_out[split]["id"][plain_order]):
            raise RuntimeError(f"the two sides embedded different rows of split {split}")
        for i in range(len(sources)):
            key = f"embedding_{i}"
            diff = max(diff, float(np.abs(ray_out[split][key][ray_order] - plain_out[split][key][plain_order]).max()))
    results: dict = {"images": images, "backbones": list(backbones), "image_size": image_size,
                     "batch_size": batch_size, "rounds": rounds, "actors": plan.actors,
                     "device": "GPU" if plan.on_gpu else "CPU", "torch_threads": available_cpus(),
                     "max_abs_diff": round(diff, 6)}
    for name in ("ray_actor_pool", "plain_torch"):
        results[name] = {"wall_s": _median(measured.wall[name]), "cpu_s_driver": _median(measured.cpu[name]),
                         "embeddings_per_s": round(images * len(sources) / statistics.median(measured.wall[name]), 1)}
    results["ratio_ray_over_plain"] = round(
        results["ray_actor_pool"]["embeddings_per_s"] / results["plain_torch"]["embeddings_per_s"], 3)
    return results


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    data = prepared(cfg, work)
    # a round embeds the whole DATA (60k CIFAR-10 images) once per side: about a minute per network here
    return measure(data, rounds=min(cfg.rounds, 3), backbones=cfg.embed_backbones,
                   image_size=cfg.image_size or int(data.image_shape[0]), num_actors=cfg.embed_actors)


def summary(r: dict) -> str:
    return (f"{'+'.join(r['backbones'])} on {r['images']} images at {r['image_size']} px "
            f"({r['device']}): Ray Data actor pool {r['ray_actor_pool']['embeddings_per_s']} "
            f"embeddings/s vs plain loop {r['plain_torch']['embeddings_per_s']} -> "
            f"{r['ratio_ray_over_plain']}x")
