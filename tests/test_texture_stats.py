"""Texture statistics: the map finds a foreign texture, the scorer part exports exactly, bad use is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly.scoring import Scorer, scoring_graph
from anomaly.texture_stats import MIN_SIDE, STATISTICS, StatisticsMap, fit_statistics_bank, texture_statistics


def _grating(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` random-phase, random-orientation gratings of period ~6 px: the normal texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for _ in range(n):
        th, ph = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        period = rng.uniform(5.5, 6.5)
        out.append(0.5 + 0.3 * np.sin(2 * np.pi * (xx * np.cos(th) + yy * np.sin(th)) / period + ph))
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))


def _with_foreign_patch(x: torch.Tensor) -> torch.Tensor:
    """A 20x20 patch of fine noise at the mean brightness, as a foreign texture of the same mean."""
    y = x.clone()
    g = torch.Generator().manual_seed(1)
    y[:, :, 32:52, 8:28] = 0.5 + 0.1 * torch.randn(x.shape[0], 1, 20, 20, generator=g)
    return y.clamp(0, 1)


def test_statistics_shapes_and_luma() -> None:
    x = _grating(2)
    f = texture_statistics(x)
    assert f.shape == (2, len(STATISTICS), 32, 32) and torch.isfinite(f).all()
    # an RGB image whose channels are equal is its own luma
    assert torch.allclose(texture_statistics(x.repeat(1, 3, 1, 1)), f, atol=1e-5)
    with pytest.raises(ValueError, match=f"at least {MIN_SIDE} px"):
        texture_statistics(torch.rand(1, 1, MIN_SIDE - 1, 64))


def test_map_is_high_on_a_foreign_patch_and_low_elsewhere() -> None:
    m = StatisticsMap()
    m.set_bank(*fit_statistics_bank([_grating(24, seed=0)], centres=64))
    test = _grating(4, seed=5)
    with torch.no_grad():
        normal, defect = m(test), m(_with_foreign_patch(test))
    assert normal.shape == defect.shape == (4, 1, 64, 64)
    inside = defect[:, :, 36:48, 12:24].mean()  # the patch's core, away from its blurred border
    away = defect[:, :, 4:20, 40:60].mean()
    assert inside > 3 * away, (float(inside), float(away))
    assert inside > 3 * normal[:, :, 36:48, 12:24].mean()


def test_small_training_sets_keep_every_vector() -> None:
    mean, std, bank = fit_statistics_bank([_grating(2, size=32)], centres=1024)
    assert bank.shape == (2 * 8 * 8, len(STATISTICS)) and mean.shape == std.shape == (len(STATISTICS),)
    with pytest.raises(ValueError, match="at least one normal training image"):
        fit_statistics_bank([])


def test_large_images_feed_a_bounded_number_of_vectors() -> None:
    from anomaly.texture_stats import MAX_VECTORS_PER_IMAGE

    _, _, bank = fit_statistics_bank([_grating(2, size=256)], centres=10_000)  # fewer vectors: all kept
    assert bank.shape == (2 * MAX_VECTORS_PER_IMAGE, len(STATISTICS))  # not the 2 x 64 x 64 of the full grids


def test_scorer_part_errors() -> None:
    with pytest.raises(ValueError, match="unknown texture score"):
        Scorer(texture="lbp")
    with pytest.raises(ValueError, match=f"at least {MIN_SIDE} px"):
        Scorer(texture="stats", image_size=(16, 16))
    with pytest.raises(ValueError, match="texture_weight must be > 0"):
        Scorer(texture="stats", texture_weight=0)
    with pytest.raises(ValueError, match="texture='stats'"):
        Scorer().set_statistics_bank(torch.zeros(9), torch.ones(9), torch.zeros(4, 9))
    sc = Scorer(texture="stats", image_size=(64, 64))
    x = _grating(2)
    with pytest.raises(ValueError, match="set_bank"):
        sc.components(x, x)
    sc.set_statistics_bank(*fit_statistics_bank([_grating(8)], centres=32))
    with pytest.raises(ValueError, match="set_mix_statistics"):
        sc.anomaly_map(x, x)
    with pytest.raises(ValueError, match=r"centres must be \(K >= 1, 9\)"):
        sc.set_statistics_bank(torch.zeros(9), torch.ones(9), torch.zeros(4, 3))


class _Identityish(torch.nn.Module):
    def forward(self, x, cond=None):
        return (x * 0.9 + 0.05).clamp(0, 1)


def test_scorer_with_statistics_exports_exactly(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from anomaly.deploy.export import export_onnx

    sc = Scorer(residual="l1", smoothing_sigma=2.0, aggregate="topk", image_size=(64, 64), texture="stats")
    sc.set_statistics_bank(*fit_statistics_bank([_grating(16)], centres=128))
    sc.set_mix_statistics(torch.tensor([0.05, 1.0]), torch.tensor([0.02, 0.5]))
    assert sc.config()["mix"] == {"parts": ["l1", "stats"], "mean": pytest.approx([0.05, 1.0]),
                                  "std": pytest.approx([0.02, 0.5]), "weight": [1.0, 0.5]}
    graph = scoring_graph(_Identityish(), sc).eval()
    batch = _with_foreign_patch(_grating(3, seed=9))
    export_onnx(graph, tmp_path / "m.onnx", batch[:2], conditional=False)
    sess = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": batch.numpy()})
    with torch.no_grad():
        want = graph(batch)
    # standardised units (the map's normal spread is ~1, the patch reads up to ~40): fp32 agreement
    np.testing.assert_allclose(got[0], want.anomaly_map.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want.score.numpy(), rtol=1e-4, atol=1e-4)
    # the statistics part moves the map where the residual alone does not see the patch
    plain = Scorer(residual="l1", smoothing_sigma=2.0, image_size=(64, 64))
    with torch.no_grad():
        assert (want.anomaly_map - plain.anomaly_map(batch, _Identityish()(batch))).abs().max() > 1.0


def test_flip_tta_measures_the_statistics_once_and_exports_exactly(tmp_path) -> None:
    """Under ``--tta flips`` the statistics part is measured on the un-flipped image only and added
    to the flip average of the other parts before smoothing; the graph exports with fp32 parity."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from anomaly.scoring import gaussian_blur
    from anomaly.deploy.export import export_onnx

    sc = Scorer(residual="l1", smoothing_sigma=2.0, aggregate="topk", image_size=(64, 64), texture="stats")
    sc.set_statistics_bank(*fit_statistics_bank([_grating(16)], centres=128))
    sc.set_mix_statistics(torch.tensor([0.05, 1.0]), torch.tensor([0.02, 0.5]))
    model = _Identityish()
    graph = scoring_graph(model, sc, "flips").eval()
    batch = _with_foreign_patch(_grating(3, seed=9))
    calls: list[int] = []
    sc.statistics.register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        got = graph(batch)
        assert calls == [3]  # one pass of the statistics, over the N un-flipped images
        views = [batch, batch.flip(-1), batch.flip(-2), batch.flip(-2, -1)]
        backs = [lambda m: m, lambda m: m.flip(-1), lambda m: m.flip(-2), lambda m: m.flip(-2, -1)]
        l1 = [back((sc.components(v, model(v), model, texture=False)[0] - 0.05) / 0.02)
              for v, back in zip(views, backs)]
        want = gaussian_blur(sum(l1) / 4 + 0.5 * (sc.statistics(batch) - 1.0) / 0.5, 2.0)
    torch.testing.assert_close(got.anomaly_map, want, rtol=1e-5, atol=1e-5)
    export_onnx(graph, tmp_path / "tta.onnx", batch[:2], conditional=False)
    sess = onnxruntime.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"])
    amap, score = sess.run(None, {"image": batch.numpy()})[:2]
    np.testing.assert_allclose(amap, got.anomaly_map.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(score, got.score.numpy(), rtol=1e-4, atol=1e-4)
