"""Exact search off faiss's GPU kernels (torch), the faiss GPU probe, and the GPU-friendly normalisation."""

import numpy as np
import pytest
import torch

from lib.augment import normalization_constants, normalize, resize_batch
from lib.retrieval import faiss_gpu
from lib.retrieval.index import build_index, knn, l2_normalize, search
from lib.retrieval.torch_search import query_chunk, torch_knn


def random_gallery(n: int, d: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, d)))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_torch_search_equals_faiss_on_random_galleries(exclude_self):
    gallery = random_gallery(500, 24, seed=1)
    queries = gallery if exclude_self else random_gallery(70, 24, seed=2)
    faiss_sims, faiss_rows = knn(queries, gallery, 7, exclude_self=exclude_self, use_gpu=False)
    # a tiny block budget forces many query chunks: chunking must not change the answer
    torch_sims, torch_rows = torch_knn(queries, gallery, 7, exclude_self=exclude_self, block_bytes=4 * 500 * 9)
    assert query_chunk(500, 4 * 500 * 9) == 9
    np.testing.assert_array_equal(torch_rows, faiss_rows)
    np.testing.assert_allclose(torch_sims, faiss_sims, rtol=0, atol=1e-5)
    assert torch_rows.dtype == np.int64 and torch_sims.dtype == np.float32


def test_torch_search_on_a_hand_made_gallery():
    # four unit vectors on a circle at 0, 10, 100 and 180 degrees (no two similarities tie)
    angles = np.radians([0.0, 10.0, 100.0, 180.0])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    sims, rows = torch_knn(gallery, gallery, 2, exclude_self=True)
    # from 0: 10 (cos 10), 100 (cos 100); from 10: 0, 100 (cos 90); from 100: 180 (cos 80), 10 (cos 90);
    # from 180: 100 (cos 80), 10 (cos 170)
    assert rows.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1]]
    np.testing.assert_allclose(sims[0], np.cos(np.radians([10, 100])), atol=1e-6)
    np.testing.assert_allclose(sims[3], np.cos(np.radians([80, 170])), atol=1e-6)


def test_torch_search_drops_the_named_own_rows_of_a_query_chunk():
    gallery = random_gallery(200, 16, seed=3)
    chunk_rows = np.arange(50, 80)
    expected = knn(gallery, gallery, 5, exclude_self=True, use_gpu=False)[1][chunk_rows]
    _, rows = torch_knn(gallery[chunk_rows], gallery, 5, self_rows=chunk_rows)
    np.testing.assert_array_equal(rows, expected)


def test_torch_search_refuses_more_neighbours_than_the_gallery_holds():
    gallery = random_gallery(5, 4, seed=4)
    with pytest.raises(ValueError, match="k=5"):
        torch_knn(gallery, gallery, 5, exclude_self=True)


def test_the_cpu_index_is_faiss_and_searches_as_before():
    gallery = random_gallery(100, 8, seed=5)
    index = build_index(gallery, use_gpu=False)
    assert index.engine == "faiss" and not index.on_gpu
    np.testing.assert_array_equal(search(index, gallery[:10], 3)[1], torch_knn(gallery[:10], gallery, 3)[1])


def test_a_probe_that_aborts_says_not_usable_and_this_process_lives_on():
    result = faiss_gpu.run_probe("import os\nos.abort()\n", timeout_s=60)
    assert not result.usable
    assert "signal 6" in result.reason


def test_a_probe_with_wrong_neighbours_or_a_crash_is_not_usable():
    wrong = faiss_gpu.run_probe("raise AssertionError('rows [[1] [0]]')\n", timeout_s=60)
    assert not wrong.usable and "exited with 1" in wrong.reason and "AssertionError" in wrong.reason
    slow = faiss_gpu.run_probe("import time\ntime.sleep(30)\n", timeout_s=1)
    assert not slow.usable and "did not finish" in slow.reason
    assert faiss_gpu.run_probe("print('faiss-gpu-search-ok test')\n", timeout_s=60).usable


def test_the_real_probe_on_this_faiss_build_decides_cleanly():
    # faiss-cpu has no GpuIndexFlatIP: the child fails and the verdict is "not usable", one line
    result = faiss_gpu.run_probe()
    assert result.usable is False
    assert "\n" not in result.reason


def test_the_probe_verdict_can_be_forced(monkeypatch):
    faiss_gpu.probe.cache_clear()
    monkeypatch.setenv("CIFAR_EMBED_FAISS_GPU", "0")
    assert faiss_gpu.probe() == faiss_gpu.ProbeResult(False, "CIFAR_EMBED_FAISS_GPU=0")
    faiss_gpu.probe.cache_clear()


def test_normalisation_constants_are_made_once_per_device():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    first = normalization_constants(images.device, True)
    normalize(images)
    normalize(images)
    second = normalization_constants(images.device, True)
    assert first[0] is second[0] and first[1] is second[1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(normalize(images), (images.float() - mean) / std)


def test_resizing_in_chunks_equals_resizing_in_one_go():
    images = torch.randint(0, 256, (37, 32, 32, 3), dtype=torch.uint8)
    whole = resize_batch(images, 64, chunk=len(images))
    assert torch.equal(resize_batch(images, 64, chunk=8), whole)
    assert whole.shape == (37, 3, 64, 64) and whole.dtype == torch.uint8


def test_one_pass_embeds_with_every_model_as_each_alone_would(monkeypatch):
    import lib.embedding as embedding

    sources = [embedding.ModelSource(f"m{i}", "resnet50", "none", 8, size, seed=i)
               for i, size in enumerate((32, 48, 32))]
    models = [embedding.load_embedding_model(source) for source in sources]
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    alone = [embedding.embed_loop(source, model, images, batch_size=4) for source, model in zip(sources, models, strict=True)]
    resized = []
    real_resize = embedding.resize_batch
    monkeypatch.setattr(embedding, "resize_batch", lambda batch, size: resized.append(size) or real_resize(batch, size))
    bf16 = [embedding.uses_bf16(source.precision, torch.device("cpu")) for source in sources]
    together = embedding.embed_with_models(models, sources, images, torch.device("cpu"), bf16, chunk=4)
    for one, other in zip(alone, together, strict=True):
        np.testing.assert_allclose(other, one, rtol=0, atol=1e-5)
    assert sorted(resized) == [32, 32, 32, 48, 48, 48]  # 3 chunks x 2 distinct sizes, not x 3 models


def test_training_validation_searches_with_torch_and_scores_as_faiss_would():
    from lib.retrieval.metrics import map_at_k, precision_at_k
    from lib.training import val_retrieval_metrics

    embeddings = random_gallery(300, 16, seed=6)
    labels = np.random.default_rng(6).integers(0, 5, 300)
    _, rows = knn(embeddings, embeddings, 5, exclude_self=True, use_gpu=False)
    expected = {"val_map@5": map_at_k(labels[rows], labels, 5), "val_p@5": precision_at_k(labels[rows], labels, 5)}
    assert val_retrieval_metrics(embeddings, labels) == pytest.approx(expected)


def test_gpu_steps_are_sized_by_the_input_side():
    from lib.embedding import MAX_DEVICE_CHUNK, device_chunk

    cuda = torch.device("cuda")
    assert device_chunk([224], cuda) == 256 and device_chunk([112], cuda) == 1024
    assert device_chunk([32, 224], cuda) == 256  # the largest input decides
    assert device_chunk([32], cuda) == MAX_DEVICE_CHUNK and device_chunk([2048], cuda) == 16
    assert device_chunk([224], torch.device("cpu")) == MAX_DEVICE_CHUNK
