"""Property-based tests (hypothesis) of the pipeline's pure functions, on drawn shapes that are rarely symmetric:
positions, grid cells and their nesting, top classes, layout normalisation, icon scaling, transforms (direction and
range), image decoding across PIL's modes and label placement. Each property names what it guards."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from atlas.canvas import density_scale
from atlas.images import load_rgb, to_model_input
from atlas.optvis.transform import ImageRandom, jitter, pad
from atlas.stages.collect import sample_positions
from atlas.stages.compose import Grid, draw_labels
from atlas.stages.grid import _coarsen, cell_ids, top_classes
from atlas.stages.project import normalize_layout

FAST = settings(max_examples=60, deadline=None)
UNIT = st.floats(0.0, 1.0, allow_nan=False, width=32)


def _layout(rows: int) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, (rows, 2), elements=UNIT)


@FAST
@given(
    height=st.integers(3, 24),
    width=st.integers(3, 24),
    count=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    row=st.integers(0, 10**6),
)
def test_positions_are_distinct_interior_reproducible_and_a_prefix_of_any_longer_draw(height, width, count, seed, row):
    """A sample's position is in the interior, never repeated within an image, and the k-th sample does not depend
    on how many are drawn (so a run with more positions per image keeps the first ones)."""
    drawn = sample_positions(row, "layer", height, width, count, seed)
    interior = (height - 2) * (width - 2)
    assert drawn.shape == (min(count, interior), 2)
    assert (drawn[:, 0] >= 1).all() and (drawn[:, 0] <= height - 2).all()
    assert (drawn[:, 1] >= 1).all() and (drawn[:, 1] <= width - 2).all()
    assert len({tuple(p) for p in drawn}) == len(drawn)
    np.testing.assert_array_equal(drawn, sample_positions(row, "other", height, width, count, seed))
    if count < interior:
        longer = sample_positions(row, "layer", height, width, min(interior - 1, count + 7), seed)
        np.testing.assert_array_equal(longer[:count], drawn)


@FAST
@given(layout=_layout(30), size=st.integers(1, 17))
def test_a_cell_id_takes_its_column_from_x_and_its_row_from_y(layout, size):
    cells = cell_ids(layout, size)
    columns = np.minimum(np.floor(layout[:, 0].astype(np.float64) * size), size - 1)
    rows = np.minimum(np.floor(layout[:, 1].astype(np.float64) * size), size - 1)
    np.testing.assert_array_equal(cells % size, columns)
    np.testing.assert_array_equal(cells // size, rows)


@FAST
@given(layout=_layout(40), coarse=st.integers(1, 6), factor=st.integers(1, 4), channels=st.integers(1, 3))
def test_coarsened_cell_sums_are_the_sums_of_the_samples_in_each_coarse_cell(layout, coarse, factor, channels):
    fine = coarse * factor
    values = np.arange(len(layout) * channels, dtype=np.float64).reshape(len(layout), channels) % 7 + 1
    fine_sums = np.zeros((fine * fine, channels))
    np.add.at(fine_sums, cell_ids(layout, fine), values)
    coarse_sums = np.zeros((coarse * coarse, channels))
    np.add.at(coarse_sums, cell_ids(layout, coarse), values)
    np.testing.assert_allclose(_coarsen(fine_sums, fine, coarse), coarse_sums)


@FAST
@given(
    values=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 5), st.integers(1, 30)), elements=st.floats(-9, 9, width=32)
    ),
    top=st.integers(1, 12),
)
def test_top_classes_are_each_rows_largest_values_largest_first(values, top):
    chosen, chosen_values = top_classes(values, top)
    k = min(top, values.shape[1])
    assert chosen.shape == chosen_values.shape == (len(values), k)
    np.testing.assert_array_equal(np.take_along_axis(values, chosen, 1), chosen_values)
    np.testing.assert_array_equal(chosen_values, -np.sort(-values, axis=1)[:, :k])
    assert all(len(set(row)) == k for row in chosen)


@FAST
@given(
    # millesimal values: a shift of a denormal's size is lost in float64 whatever the code does
    layout=hnp.arrays(np.float64, (25, 2), elements=st.integers(-50_000, 50_000).map(lambda v: v / 1000)),
    scale=st.tuples(st.floats(0.1, 10), st.floats(0.1, 10)),
    shift=st.tuples(st.floats(-5, 5), st.floats(-5, 5)),
)
def test_normalized_layouts_lie_in_the_unit_square_keep_each_axis_order_and_ignore_scale(layout, scale, shift):
    out = normalize_layout(layout)
    assert out.dtype == np.float32 and out.shape == layout.shape
    assert (out >= 0).all() and (out <= 1).all()
    for axis in range(2):
        order = np.argsort(layout[:, axis], kind="stable")
        assert (np.diff(out[order, axis]) >= 0).all()  # x stays x and y stays y, neither flips
        if np.ptp(layout[:, axis]) == 0:
            assert (out[:, axis] == 0.5).all()
    moved = normalize_layout(layout * np.array(scale) + np.array(shift))
    np.testing.assert_allclose(moved, out, atol=1e-4)


@FAST
@given(
    count=hnp.arrays(np.int64, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 50)),
    min_count=st.integers(1, 5),
)
def test_icon_scale_is_zero_below_the_minimum_count_and_grows_with_the_count_up_to_one(count, min_count):
    scale = density_scale(count, min_count)
    assert (scale >= 0).all() and (scale <= 1).all()
    assert (scale[count < min_count] == 0).all()
    drawn = count >= min_count
    order = np.argsort(count[drawn], kind="stable")
    assert (np.diff(scale[drawn][order]) >= 0).all()
    assert (scale[drawn] > 0).all()


@FAST
@given(
    height=st.integers(4, 20),
    width=st.integers(4, 20),
    d=st.integers(0, 3),
    key=st.integers(0, 2**31),
    images=st.integers(1, 3),
)
def test_jitter_crops_each_image_at_its_own_offset_within_d(height, width, d, key, images):
    """Each output is the input's (h - d) x (w - d) window at an offset in [0, d] on each axis, unmirrored."""
    batch = torch.arange(images * 2 * height * width, dtype=torch.float32).view(images, 2, height, width)
    out = jitter(d)(batch, ImageRandom([key + i for i in range(images)]))
    assert out.shape == (images, 2, height - d, width - d)
    for image, window in zip(batch, out, strict=True):
        first = int(window[0, 0, 0])
        top, left = divmod(first - int(image[0, 0, 0]), width)
        assert 0 <= top <= d and 0 <= left <= d
        torch.testing.assert_close(window, image[:, top : top + height - d, left : left + width - d])


@FAST
@given(height=st.integers(1, 12), width=st.integers(1, 12), border=st.integers(0, 4), value=st.floats(0, 1))
def test_pad_keeps_the_image_in_the_middle_and_fills_the_border(height, width, border, value):
    images = torch.rand(2, 3, height, width)
    out = pad(border, value=value)(images, ImageRandom([0, 1]))
    assert out.shape == (2, 3, height + 2 * border, width + 2 * border)
    torch.testing.assert_close(out[:, :, border : border + height, border : border + width], images)
    ring = torch.ones_like(out, dtype=torch.bool)
    ring[:, :, border : border + height, border : border + width] = False
    assert torch.allclose(out[ring], torch.tensor(value, dtype=out.dtype))


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"]


def _gradient(mode: str, width: int, height: int) -> Image.Image:
    """A left-dark, right-bright grey ramp in `mode`."""
    ramp = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    grey = Image.fromarray(ramp)
    if mode == "I;16":
        return Image.fromarray(ramp.astype(np.uint16) * 200)  # PIL names a uint16 array "I;16"
    if mode in ("I", "F"):
        return Image.fromarray(ramp.astype(np.int32 if mode == "I" else np.float32) * 3 - 100)
    if mode == "1":
        return grey.point(lambda v: 255 * (v > 127)).convert("1")
    if mode == "PA":
        return grey.convert("RGB").convert("P").convert("PA")
    return grey.convert("RGB").convert(mode) if mode not in ("L", "LA") else grey.convert(mode)


@FAST
@given(mode=st.sampled_from(MODES), width=st.integers(8, 40), height=st.integers(1, 30))
def test_every_pil_mode_decodes_to_rgb_of_the_same_size_and_the_same_direction(tmp_path_factory, mode, width, height):
    source = _gradient(mode, width, height)
    path = tmp_path_factory.mktemp("modes") / "image.tiff"
    try:
        source.save(path)
    except (OSError, ValueError, KeyError):
        assume(False)  # a mode TIFF cannot hold: another test covers what PIL cannot write
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (width, height)
    brightness = np.asarray(image, dtype=np.float64).mean(axis=(0, 2))
    if mode not in ("LAB", "HSV"):  # colour spaces whose channels are not brightness
        assert brightness[-1] > brightness[0]  # left stays left: no flip, no inversion


@FAST
@given(width=st.integers(8, 60), height=st.integers(8, 60), crop=st.integers(4, 16), extra=st.integers(0, 8))
def test_model_input_is_a_square_crop_in_the_unit_range_that_keeps_left_left_and_top_top(width, height, crop, extra):
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.zeros_like(xs)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    tensor = to_model_input(image, crop + extra, crop)
    assert tensor.shape == (3, crop, crop) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    assert tensor[0, :, -1].mean() > tensor[0, :, 0].mean()  # red grows to the right
    assert tensor[1, -1, :].mean() > tensor[1, 0, :].mean()  # green grows downwards


def test_a_truncated_image_is_an_error_not_a_grey_picture():
    buffer = io.BytesIO()
    _gradient("RGB", 64, 48).save(buffer, format="PNG")
    broken = io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises((OSError, ValueError)):
        load_rgb(broken)


@FAST
@given(
    size=st.integers(2, 12),
    cell_px=st.sampled_from([12, 20, 33, 80]),
    spot=st.tuples(st.integers(0, 11), st.integers(0, 11)),
    name=st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=40),
)
def test_a_label_sits_at_the_bottom_of_its_cell_inside_its_block(size, cell_px, spot, name):
    """One labelled cell: its class name is written ending at the cell's bottom edge, within the columns of the
    block of cells it stands for, and no other cell gets a label."""
    y, x = spot[0] % size, spot[1] % size
    count = np.zeros((size, size), np.int64)
    count[y, x] = 5
    top = np.zeros((size, size, 1), np.int64)
    top[y, x, 0] = 1
    side = size * cell_px
    grid = Grid(size=size, min_count=2, count=count, cell=np.zeros(0, np.int64), top_classes=top,
                top_attributions=np.zeros((size, size, 1)), icon_cosine=np.zeros((size, size)),
                icon_objective=np.zeros((size, size)), image=Image.new("RGB", (side, side), "white"))  # fmt: skip
    image = Image.new("RGB", (side, side), "white")
    draw_labels(image, grid, ["never", name])
    ink = np.argwhere(np.asarray(image).min(axis=2) < 128)
    assert len(ink), "the one dense cell has no label"
    step = max(1, -(-80 // cell_px))
    block_x = x // step * step
    assert ink[:, 1].min() >= block_x * cell_px and ink[:, 1].max() < min(block_x + step, size) * cell_px
    assert ink[:, 0].max() < (y + 1) * cell_px
    assert ink[:, 0].max() >= (y + 1) * cell_px - 16  # at the cell's bottom, not its top
