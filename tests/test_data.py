"""Image decoding, the shared preprocessing, and the dataset layouts."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.data.folder import DatasetError, ImageDataset, discover
from anomaly.data.io import ImageReadError, read_image, write_image
from anomaly.data.preprocess import Preprocess


def test_read_image_modes(tmp_path: Path) -> None:
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    bgra = np.dstack([bgr, np.full((10, 12), 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    g16 = np.full((5, 5), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), g16)

    g = read_image(tmp_path / "g.png")
    assert g.shape == (48, 64) and g.dtype == np.float32
    assert g[0, 1] == pytest.approx(1 / 255)
    c = read_image(tmp_path / "c.png")
    assert c.shape == (10, 12, 3) and c[0, 0, 2] == 1.0 and c[0, 0, 0] == 0.0  # returned as RGB
    a = read_image(tmp_path / "a.png")
    assert a.shape == (10, 12, 4) and a[0, 0, 3] == pytest.approx(128 / 255)
    d = read_image(tmp_path / "d.png")
    assert d.max() == 1.0  # 16-bit scaled by 65535, not 255

    # raw=True keeps the pixel type (what the runtime decodes), same channel order, and gives the
    # model exactly the same input as the float decode
    raw = {n: read_image(tmp_path / n, raw=True) for n in ("g.png", "c.png", "a.png", "d.png")}
    assert [raw[n].dtype for n in raw] == [np.uint8, np.uint8, np.uint8, np.uint16]
    assert raw["c.png"][0, 0, 2] == 255 and raw["c.png"][0, 0, 0] == 0 and raw["a.png"].shape == (10, 12, 4)
    for n in raw:
        for channels in (1, 3):
            pre = Preprocess(image_size=8, channels=channels)
            np.testing.assert_array_equal(pre(raw[n]), pre(read_image(tmp_path / n)))


def test_write_image_channel_order_and_jpeg_quality(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255  # red
    write_image(tmp_path / "rgb.png", rgb)
    write_image(tmp_path / "bgr.png", rgb[..., ::-1].copy(), bgr=True)  # the same red, given in BGR order
    for name in ("rgb.png", "bgr.png"):
        assert tuple(read_image(tmp_path / name, raw=True)[0, 0]) == (255, 0, 0)
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_image(tmp_path / "q95.jpg", noisy, quality=95)
    write_image(tmp_path / "q50.jpg", noisy, quality=50)
    assert (tmp_path / "q50.jpg").stat().st_size < 0.7 * (tmp_path / "q95.jpg").stat().st_size
    write_image(tmp_path / "q.png", noisy, quality=10)  # PNG is lossless: quality does not apply
    np.testing.assert_array_equal(read_image(tmp_path / "q.png", raw=True), noisy)
    with pytest.raises(ValueError, match="quality"):
        write_image(tmp_path / "bad.jpg", noisy, quality=0)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n truncated"])
def test_unreadable_images_raise_with_path(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(p)


def test_missing_image_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_preprocess_shapes_and_colour_conversion() -> None:
    rgb = np.random.default_rng(0).random((300, 200, 3)).astype(np.float32)
    x1 = Preprocess(image_size=64, channels=1)(rgb)
    x3 = Preprocess(image_size=64, channels=3)(rgb)
    assert x1.shape == (1, 64, 64) and x3.shape == (3, 64, 64)
    assert x1.dtype == np.float32 and 0.0 <= x1.min() and x1.max() <= 1.0
    gray8 = np.full((20, 20), 255, np.uint8)
    assert Preprocess(image_size=32, channels=3)(gray8).min() == pytest.approx(1.0)  # upscaled, repeated, scaled
    with pytest.raises(ValueError, match="channels"):
        Preprocess(channels=2)


def test_preprocess_antialiases_when_shrinking() -> None:
    # a 1-pixel checkerboard must average to grey, not alias into stripes
    board = (np.indices((256, 256)).sum(0) % 2).astype(np.float32)
    x = Preprocess(image_size=32, channels=1)(board)
    assert np.allclose(x, 0.5, atol=0.01)


@pytest.mark.parametrize("shape", [(300, 300), (40, 50, 3), (300, 200, 4), (64, 64, 1), (31, 90, 3)])
@pytest.mark.parametrize("channels", [1, 3])
def test_preprocess_uint8_is_bitwise_the_divide_by_255_definition(shape: tuple[int, ...], channels: int) -> None:
    # the uint8 path uses a lookup table for speed; models trained before it saw x / 255 computed by
    # division, so the table must give the same bits (any drift would break retraining reproducibility)
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    pre = Preprocess(image_size=64, channels=channels)
    assert np.array_equal(pre(img), pre(img.astype(np.float32) / 255.0))
    assert np.array_equal(pre(img[:, ::2]), pre(img[:, ::2].astype(np.float32) / 255.0))  # a strided view


def test_preprocess_leaves_its_input_alone() -> None:
    # the output is clipped in place: that must never reach the caller's array (same-size float input)
    img = np.linspace(-0.5, 1.5, 64 * 64, dtype=np.float32).reshape(64, 64)
    before = img.copy()
    x = Preprocess(image_size=64, channels=1)(img)
    assert np.array_equal(img, before) and x.min() == 0.0 and x.max() == 1.0


def test_discover_mvtec(mvtec_dir: Path) -> None:
    layout = discover(mvtec_dir)
    assert layout.kind == "mvtec"
    assert len(layout.train) == 12 and all(s.label == 0 for s in layout.train)
    bad = [s for s in layout.test if s.label == 1]
    good = [s for s in layout.test if s.label == 0]
    assert len(bad) == 4 and len(good) == 4
    assert all(s.mask is not None and s.mask.is_file() for s in bad)
    assert all(s.mask is None for s in good)
    ds = ImageDataset(layout.test, Preprocess(image_size=32), with_masks=True)
    item = ds[[s.label for s in layout.test].index(1)]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert set(np.unique(item["mask"])) <= {0.0, 1.0} and item["mask"].sum() > 0


def test_discover_plain_folder(plain_dir: Path) -> None:
    layout = discover(plain_dir)
    assert layout.kind == "folder" and len(layout.train) == 8 and not layout.test


def test_discover_several_categories(tmp_path: Path) -> None:
    from conftest import make_mvtec

    make_mvtec(tmp_path / "a", n_train=3)
    make_mvtec(tmp_path / "b", n_train=5)
    layout = discover(tmp_path)
    assert layout.kind == "multi" and layout.categories == ["a", "b"]
    assert sorted({s.category for s in layout.train}) == [0, 1] and len(layout.train) == 8


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        discover(tmp_path / "missing")
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        discover(tmp_path / "empty")
