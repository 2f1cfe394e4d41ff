from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from atlas.collect import collect
from atlas.images import MAX_PIXELS, ImageDataset, list_images, load_rgb, to_model_input
from tests.synthetic import blank_png, tiny_classifier


def smooth_photo(width: int, height: int) -> Image.Image:
    """A photo-like picture: smooth colour gradients and a few edges, seeded."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 3, (3, 3))]
    picture = (np.stack(channels, axis=-1) * 0.4 + 0.5) * 255
    picture[height // 3 : height // 2, width // 4 : width // 2] = (200, 40, 40)
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8))


def test_a_200_megapixel_png_is_skipped_from_its_header_and_listed(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    bomb = blank_png(folder / "bomb.png", 20000, 10000)
    assert bomb.stat().st_size < 100_000  # a few kilobytes that declare 200 Mpx
    smooth_photo(48, 40).save(folder / "fine.png")
    records = list_images(folder)
    row, tensor, reason = ImageDataset(records, 36, 32)[0]
    assert tensor is None and reason.startswith("DecompressionBombError")
    out = collect(tiny_classifier(), records, tmp_path / "s.h5", workers=0)
    with h5py.File(out) as f:
        assert [s.split(":")[0] for s in f["images/skipped"].asstr()[:]] == [str(bomb)]
        assert list(f["relu3/image_index"][:]) == [1]


def test_an_image_over_the_bound_but_under_pillows_error_is_refused_before_decoding(tmp_path):
    # 100 Mpx: Pillow only warns (its error starts at twice its bound), and load_rgb silences warnings
    path = blank_png(tmp_path / "big.png", 10000, 10000)
    assert MAX_PIXELS < 10000 * 10000 < 2 * MAX_PIXELS
    with pytest.raises(Image.DecompressionBombError, match="over the bound"):
        load_rgb(path)


def test_a_large_jpeg_decodes_at_reduced_size_to_the_same_crop(tmp_path):
    photo = smooth_photo(2000, 1500)
    photo.save(tmp_path / "photo.jpg", quality=95)
    photo.save(tmp_path / "photo.png")
    drafted = load_rgb(tmp_path / "photo.jpg", min_side=160)
    assert drafted.size == (250, 188)  # 1/8 scale, the smallest JPEG scale whose short side is >= 160
    full = load_rgb(tmp_path / "photo.png", min_side=160)
    assert full.size == (2000, 1500)  # draft is for JPEGs only
    crop_drafted, crop_full = (to_model_input(image, 160, 128) for image in (drafted, full))
    difference = (crop_drafted - crop_full).abs()
    assert float(difference.mean()) < 0.01 and float(difference.max()) < 0.1  # JPEG noise, not another crop
    assert not torch.equal(crop_drafted, crop_full)


def test_the_bound_counts_the_pixels_a_jpeg_decodes_to(tmp_path):
    photo = smooth_photo(2000, 1000)
    photo.save(tmp_path / "wide.jpg")
    photo.save(tmp_path / "wide.png")
    assert load_rgb(tmp_path / "wide.jpg", min_side=128, max_pixels=1_000_000).size == (500, 250)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(tmp_path / "wide.jpg", max_pixels=1_000_000)  # no draft asked: decoded in full
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(tmp_path / "wide.png", min_side=128, max_pixels=1_000_000)
