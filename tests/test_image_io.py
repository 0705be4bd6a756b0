"""Tests for ldm.files.image_output: original txt2img pixel arithmetic, grid, watermark and safe file writing."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

import ldm.files.image_output as image_io
from ldm.files.image_output import (
    GRID_PATTERN,
    SAMPLE_PATTERN,
    OutputWriter,
    Watermarker,
    grid_to_uint8,
    make_grid,
    next_index,
    to_uint8_images,
    unit_to_uint8,
    watermark_supported,
)

from .conftest import ORACLE


def natural_image(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """A smooth gray gradient plus per-channel noise: something dwtDct can carry a watermark in."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 80.0 + 96.0 * (yy / max(h - 1, 1) + xx / max(w - 1, 1)) / 2.0
    img = base[..., None] + rng.normal(0.0, 4.0, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def original_put_watermark(rgb: np.ndarray, text: str = "StableDiffusionV1") -> np.ndarray:
    """The original txt2img's put_watermark, verbatim in behaviour (cv2 colour conversion)."""
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    img = Image.fromarray(rgb)
    bgr = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR)
    bgr = encoder.encode(bgr, "dwtDct")
    img = Image.fromarray(bgr[:, :, ::-1])
    return np.array(img)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


# ------------------------------------------------------------------------------------------
# pixel arithmetic


def test_uint8_truncates_not_rounds() -> None:
    # 254.99 / 255 in float32: 255 * that is just below 255 -> truncates to 254.
    unit = np.float32(254.99 / 255.0)
    decoded = float(unit) * 2.0 - 1.0
    x = torch.full((1, 3, 2, 2), decoded, dtype=torch.float32)
    out = to_uint8_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)
    assert np.all(out == 254)
    # 0.5 -> 127.5 -> 127 (rounding would give 128); out of range values clamp.
    x = torch.tensor([0.0, -1.0, 1.0, -3.0, 3.0, 0.999], dtype=torch.float32).reshape(1, 1, 2, 3)
    assert to_uint8_images(x).ravel().tolist() == [127, 0, 255, 0, 255, 254]


def test_to_uint8_matches_original_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 17, 23) * 1.3
    # the original: clamp in torch, .cpu().permute().numpy(), then per image 255. * x, astype.
    samples = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    samples = samples.cpu().permute(0, 2, 3, 1).numpy()
    expected = np.stack([(255.0 * s).astype(np.uint8) for s in samples])
    got = to_uint8_images(x)
    assert got.shape == (3, 17, 23, 3)
    np.testing.assert_array_equal(got, expected)


def test_to_uint8_keeps_half_precision_arithmetic() -> None:
    # Under autocast the original's decoded tensor (and so its numpy multiply) was float16.
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 8, 8) * 1.2).half()
    samples = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).cpu().permute(0, 2, 3, 1).numpy()
    assert samples.dtype == np.float16
    expected = np.stack([(255.0 * s).astype(np.uint8) for s in samples])
    np.testing.assert_array_equal(to_uint8_images(x), expected)


def test_grid_to_uint8_matches_original() -> None:
    torch.manual_seed(2)
    grid = torch.rand(3, 10, 12)
    expected = (255.0 * grid.permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
    np.testing.assert_array_equal(grid_to_uint8(grid), expected)
    np.testing.assert_array_equal(grid_to_uint8(grid.numpy()), expected)
    np.testing.assert_array_equal(unit_to_uint8(grid), (255.0 * grid.numpy()).astype(np.uint8))


# ------------------------------------------------------------------------------------------
# grid


@pytest.mark.parametrize(
    ("n", "nrow"),
    [(1, 1), (1, 4), (2, 1), (2, 2), (3, 2), (4, 2), (5, 3), (6, 8), (7, 3), (8, 8), (9, 4), (3, 100)],
)
def test_make_grid_equals_torchvision(n: int, nrow: int) -> None:
    tv_make_grid = pytest.importorskip("torchvision.utils").make_grid
    torch.manual_seed(n * 31 + nrow)
    x = torch.rand(n, 3, 6, 9)
    expected = tv_make_grid(x, nrow=nrow)
    got = make_grid(x, nrow=nrow)
    assert isinstance(got, torch.Tensor)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected)
    got_np = make_grid(x.numpy(), nrow=nrow)
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_array_equal(got_np, expected.numpy())


@pytest.mark.parametrize(
    ("shape", "nrow", "padding", "pad_value"),
    [
        ((5, 3, 4, 4), 2, 0, 0.0),
        ((5, 3, 4, 7), 2, 5, 0.5),
        ((4, 1, 5, 5), 3, 2, 1.0),  # 1 channel -> 3 channels
        ((1, 1, 5, 5), 3, 2, 0.0),
        ((3, 4, 5, 6), 2, 1, 0.25),  # 4 channels stay 4
        ((3, 5, 5), 8, 2, 0.0),  # a single CHW image
        ((1, 5, 5), 8, 2, 0.0),  # a single 1-channel CHW image
        ((5, 5), 8, 2, 0.0),  # a single HW image
    ],
)
def test_make_grid_equals_torchvision_options(shape, nrow, padding, pad_value) -> None:
    tv_make_grid = pytest.importorskip("torchvision.utils").make_grid
    torch.manual_seed(sum(shape))
    x = torch.rand(*shape)
    expected = tv_make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value)
    assert torch.equal(make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value), expected)
    np.testing.assert_array_equal(
        make_grid(x.numpy(), nrow=nrow, padding=padding, pad_value=pad_value), expected.numpy()
    )


def test_make_grid_list_input_and_errors() -> None:
    tv_make_grid = pytest.importorskip("torchvision.utils").make_grid
    imgs = [torch.rand(3, 4, 4) for _ in range(3)]
    assert torch.equal(make_grid(imgs, nrow=2), tv_make_grid(imgs, nrow=2))
    with pytest.raises(ValueError):
        make_grid(torch.rand(2, 3, 4, 4), nrow=0)
    with pytest.raises(ValueError):
        make_grid(torch.rand(0, 3, 4, 4), nrow=2)


def test_full_grid_pipeline_matches_original() -> None:
    tv_make_grid = pytest.importorskip("torchvision.utils").make_grid
    torch.manual_seed(3)
    # two iterations of a batch of 3, as txt2img stacks them: (n b) c h w
    batches = [torch.clamp((torch.randn(3, 3, 8, 8) + 1.0) / 2.0, 0.0, 1.0) for _ in range(2)]
    stacked = torch.stack(batches, 0).reshape(6, 3, 8, 8)
    original = (255.0 * tv_make_grid(stacked, nrow=3).permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
    np.testing.assert_array_equal(grid_to_uint8(make_grid(stacked, nrow=3)), original)


# ------------------------------------------------------------------------------------------
# watermark


def test_watermark_decodes_back() -> None:
    img = natural_image()
    out = Watermarker().apply(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    bgr = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
    assert WatermarkDecoder("bytes", 136).decode(bgr, "dwtDct") == b"StableDiffusionV1"


@pytest.mark.parametrize(("h", "w"), [(256, 256), (264, 320), (128, 512)])
def test_watermark_bit_identical_to_original(h: int, w: int) -> None:
    img = natural_image(h, w, seed=h + w)
    before = img.copy()
    np.testing.assert_array_equal(Watermarker().apply(img), original_put_watermark(img))
    np.testing.assert_array_equal(img, before)  # input untouched


def test_numpy_channel_flip_equals_cv2() -> None:
    img = natural_image(32, 48)
    np.testing.assert_array_equal(np.ascontiguousarray(img[:, :, ::-1]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def test_small_image_skips_watermark_with_one_warning() -> None:
    img = natural_image(128, 128)
    wm = Watermarker()
    with pytest.warns(UserWarning, match="256x256") as record:
        out = wm.apply(img)
        out2 = wm.apply(natural_image(255, 256))
    assert len([r for r in record if "256x256" in str(r.message)]) == 1
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(out2, natural_image(255, 256))
    # and the library really refuses these sizes, as watermark_supported says
    for h, w in [(128, 128), (255, 256), (256, 255)]:
        assert not watermark_supported(h, w)
        with pytest.raises(RuntimeError, match="too small"):
            original_put_watermark(natural_image(h, w))
    assert watermark_supported(256, 256) and watermark_supported(128, 512)
    assert not watermark_supported(2, 65536)


# ------------------------------------------------------------------------------------------
# numbering and safe writing


def _touch(path: Path, data: bytes = b"old") -> None:
    path.write_bytes(data)


def test_next_index_patterns(tmp_path: Path) -> None:
    assert next_index(tmp_path, SAMPLE_PATTERN) == 0
    assert next_index(tmp_path / "missing", SAMPLE_PATTERN) == 0
    for name in ["00000.png", "00001.png", "00002.png", "grid-0004.png", "notes.txt", ".tmp-x.png.part", "7.png"]:
        _touch(tmp_path / name)
    assert next_index(tmp_path, SAMPLE_PATTERN) == 3
    assert next_index(tmp_path, GRID_PATTERN) == 5
    _touch(tmp_path / "100000.png")
    assert next_index(tmp_path, SAMPLE_PATTERN) == 100001


def test_numbering_after_deleted_gap(tmp_path: Path) -> None:
    writer = OutputWriter(tmp_path, watermark=None)
    for i in range(4):
        _touch(writer.sample_dir / f"{i:05d}.png")
    (writer.sample_dir / "00001.png").unlink()  # the original would now reuse 00003
    (writer.sample_dir / "00003.png").unlink()
    path = writer.save_sample(natural_image(8, 8))
    assert path == writer.sample_dir / "00003.png"
    assert writer.save_sample(natural_image(8, 8)).name == "00004.png"
    assert (writer.sample_dir / "00000.png").read_bytes() == b"old"


def test_numbering_continues_after_highest(tmp_path: Path) -> None:
    writer = OutputWriter(tmp_path, watermark=None)
    _touch(writer.sample_dir / "00007.png")
    assert writer.save_sample(natural_image(8, 8)).name == "00008.png"
    # grids count only grid files in outdir (the samples dir is not a grid)
    assert writer.save_grid(natural_image(8, 8)) == tmp_path / "grid-0000.png"
    assert writer.save_grid(natural_image(8, 8)).name == "grid-0001.png"


def test_saved_pixels_and_layout(tmp_path: Path) -> None:
    writer = OutputWriter(tmp_path / "out", watermark=None)
    img = natural_image(16, 24)
    path = writer.save_sample(img)
    assert path == tmp_path / "out" / "samples" / "00000.png"
    np.testing.assert_array_equal(read_rgb(path), img)
    assert sorted(os.listdir(writer.sample_dir)) == ["00000.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["samples"]


@pytest.mark.parametrize("links", [True, False])
def test_never_overwrites_on_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool) -> None:
    if not links:

        def no_link(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(image_io.os, "link", no_link)
    writer = OutputWriter(tmp_path, watermark=None)
    real_next_index = image_io.next_index
    calls = []

    def racing_next_index(directory, pattern):
        idx = real_next_index(directory, pattern)
        if not calls:  # another process grabs the number between our listing and publish
            _touch(Path(directory) / f"{idx:05d}.png", b"someone else's image")
        calls.append(idx)
        return idx

    monkeypatch.setattr(image_io, "next_index", racing_next_index)
    img = natural_image(8, 8)
    path = writer.save_sample(img)
    assert path.name == "00001.png"
    assert (writer.sample_dir / "00000.png").read_bytes() == b"someone else's image"
    np.testing.assert_array_equal(read_rgb(path), img)
    assert sorted(os.listdir(writer.sample_dir)) == ["00000.png", "00001.png"]


@pytest.mark.parametrize("exc", [OSError("disk on fire"), KeyboardInterrupt()])
def test_failed_encode_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    writer = OutputWriter(tmp_path, watermark=None)
    _touch(writer.sample_dir / "00000.png")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half a file")
        raise exc

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(type(exc)):
        writer.save_sample(natural_image(8, 8))
    with pytest.raises(type(exc)):
        writer.save_grid(natural_image(8, 8))
    assert sorted(os.listdir(writer.sample_dir)) == ["00000.png"]
    assert sorted(os.listdir(tmp_path)) == ["samples"]
    assert (writer.sample_dir / "00000.png").read_bytes() == b"old"


def test_interrupt_in_fallback_publish_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src, dst):
        raise OSError(95, "Operation not supported")

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_io.os, "link", no_link)
    monkeypatch.setattr(image_io.os, "replace", interrupted_replace)
    writer = OutputWriter(tmp_path, watermark=None)
    with pytest.raises(KeyboardInterrupt):
        writer.save_sample(natural_image(8, 8))
    assert os.listdir(writer.sample_dir) == []


def test_watermark_applied_when_saving(tmp_path: Path) -> None:
    img = natural_image()
    writer = OutputWriter(tmp_path, watermark=Watermarker())
    np.testing.assert_array_equal(read_rgb(writer.save_sample(img)), original_put_watermark(img))
    np.testing.assert_array_equal(read_rgb(writer.save_grid(img)), original_put_watermark(img))


def test_small_image_saved_without_watermark(tmp_path: Path) -> None:
    img = natural_image(64, 64)
    writer = OutputWriter(tmp_path, watermark=Watermarker())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        path = writer.save_sample(img)
        writer.save_sample(img)
    assert len(record) == 1
    np.testing.assert_array_equal(read_rgb(path), img)


def test_png_text_chunk_round_trip(tmp_path: Path) -> None:
    meta = {"parameters": "a photograph of an astronaut riding a horse\nSteps: 50, Seed: 42", "note": "Zürich ✓"}
    writer = OutputWriter(tmp_path, watermark=None, metadata=meta)
    img = natural_image(8, 8)
    path = writer.save_sample(img)
    with Image.open(path) as im:
        assert im.text == meta
        np.testing.assert_array_equal(np.array(im), img)
    # no metadata -> no text chunks
    plain = OutputWriter(tmp_path / "plain", watermark=None).save_sample(img)
    with Image.open(plain) as im:
        assert im.text == {}


# ------------------------------------------------------------------------------------------
# reference PNGs made by the original CompVis txt2img


def _need_oracle() -> None:
    assert (ORACLE / "decoded0.npy").exists(), f"reference data missing under {ORACLE}"


def test_reference_uint8_conversion() -> None:
    _need_oracle()
    decoded = np.load(ORACLE / "decoded0.npy")
    # decoded0 is one sample's decoder output BEFORE the clamp, cropped to its top-left 64x64
    # (the PNG is 256x256): values run outside [-1, 1].
    assert decoded.shape == (3, 64, 64) and decoded.dtype == np.float32
    assert decoded.min() < -1.0 and decoded.max() > 1.0
    ours = to_uint8_images(torch.from_numpy(decoded)[None])[0]
    nowm = read_rgb(ORACLE / "nowm" / "samples" / "00000.png")
    assert nowm.shape == (256, 256, 3)
    np.testing.assert_array_equal(ours, nowm[:64, :64])


def test_reference_watermark() -> None:
    _need_oracle()
    nowm = read_rgb(ORACLE / "nowm" / "samples" / "00000.png")
    watermarked = read_rgb(ORACLE / "txt2img" / "samples" / "00000.png")
    np.testing.assert_array_equal(Watermarker().apply(nowm), watermarked)


def test_reference_png_bytes(tmp_path: Path) -> None:
    _need_oracle()
    for sub, wm in [("nowm", None), ("txt2img", Watermarker())]:
        ref_path = ORACLE / sub / "samples" / "00000.png"
        ref_bytes = ref_path.read_bytes()
        buf = io.BytesIO()
        Image.fromarray(read_rgb(ref_path)).save(buf, format="PNG")
        if buf.getvalue() != ref_bytes:
            pytest.skip("this Pillow/zlib encodes PNGs differently from the one that made the reference")
        nowm = read_rgb(ORACLE / "nowm" / "samples" / "00000.png")
        path = OutputWriter(tmp_path / sub, watermark=wm).save_sample(nowm)
        assert path.read_bytes() == ref_bytes
