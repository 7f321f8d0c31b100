"""The out-of-distribution score's bank: projected to its main subspace, saved, loaded, and computed alike in NumPy
and in the graph (`catdog.training.ood`)."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.numpy import save_file

from catdog.training.ood import KnnScorer, normalised


def low_rank_features(rows: int, dimensions: int = 640, rank: int = 24, seed: int = 0) -> np.ndarray:
    """Positive, correlated vectors like a ReLU network's pooled features: a few directions carry most of them."""
    generator = np.random.default_rng(seed)
    basis = np.abs(generator.normal(size=(rank, dimensions)))
    return (np.abs(generator.normal(size=(rows, rank))) @ basis + 0.05 * np.abs(generator.normal(size=(rows, dimensions)))).astype(np.float32)


def exact_scores(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    similarity = normalised(queries) @ normalised(train).T
    return 1.0 - np.sort(similarity, axis=1)[:, -k]


def test_a_bank_smaller_than_the_projection_is_projected_exactly():
    train, queries = low_rank_features(120), low_rank_features(30, seed=1)
    scorer = KnnScorer.fit(train, k=5, dimensions=256)
    assert scorer.projection is not None and scorer.bank.shape == (120, 120)  # the bank's own span: 120 directions
    np.testing.assert_allclose(scorer.scores(queries), exact_scores(train, queries, 5), atol=2e-3)  # float16 bank


def test_a_projected_bank_keeps_the_nearest_neighbour_score_and_separates_strangers():
    train, queries = low_rank_features(600), low_rank_features(60, seed=1)
    strangers = np.abs(np.random.default_rng(2).normal(size=(60, 640))).astype(np.float32)  # no shared structure
    scorer = KnnScorer.fit(train, k=5, dimensions=64)
    assert scorer.bank.shape == (600, 64) and scorer.bank.dtype == np.float16 and scorer.projection.shape == (640, 64)
    projected, exact = scorer.scores(queries), exact_scores(train, queries, 5)
    assert np.abs(projected - exact).max() < 0.01
    assert scorer.scores(strangers).min() > projected.max()
    full = KnnScorer.fit(train, k=5, dimensions=640)
    assert full.projection is None and full.bank.shape == (600, 640)


def test_the_graph_and_a_saved_and_loaded_scorer_give_the_same_scores(tmp_path):
    train, queries = low_rank_features(400), low_rank_features(16, seed=3)
    scorer = KnnScorer.fit(train, k=5, dimensions=64)
    scorer.save(tmp_path / "ood.safetensors")
    loaded = KnnScorer.load(tmp_path / "ood.safetensors")
    np.testing.assert_array_equal(loaded.projection, scorer.projection)
    np.testing.assert_array_equal(loaded.scores(queries), scorer.scores(queries))
    with torch.no_grad():
        graph = loaded.module()(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(graph, scorer.scores(queries), atol=1e-5)


def test_a_bank_saved_without_a_projection_still_loads_and_scores_in_all_dimensions(tmp_path):
    train, queries = low_rank_features(50), low_rank_features(8, seed=4)
    bank = normalised(train).astype(np.float16)
    save_file({"bank": bank}, str(tmp_path / "ood.safetensors"), metadata={"method": "knn", "k": "5"})
    loaded = KnnScorer.load(tmp_path / "ood.safetensors")
    assert loaded.projection is None and loaded.k == 5
    np.testing.assert_allclose(loaded.scores(queries), exact_scores(train, queries, 5), atol=2e-3)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.module()(torch.from_numpy(queries)).numpy(), loaded.scores(queries), atol=1e-5)
