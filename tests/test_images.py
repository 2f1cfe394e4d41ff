from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from atlas.images import MAX_PIXELS, ImageDataset, list_images, load_rgb, to_model_input
from atlas.stages.collect import collect
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


def test_no_pixel_bound_is_a_users_choice_not_a_crash(tmp_path):
    """Image.MAX_IMAGE_PIXELS = None before atlas is imported makes the default bound None: no bound, no TypeError."""
    path = blank_png(tmp_path / "small.png", 30, 20)
    assert load_rgb(path, max_pixels=None).size == (30, 20)


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


def test_the_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with orientation 6 (rotate 90 degrees clockwise to view) loads upright."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white as stored: the top half once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = np.asarray(load_rgb(tmp_path / "phone.jpg"))
    assert loaded.shape == (40, 20, 3)
    assert loaded[:18].mean() > 240 and loaded[22:].mean() < 15


@pytest.mark.parametrize("size", [(200, 100), (100, 200)])
def test_the_centre_crop_stays_inside_a_landscape_or_portrait_photo(size):
    tensor = to_model_input(Image.new("RGB", size, (255, 255, 255)), 50, 50)
    assert tensor.shape == (3, 50, 50) and tensor.min() == 1.0  # no black rows or columns from outside the photo


def test_class_sub_folders_are_labelled_by_the_class_they_name_in_any_spelling(tmp_path):
    names = ["tench", "great white shark", "three-toed sloth"]  # no folder's sorted position is its class
    for folder in ("three_toed_sloth", "Great-White-Shark", "unnamed"):
        (tmp_path / folder).mkdir()
        blank_png(tmp_path / folder / "a.png", 8, 8)
    labels = {Path(r.path).parent.name: r.label for r in list_images(str(tmp_path), names)}
    assert labels == {"three_toed_sloth": 2, "Great-White-Shark": 1, "unnamed": 2}  # unnamed: its sorted position
