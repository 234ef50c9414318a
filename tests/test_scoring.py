"""Residuals, smoothing, aggregation and per-pixel normalisation — and that each exports exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly.scoring import (PIXEL_RESIDUALS, FlipAveraged, ReconstructionScorer, Scorer, gaussian_blur, residual_map,
                             scoring_graph, ssim_map)


def _pair(seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, size, size, generator=g)
    x = gaussian_blur(x, 1.0)
    y = x.clone()
    y[:, :, 20:30, 40:50] = 1.0 - y[:, :, 20:30, 40:50]  # a defect: inverted square
    return x, y


class _Identityish(torch.nn.Module):
    """A stand-in reconstructor: a slightly wrong copy of its input."""

    def forward(self, x, cond=None):
        return (x * 0.9 + 0.05).clamp(0, 1)


def _onnx_vs_torch(graph: torch.nn.Module, example: torch.Tensor, batch: torch.Tensor, tmp_path) -> tuple[list, object]:
    """Export ``graph`` traced on ``example``, run ``batch`` through onnxruntime and torch: (ort outputs, torch output)."""
    import onnxruntime as ort

    from anomaly.deploy.export import export_onnx

    export_onnx(graph, tmp_path / "m.onnx", example, conditional=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": batch.numpy()})
    with torch.no_grad():
        return got, graph(batch)


@pytest.mark.parametrize("kind", PIXEL_RESIDUALS)
def test_residual_is_zero_for_identical_and_peaks_on_the_defect(kind: str) -> None:
    x, y = _pair()
    same = residual_map(x, x, kind)
    assert same.shape == (2, 1, 64, 64) and same.abs().max() < 1e-4
    r = residual_map(x, y, kind)
    inside = r[:, :, 20:30, 40:50].mean()
    outside = r[:, :, :, :16].mean()
    assert inside > 5 * outside + 1e-3, (kind, float(inside), float(outside))


def test_ssim_matches_scikit_image() -> None:
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair(1)
    a, b = x[0, 0].numpy().astype(np.float64), y[0, 0].numpy().astype(np.float64)
    ref = skm.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)[1]
    ours = ssim_map(x[:1], y[:1])[0, 0].numpy()
    # compare away from the border, where padding conventions differ
    assert np.abs(ours[6:-6, 6:-6] - ref[6:-6, 6:-6]).max() < 1e-3


def test_aggregates_and_smoothing() -> None:
    amap = torch.zeros(1, 1, 32, 32)
    amap[0, 0, 16, 16] = 1.0  # away from the border, where reflect padding folds mass back
    s_max = Scorer(residual="l1", smoothing_sigma=0, aggregate="max", image_size=(32, 32))
    s_top = Scorer(residual="l1", smoothing_sigma=0, aggregate="topk", topk_fraction=4 / 1024, image_size=(32, 32))
    s_mean = Scorer(residual="l1", smoothing_sigma=0, aggregate="mean", image_size=(32, 32))
    zero = torch.zeros_like(amap)
    assert s_max(amap, zero)[1].item() == pytest.approx(1.0)
    assert s_top(amap, zero)[1].item() == pytest.approx(0.25)
    assert s_mean(amap, zero)[1].item() == pytest.approx(1 / 1024)
    blurred = gaussian_blur(amap, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-4) and blurred.max() < 0.1


def test_per_pixel_normalisation_removes_persistent_error() -> None:
    """A model that always gets one corner wrong: normalisation makes the real defect stand out."""
    x, y = _pair(2)
    persistent = torch.zeros(1, 1, 64, 64)
    persistent[..., :8, :8] = 0.9
    scorer = Scorer(residual="l1", smoothing_sigma=0, aggregate="max", image_size=(64, 64))
    x_hat_normal = (x + persistent).clamp(0, 1)
    raw, _ = scorer(x, x_hat_normal)
    assert raw[..., :8, :8].mean() > 0.3  # unnormalised, the corner dominates
    r = scorer.raw_residual(x, x_hat_normal)
    scorer.set_normalization(r.mean(0, keepdim=True), torch.full_like(r[:1], 0.05))
    normed, _ = scorer(y, (x + persistent).clamp(0, 1))
    assert normed[..., 20:30, 40:50].mean() > 3 * normed[..., :8, :8].abs().mean()


@pytest.mark.parametrize("kind", PIXEL_RESIDUALS)
def test_each_residual_exports_with_parity(kind: str, tmp_path) -> None:
    graph = ReconstructionScorer(_Identityish(), Scorer(residual=kind, smoothing_sigma=2.0, aggregate="topk",
                                                        image_size=(64, 64))).eval()
    x, y = _pair(3)
    # batch 6 != export batch 2: the axis is dynamic
    out, ref = _onnx_vs_torch(graph, x, torch.cat([x, y, x]), tmp_path)
    assert np.abs(out[0] - ref.anomaly_map.numpy()).max() < 1e-4
    assert np.abs(out[1] - ref.score.numpy()).max() < 1e-4


def test_ycc_colour_weighs_a_change_of_hue_more_than_rgb_does(tmp_path) -> None:
    """``colour="ycc"``: the l1 residual of BT.601 Y, Cb, Cr differences, exported exactly."""
    g = torch.Generator().manual_seed(5)
    x = 0.3 + 0.4 * torch.rand(2, 3, 32, 32, generator=g)
    hue, bright = x.clone(), x.clone()
    # an isoluminant change (+R, -G balanced by luma) and a gray one of the same RGB L1 size
    hue[:, 0, 8:16, 8:16] += 0.1
    hue[:, 1, 8:16, 8:16] -= 0.1 * 0.299 / 0.587
    step = float((hue - x).abs().mean(1)[0, 8, 8])
    bright[:, :, 8:16, 8:16] += step
    for colour in ("rgb", "ycc"):
        assert residual_map(x, x, "l1", colour=colour).abs().max() < 1e-6
    rgb = [float(residual_map(x, y, "l1")[0, 0, 12, 12]) for y in (hue, bright)]
    ycc = [float(residual_map(x, y, "l1", colour="ycc")[0, 0, 12, 12]) for y in (hue, bright)]
    assert rgb[0] == pytest.approx(rgb[1], rel=1e-4)  # rgb: the same size ...
    assert ycc[0] > 1.3 * ycc[1]  # ... ycc: the hue change counts more (1.42x here)
    # against a numpy reference of the transform
    m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
    ref = np.abs(np.einsum("ij,njhw->nihw", m, (x - hue).numpy())).mean(1, keepdims=True)
    np.testing.assert_allclose(residual_map(x, hue, "l1", colour="ycc").numpy(), ref, atol=1e-6)
    # errors that say what is wrong
    with pytest.raises(ValueError, match="needs an RGB model"):
        residual_map(x[:, :1], hue[:, :1], "l1", colour="ycc")
    with pytest.raises(ValueError, match="l1 / l2 differences only"):
        Scorer(residual="ssim", colour="ycc")
    with pytest.raises(ValueError, match="unknown colour space"):
        Scorer(residual="l1", colour="lab")
    # exported: onnxruntime matches torch, and the setting is in the scorer's config
    scorer = Scorer(residual="l1_ssim", colour="ycc", smoothing_sigma=2.0, aggregate="topk", image_size=(32, 32))
    assert scorer.config()["colour"] == "ycc"
    out, ref_out = _onnx_vs_torch(ReconstructionScorer(_Identityish(), scorer).eval(), x, torch.cat([x, hue, bright]), tmp_path)
    assert np.abs(out[0] - ref_out.anomaly_map.numpy()).max() < 1e-4
    assert np.abs(out[1] - ref_out.score.numpy()).max() < 1e-4


def test_learned_residual_reads_the_models_segmenter() -> None:
    from anomaly.registry import create_model

    x, y = _pair(4, size=32)
    with pytest.raises(ValueError, match="needs a model with a segmenter"):
        residual_map(x, y, "learned")
    plain = create_model("cyclegan", in_channels=1, image_size=32, generator="unet", base_channels=8, disc_channels=8)
    with pytest.raises(ValueError, match="needs a model with a segmenter"):
        ReconstructionScorer(plain, Scorer(residual="learned", image_size=(32, 32)))(x)
    torch.manual_seed(0)
    model = create_model("cyclegan", in_channels=1, image_size=32, generator="unet", base_channels=8,
                         disc_channels=8, segmenter=True, segmenter_channels=8).eval()
    graph = ReconstructionScorer(model, Scorer(residual="learned", smoothing_sigma=0.0, aggregate="max",
                                               image_size=(32, 32))).eval()
    with torch.no_grad():
        out = graph(y)
        want = model.segmenter(torch.cat([y, model(y)], 1))
    assert torch.equal(out.anomaly_map, want)
    assert torch.equal(out.score, want.flatten(1).max(1).values)
    assert float(want.min()) >= 0.0 and float(want.max()) <= 1.0


def test_segmenter_can_read_the_residual_too() -> None:
    """``segmenter_input="pair_diff"`` hands the segmenter ``cat[x, x_hat, |x - x_hat|]``."""
    from anomaly.registry import create_model

    with pytest.raises(ValueError, match="segmenter_input"):
        create_model("cyclegan", in_channels=1, image_size=32, generator="unet", segmenter=True, segmenter_input="diff")
    torch.manual_seed(0)
    model = create_model("cyclegan", in_channels=1, image_size=32, generator="unet", base_channels=8,
                         disc_channels=8, segmenter=True, segmenter_channels=8, segmenter_input="pair_diff").eval()
    x, y = _pair(2, size=32)
    with torch.no_grad():
        got = model.defect_map(x, y)
        assert torch.equal(got, model.segmenter(torch.cat([x, y, (x - y).abs()], 1)))
    first_conv = next(m for m in model.segmenter.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3 and got.shape == (2, 1, 32, 32)


def test_mixed_residual_sums_standardised_parts_and_exports(tmp_path) -> None:
    import onnxruntime as ort

    from anomaly.registry import create_model
    from anomaly.deploy.export import export_onnx

    torch.manual_seed(0)
    model = create_model("cyclegan", in_channels=1, image_size=32, generator="unet", base_channels=8,
                         disc_channels=8, segmenter=True, segmenter_channels=8).eval()
    scorer = Scorer(residual="l1_learned", smoothing_sigma=1.0, aggregate="topk", image_size=(32, 32))
    assert scorer.parts == ("l1", "learned")
    graph = ReconstructionScorer(model, scorer).eval()
    x, y = _pair(5, size=32)
    with pytest.raises(ValueError, match="set_mix_statistics"):
        graph(x)
    scorer.set_mix_statistics(torch.tensor([0.1, 0.5]), torch.tensor([0.02, 0.01]))
    with torch.no_grad():
        out = graph(y)
        x_hat = model(y)
        want = gaussian_blur((residual_map(y, x_hat, "l1") - 0.1) / 0.02 + (model.defect_map(y, x_hat) - 0.5) / 0.01, 1.0)
    torch.testing.assert_close(out.anomaly_map, want, rtol=1e-5, atol=1e-4)
    assert scorer.config()["mix"] == {"parts": ["l1", "learned"], "mean": pytest.approx([0.1, 0.5]),
                                      "std": pytest.approx([0.02, 0.01]), "weight": [1.0, 1.0]}
    export_onnx(graph, tmp_path / "m.onnx", x, conditional=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.cat([x, y, x])
    got = sess.run(None, {"image": batch.numpy()})
    with torch.no_grad():
        ref = graph(batch)
    # the map is in units of the parts' std (0.01 here): compare relative to its scale
    assert np.abs(got[0] - ref.anomaly_map.numpy()).max() < 1e-5 * float(ref.anomaly_map.abs().max()) + 1e-4
    assert np.abs(got[1] - ref.score.numpy()).max() < 1e-5 * float(ref.score.abs().max()) + 1e-4


def test_flip_averaged_map_is_the_mean_of_the_flipped_views_and_exports(tmp_path) -> None:
    """A reconstructor that is not flip-symmetric (its error grows left to right): the TTA map is
    the mean of the four views' maps flipped back, so it is symmetric under flips and differs from
    the plain map; the score aggregates that map; the ONNX graph matches torch on another batch size."""
    import onnxruntime as ort

    from anomaly.deploy.export import export_onnx

    class Lopsided(torch.nn.Module):
        def forward(self, x, cond=None):
            ramp = torch.linspace(0.0, 0.5, x.shape[-1])
            return (x * (1 - ramp) + 0.5 * ramp).clamp(0, 1)

    scorer = Scorer(residual="l1", smoothing_sigma=1.0, aggregate="topk", image_size=(32, 32))
    x = torch.rand(3, 1, 32, 32)
    plain = ReconstructionScorer(Lopsided(), scorer).eval()
    graph = scoring_graph(Lopsided(), scorer, "flips").eval()
    assert isinstance(graph, FlipAveraged) and isinstance(scoring_graph(Lopsided(), scorer), ReconstructionScorer)
    with torch.no_grad():
        out = graph(x)
        views = [plain(x).anomaly_map] + [plain(x.flip(d)).anomaly_map.flip(d) for d in ((-1,), (-2,), (-2, -1))]
        p = plain(x)
    expected = torch.stack(views).mean(0)
    assert torch.allclose(out.anomaly_map, expected, atol=1e-6)
    assert (out.anomaly_map - p.anomaly_map).abs().max() > 0.05  # the views differ: not a no-op
    assert torch.allclose(out.score, scorer.image_score(expected), atol=1e-6)
    assert torch.equal(out.reconstruction, p.reconstruction)
    with torch.no_grad():
        mirrored = graph(x.flip(-1))
    assert torch.allclose(mirrored.anomaly_map.flip(-1), out.anomaly_map, atol=1e-6)
    assert torch.allclose(mirrored.score, out.score, atol=1e-6)

    export_onnx(graph, tmp_path / "tta.onnx", x[:2], conditional=False)
    sess = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"])
    amap, score, recon = sess.run(None, {"image": x.numpy()})  # batch 3 != export batch 2
    assert np.abs(amap - out.anomaly_map.numpy()).max() < 1e-5
    assert np.abs(score - out.score.numpy()).max() < 1e-5 and recon.shape == (3, 1, 32, 32)
    with pytest.raises(ValueError, match="expected one of"):
        scoring_graph(Lopsided(), scorer, "d8")


# -- latent knn score ------------------------------------------------------------------------------

def test_encode_decode_is_the_eval_forward_of_every_encoder_decoder_model() -> None:
    """The knn graph reconstructs as ``decode(encode(x))`` (one encoder pass for code and image);
    for every registered model with both methods that must be exactly its eval ``forward``."""
    from anomaly.registry import get_spec, list_models
    from anomaly.scoring import encode_decode
    from anomaly.training.run import build_model

    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    checked = []
    for name in list_models():
        conditional = get_spec(name).conditional
        model = build_model(name, in_channels=1, image_size=32, num_classes=3 if conditional else 1).eval()
        cond = torch.tensor([0, 2, 1]) if conditional else None
        if not (hasattr(model, "encode") and hasattr(model, "decode")):
            with pytest.raises(ValueError, match="needs a model with encode"):
                encode_decode(model, x, cond)
            continue
        with torch.no_grad():
            z, x_hat = encode_decode(model, x, cond)
            assert z.shape[0] == 3 and torch.equal(x_hat, model(x, cond)), name
        checked.append(name)
    assert {"ae", "vae", "aae", "cond_aae", "cvae"} <= set(checked)


def test_latent_knn_distance_is_the_mean_of_the_k_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    bank, z = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    scorer = Scorer(latent="knn", latent_k=3, image_size=(8, 8))
    scorer.set_latent_bank(bank)
    d = np.linalg.norm(z.numpy()[:, None] - bank.numpy()[None], axis=2)
    expected = np.sort(d, axis=1)[:, :3].mean(1)
    np.testing.assert_allclose(scorer.latent_distance(z).numpy(), expected, rtol=1e-5)
    # a code in the bank is at distance 0 from itself: with k=1 its score is 0
    one = Scorer(latent="knn", latent_k=1, image_size=(8, 8))
    one.set_latent_bank(bank)
    assert one.latent_distance(bank[:4]).abs().max() < 1e-6

    # per class: an image is compared with its own class's codes only
    labels = torch.arange(40) % 2
    per_class = Scorer(latent="knn", latent_k=3, image_size=(8, 8))
    per_class.set_latent_bank(bank, labels)
    lab = torch.tensor([0, 1, 1, 0, 1])
    for i in range(5):
        own = d[i][(labels == lab[i]).numpy()]
        assert float(per_class.latent_distance(z[i:i + 1], lab[i:i + 1])) == pytest.approx(np.sort(own)[:3].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="pass the label"):
        per_class.latent_distance(z)


def test_latent_score_combines_standardised_parts_and_refuses_bad_setups() -> None:
    scorer = Scorer(latent="knn", latent_k=2, image_size=(8, 8))
    with pytest.raises(ValueError, match="set_latent_bank"):
        scorer.latent_distance(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="set_score_mix"):
        scorer.combine(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="at least latent_k=2"):
        scorer.set_latent_bank(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="per class"):
        scorer.set_latent_bank(torch.zeros(5, 4), torch.tensor([0, 0, 0, 0, 1]))  # class 1 has one code
    with pytest.raises(ValueError, match="unknown latent score 'pca'"):
        Scorer(latent="pca")
    scorer.set_score_mix(torch.tensor([1.0, 10.0]), torch.tensor([2.0, 5.0]))
    out = scorer.combine(torch.tensor([3.0, 5.0]), torch.tensor([10.0, 20.0]))
    np.testing.assert_allclose(out.numpy(), [(3 - 1) / 2 + 0.0, (5 - 1) / 2 + (20 - 10) / 5])  # [1, 4]
    cfg = Scorer(latent="none").config()
    assert cfg["latent"] == "none" and "score_mix" not in cfg


def test_latent_knn_graph_and_its_flip_tta_export_exactly(tmp_path) -> None:
    """The knn graph adds the distance of the code to the map's aggregate; its flip-TTA graph
    measures the un-flipped view's code; both match onnxruntime."""
    import onnxruntime as ort

    from anomaly.scoring import encode_decode
    from anomaly.deploy.export import export_onnx
    from anomaly.training.run import build_model

    torch.manual_seed(0)
    model = build_model("aae", in_channels=1, image_size=32, num_classes=1, latent_dim=8, base_channels=8).eval()
    g = torch.Generator().manual_seed(1)
    train, x = torch.rand(12, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    scorer = Scorer(residual="l1", smoothing_sigma=1.0, aggregate="max", image_size=(32, 32), latent="knn", latent_k=2)
    with torch.no_grad():
        scorer.set_latent_bank(model.encode(train))
    scorer.set_score_mix(torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.05]))
    plain_scorer = Scorer(residual="l1", smoothing_sigma=1.0, aggregate="max", image_size=(32, 32))
    for tta in ("none", "flips"):
        graph = scoring_graph(model, scorer, tta).eval()
        with torch.no_grad():
            ref = graph(x)
            z, _ = encode_decode(model, x)
            map_only = scoring_graph(model, plain_scorer, tta).eval()(x)
        expected = (map_only.score - 0.5) / 0.2 + (scorer.latent_distance(z) - 0.1) / 0.05
        torch.testing.assert_close(ref.score, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref.anomaly_map, map_only.anomaly_map)
        path = tmp_path / f"knn_{tta}.onnx"
        export_onnx(graph, path, x[:2], False, 18)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
        np.testing.assert_allclose(out[1], ref.score.numpy(), rtol=1e-4, atol=1e-4)


def test_line_kernels_have_unit_norm_and_cover_the_orientations() -> None:
    from anomaly.scoring import LINE_ORIENTATIONS, line_kernels

    k = line_kernels(15)
    assert k.shape == (LINE_ORIENTATIONS, 1, 15, 15)
    np.testing.assert_allclose(k.square().sum((1, 2, 3)).numpy(), 1.0, rtol=1e-5)
    assert float(k[0, 0, 7].sum()) == pytest.approx(15 ** 0.5, rel=1e-3)  # horizontal: one row of 15 ones, normed
    np.testing.assert_allclose(k[4, 0].numpy(), k[0, 0].T.numpy(), atol=1e-6)  # 90 degrees is the transpose
    with pytest.raises(ValueError, match=">= 2"):
        line_kernels(1)


def test_line_part_lifts_a_faint_thin_line_above_the_noise_where_pixels_do_not() -> None:
    """A 1 px line at one noise sigma, 90 px long, at an angle between two filter orientations: the
    line part's peak on it exceeds the peak of the same noise without the line, by far more than
    the raw residual's peak does."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1, 1, 128, 128, generator=g)
    line = torch.zeros_like(r)
    for t in range(20, 110):
        line[0, 0, t, 30 + int(t * 0.4)] = 1.0
    sc = Scorer(residual="l1", image_size=(128, 128), line_length=15)
    gain_line = float(sc.line_response(r + line).max() - sc.line_response(r).max())
    gain_pixel = float((r + line).max() - r.max())
    assert gain_line > 0.5 and gain_line > 5 * max(gain_pixel, 0.0)
    with pytest.raises(ValueError, match="longer than the model input"):
        Scorer(residual="l1", image_size=(16, 16), line_length=31)
    with pytest.raises(ValueError, match="line_length"):
        Scorer(residual="l1", image_size=(64, 64), line_length=-3)


def test_line_part_exports_exactly(tmp_path) -> None:
    x, y = _pair()
    sc = Scorer(residual="l1", image_size=(64, 64), line_length=9, smoothing_sigma=1.0)
    sc.set_mix_statistics(torch.tensor([0.1, 0.2]), torch.tensor([0.05, 0.1]))
    assert sc.parts == ("l1", "line") and sc.config()["line_length"] == 9
    graph = ReconstructionScorer(_Identityish(), sc).eval()
    ort_out, ref = _onnx_vs_torch(graph, x, y, tmp_path)
    np.testing.assert_allclose(ort_out[0], ref.anomaly_map.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ort_out[1], ref.score.numpy(), rtol=1e-4, atol=1e-5)
