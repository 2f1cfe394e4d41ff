"""Drawing an atlas (atlas.stages.compose): icons placed on a white canvas by cell density, cells faded by a
heat-map's opacity, and class labels as outlined text."""

from __future__ import annotations

from functools import lru_cache

import h5py
import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = 255  # white canvas, empty cells stay white (lucid's make_canvas, reference 1.6)
LABEL_FONT_PX = 11
LABEL_STROKE_PX = 2  # white outline: labels stay legible over any icon


def density_scale(count: np.ndarray, min_count: int) -> np.ndarray:
    """Icon side per cell as a fraction of the icon size: min(1, sqrt(n / average n)), 0 where empty.

    The paper's front-end (reference 1.6: "Grid cells are also sized according to the density").
    """
    average = count.sum() / count.size
    scale = np.minimum(1.0, np.sqrt(count / max(average, 1e-12)))
    return np.where(count >= min_count, scale, 0.0)


def atlas_canvas(icons: h5py.Dataset | np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Place each cell's icon, scaled by `scale` and centred in its cell, on a white G*PX square canvas."""
    size, icon_px = icons.shape[0], icons.shape[2]
    canvas = np.full((size * icon_px, size * icon_px, 3), BACKGROUND, np.uint8)
    for y in range(size):
        drawn = np.flatnonzero(scale[y] > 0)
        if not len(drawn):
            continue
        row = icons[y]  # one read per row of cells keeps HDF5 access sequential
        for x in drawn:
            side = max(1, round(icon_px * scale[y, x]))
            icon = row[x]
            if side != icon_px:
                icon = np.asarray(Image.fromarray(icon).resize((side, side), Image.Resampling.LANCZOS))
            top, left = y * icon_px + (icon_px - side) // 2, x * icon_px + (icon_px - side) // 2
            canvas[top : top + side, left : left + side] = icon
    return canvas


@lru_cache(maxsize=8192)
def label_image(name: str, width: int) -> Image.Image:
    """`name` cut with an ellipsis to fit `width` px: black text with a white outline on a transparent ground.

    Cached: an atlas repeats a few hundred class names over thousands of cells and pyramid levels.
    """
    font = ImageFont.load_default(size=LABEL_FONT_PX)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text = name
    if measure.textlength(text, font=font) > width:
        while text and measure.textlength(text + "…", font=font) > width:
            text = text[:-1]
        text = text + "…" if text else ""
    left, top, right, bottom = measure.textbbox((0, 0), text, font=font, stroke_width=LABEL_STROKE_PX)
    label = Image.new("RGBA", (int(right - left), int(bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(label).text(
        (-left, -top), text, font=font, fill=(0, 0, 0, 255), stroke_width=LABEL_STROKE_PX, stroke_fill=(255,) * 4
    )
    return label


def draw_legend(image: Image.Image, left: str, right: str) -> None:
    """Name the two sides of a two-class comparison in the top corners: "<- left" and "right ->"."""
    half = image.width // 2 - 8
    for text, at_left in ((f"<- {left}", True), (f"{right} ->", False)):
        label = label_image(text, half)
        image.paste(label, (4 if at_left else image.width - label.width - 4, 4), label)


def fade_cells(image: Image.Image, opacity: np.ndarray) -> Image.Image:
    """Blend each cell of an atlas toward the white background by its opacity [G, G] in [0, 1] (1: as drawn)."""
    pixels = np.asarray(image).copy()
    cell_px = image.width // opacity.shape[0]
    for y, row in enumerate(opacity.astype(np.float32)):  # a row of cells at a time: no full-size float copy
        band = pixels[y * cell_px : (y + 1) * cell_px].astype(np.float32)
        alpha = np.repeat(row, cell_px)[None, :, None]
        pixels[y * cell_px : (y + 1) * cell_px] = np.round(BACKGROUND - (BACKGROUND - band) * alpha)
    return Image.fromarray(pixels)
