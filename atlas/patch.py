"""The adversarial patch lab (reference 1.8): paste a natural picture onto images and count the flips.

Protocol of `activation-atlas-adversarial.ipynb` (`composite_img`): the background is the model input,
the patch is resized to a `ratio * input_size` square and pasted at `position`, given as fractions of
`input_size - patch_size` ((0, 0) top-left, (1, 1) bottom-right). "Static" uses one size and corner for
every image; "search" (the article's "dynamic") keeps the best of the four corners and several sizes
per image. Only images classified correctly before patching count (the article's denominator), and a
uniform-noise patch at the same placements is the control.

A patch is an image file, a crop `photo.jpg@x0,y0,x1,y1`, or an atlas icon `store.h5:layer:G:x=X,y=Y`
(x first, as in the viewer, cells.json and `--suggest`; the coordinates are named because specs before issue 25
were y,x, and bare numbers would silently take the transposed cell).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atlas import AtlasError
from atlas.config import Settings
from atlas.images import UNREADABLE, ImageDataset, ImageRecord, collate, load_rgb
from atlas.models.classifier import Classifier
from atlas.progress import progress
from atlas.runtime import resolve
from atlas.store import ATTRIBUTION, COUNT, ICONS, Layer, only_grid, open_store

# (y, x) fractions of `input_size - patch_size`, the notebook's `patch_position`
CORNERS = {"tl": (0.0, 0.0), "tr": (0.0, 1.0), "bl": (1.0, 0.0), "br": (1.0, 1.0)}
DEFAULT_RATIO = 0.4  # `patch_width_ratio` of all three published examples (0.4 x 224 = 89.6, pasted as 90 px)
# The article does not publish the sizes its "dynamic" search tried; these span its 0.2 to 0.7 examples
# without covering most of the image
SEARCH_RATIOS = (0.2, 0.3, 0.4, 0.5)
ICON_SPEC = re.compile(r"^(?P<store>.+):(?P<layer>[^:]+):(?P<grid>\d+):(?P<cell>(?:[xy]=)?\d+,(?:[xy]=)?\d+)$")
CELL_SPEC = re.compile(r"^x=(?P<x>\d+),y=(?P<y>\d+)$")
CROP_SPEC = re.compile(r"^(?P<path>.+)@(?P<x0>\d+),(?P<y0>\d+),(?P<x1>\d+),(?P<y1>\d+)$")
THUMB_PX = 112


# patches ------------------------------------------------------------------------------------------------
def patch_file(spec: str) -> str | None:
    """The image file a patch spec is cut from; None for an atlas icon."""
    if Path(spec).exists():
        return spec
    if ICON_SPEC.match(spec):
        return None
    crop = CROP_SPEC.match(spec)
    return crop["path"] if crop else spec


def load_patch(spec: str) -> torch.Tensor:
    """The patch named by `spec` as a float (3, H, W) tensor in [0, 1].

    spec: an image file, `photo.jpg@x0,y0,x1,y1` (a crop in the photo's pixels, x1 and y1 exclusive),
    or `store.h5:layer:G:x=X,y=Y` (the icon of an atlas cell, `/<layer>/grid/<G>/icons[y, x]`).
    """
    path = patch_file(spec)
    if path is None:
        icon = ICON_SPEC.match(spec)
        assert icon is not None  # patch_file gives None for an icon's spec only
        x, y = parse_cell(icon["cell"])
        return _load_icon(icon["store"], icon["layer"], int(icon["grid"]), x, y)
    if not Path(path).is_file():
        raise AtlasError(
            f"patch {spec!r}: {path} is not a file (give an image, image@x0,y0,x1,y1 or store:layer:G:x=X,y=Y)"
        )
    try:
        image = load_rgb(path)
    except UNREADABLE as err:
        raise AtlasError(f"patch {path} cannot be read: {err}") from err
    if path != spec:
        crop = CROP_SPEC.match(spec)
        assert crop is not None  # patch_file gives another path than the spec for a crop's spec only
        x0, y0, x1, y1 = (int(v) for v in crop.group("x0", "y0", "x1", "y1"))
        if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
            raise AtlasError(f"patch crop {x0},{y0},{x1},{y1} is not inside {path} ({image.width}x{image.height})")
        image = image.crop((x0, y0, x1, y1))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def parse_cell(text: str) -> tuple[int, int]:
    """(x, y) of an atlas cell written `x=X,y=Y`; AtlasError, saying how to write it, for any other form."""
    cell = CELL_SPEC.match(text)
    if cell:
        return int(cell["x"]), int(cell["y"])
    swapped = re.match(r"^y=(\d+),x=(\d+)$", text)
    if swapped:
        raise AtlasError(f"cell {text!r}: write x first, x={swapped[2]},y={swapped[1]} (the viewer's order)")
    raise AtlasError(
        f"cell {text!r} does not name its coordinates: write x=X,y=Y, as the viewer shows the cell "
        "(bare numbers were y,x before issue 25)"
    )


def _load_icon(store: str, layer: str, grid: int, x: int, y: int) -> torch.Tensor:
    with open_store(store) as f:
        cells = Layer(f, layer).grid(grid, needs=(COUNT, ICONS))
        if not (0 <= y < grid and 0 <= x < grid):
            raise AtlasError(f"cell x={x},y={y} is outside the {grid}x{grid} grid")
        if not cells.non_empty()[y, x]:
            count = cells.group[COUNT][y, x]
            raise AtlasError(f"cell x={x},y={y} of {cells.group.name} is empty (count {count}): it has no icon")
        icon = cells.group[ICONS][y, x]
    return torch.from_numpy(icon.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def resize_patch(patch: torch.Tensor, size: int) -> torch.Tensor:
    """The (3, H, W) patch resized to a (3, size, size) square, as the notebook does (aspect not kept)."""
    square = F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return square[0].clamp(0.0, 1.0)


def noise_tiles(placements: list[Placement], seed: int = 0) -> list[torch.Tensor]:
    """The control: one uniform-noise square per placement, of that placement's size (CPU generator, so
    the same seed gives the same noise on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, p.size, p.size, generator=generator) for p in placements]


# geometry ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    ratio: float
    corner: str
    size: int  # side of the pasted square, in input pixels
    top: int
    left: int


@dataclass(frozen=True)
class PatchSettings(Settings):
    """How a patch is measured (`atlas run patch`), `measure_patch`'s keywords. One ratio and corner is the
    article's static test (0.4 of the input side: all three published examples); several are its dynamic search,
    the best placement per image (SEARCH_RATIOS x every corner)."""

    ratios: tuple[float, ...] = (DEFAULT_RATIO,)
    corners: tuple[str, ...] = ("tl",)
    seed: int = 0  # of the noise control
    examples: int = 8  # before/after pairs in the report's strip
    batch_size: int = 32

    section = "patch"
    bounds = {"seed": (0, None), "examples": (0, None), "batch_size": (1, None)}

    def validate(self) -> None:
        object.__setattr__(self, "ratios", tuple(check_ratio(ratio) for ratio in self.ratios))
        unknown = [corner for corner in self.corners if corner not in CORNERS]
        if unknown or not self.ratios or not self.corners:
            raise AtlasError(f"a patch needs ratios and corners among {', '.join(CORNERS)}, not {self.corners}")


def check_ratio(ratio: float) -> float:
    """A patch side as a fraction of the input: in (0, 1]; else a one-line AtlasError."""
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:  # also refuses NaN
        raise AtlasError(f"patch size must be a fraction of the image in (0, 1], not {ratio}")
    return ratio


def corner_placement(image_size: int, ratio: float = DEFAULT_RATIO, corner: str = "tl") -> Placement:
    """Where a `ratio * image_size` square goes at `corner`: fractions of `image_size - size`, as in the notebook."""
    check_ratio(ratio)
    if corner not in CORNERS:
        raise AtlasError(f"unknown corner {corner!r}; use one of {', '.join(CORNERS)}")
    size = max(1, round(ratio * image_size))
    fy, fx = CORNERS[corner]
    return Placement(ratio, corner, size, round(fy * (image_size - size)), round(fx * (image_size - size)))


def paste(images: torch.Tensor, tiles: list[torch.Tensor], placements: list[Placement]) -> torch.Tensor:
    """Every tile at its placement on every image: (N, 3, H, W) -> (N, P, 3, H, W).

    A tile that reaches past the border is clipped to the image. Built as one masked select, so the
    N x P composites come out in a single batched operation on the images' device.
    """
    _, channels, height, width = images.shape
    canvas = images.new_zeros(len(placements), channels, height, width)
    mask = torch.zeros(len(placements), 1, height, width, dtype=torch.bool, device=images.device)
    for i, (tile, place) in enumerate(zip(tiles, placements, strict=True)):
        y0, x0 = max(place.top, 0), max(place.left, 0)
        y1, x1 = min(place.top + tile.shape[1], height), min(place.left + tile.shape[2], width)
        if y0 < y1 and x0 < x1:
            canvas[i, :, y0:y1, x0:x1] = tile[:, y0 - place.top : y1 - place.top, x0 - place.left : x1 - place.left]
            mask[i, :, y0:y1, x0:x1] = True
    return torch.where(mask[None], canvas[None], images[:, None])


# prediction --------------------------------------------------------------------------------------------
class Predictions(NamedTuple):
    top1: torch.Tensor  # class index
    p_top1: torch.Tensor
    p_target: torch.Tensor


@torch.inference_mode()
def predict(model: Classifier, images: torch.Tensor, target: int) -> Predictions:
    """Top-1 class, its probability and the target's probability of each image (on the CPU)."""
    probs = model(images).float().softmax(dim=-1)
    p_top1, top1 = probs.max(dim=-1)
    return Predictions(top1.cpu(), p_top1.cpu(), probs[:, target].cpu())


def predict_pasted(
    model: Classifier,
    images: torch.Tensor,
    tiles: list[torch.Tensor],
    placements: list[Placement],
    target: int,
    batch_size: int = 32,
) -> Predictions:
    """Predictions for every image x placement, (N, P) each; about `batch_size` composites per forward pass."""
    per_pass = max(1, batch_size // len(placements))
    parts = [predict(model, paste(chunk, tiles, placements).flatten(0, 1), target) for chunk in images.split(per_pass)]
    return Predictions(*(torch.cat(field).view(len(images), len(placements)) for field in zip(*parts, strict=True)))


def best_placement(pred: Predictions, target: int) -> torch.Tensor:
    """Per image, the placement the search keeps: one that flips to the target if any, the most probable
    target among those (or among all when none flips)."""
    return ((pred.top1 == target).float() * 2.0 + pred.p_target).argmax(dim=1)  # p <= 1, so a flip always wins


def outcome(pred: Predictions, source: torch.Tensor, target: int) -> dict[str, float]:
    """Rates over the images of `pred` (the correctly classified ones) at each image's best placement."""
    best = best_placement(pred, target)
    rows = torch.arange(len(best))
    top1 = pred.top1[rows, best]
    return {
        "flip_rate": (top1 == target).float().mean().item(),
        "leave_rate": (top1 != source).float().mean().item(),
        "mean_p_target_after": pred.p_target[rows, best].mean().item(),
    }


# the experiment ----------------------------------------------------------------------------------------
def select_records(
    records: list[ImageRecord], target: int, source: int | None = None, exclude: str | None = None
) -> list[ImageRecord]:
    """The images to patch, each labelled with the class it should keep.

    With a source class: the images labelled so (or all of them, relabelled, when none has a label: a
    folder of that class). Without: every labelled image except those of the target. `exclude` (the
    patch's own file) is left out, so a patch is never measured on the photo it was cut from.
    """
    if exclude is not None:
        records = [r for r in records if Path(r.path).resolve() != Path(exclude).resolve()]
    if source is not None and source == target:
        raise AtlasError("the source and target classes are the same")
    labelled = [r for r in records if r.label >= 0]
    if source is not None:
        if not labelled:
            return [ImageRecord(r.path, source) for r in records]
        chosen = [r for r in labelled if r.label == source]
        if not chosen:
            raise AtlasError(f"no image of class {source} in the data")
        return chosen
    chosen = [r for r in labelled if r.label != target]
    if not chosen:
        raise AtlasError("no labelled image outside the target class: give --source for an unlabelled folder")
    return chosen


@dataclass
class Example:
    """One counted image kept for the report's before/after strip."""

    record: int  # row in the report's `images` list
    image: torch.Tensor  # (3, H, W) on the CPU
    patch_place: int
    noise_place: int


def measure_patch(
    model: Classifier,
    patch: torch.Tensor,
    records: list[ImageRecord],
    target: int,
    source: int | None = None,
    ratios: tuple[float, ...] = (DEFAULT_RATIO,),
    corners: tuple[str, ...] = ("tl",),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    examples: int = 8,
    workers: int | None = None,
) -> tuple[dict, list[Example]]:
    """Paste `patch` on `records` (already chosen by `select_records`) at every ratio x corner.

    One ratio and corner is the article's static test; several are its dynamic search (best per
    image). Returns the report (JSON-ready) and up to `examples` images for the strip, half of them
    flipped where the data allow.
    """
    started = time.perf_counter()
    names = model.class_names
    model = resolve("patch", device).prepare(model)  # channels_last, fp32: flips near a tie stay exact
    placements = [corner_placement(model.input_size, ratio, corner) for ratio in ratios for corner in corners]
    patch_tiles = [resize_patch(patch, p.size).to(device) for p in placements]
    control_tiles = [tile.to(device) for tile in noise_tiles(placements, seed)]
    alone = predict(model, resize_patch(patch, model.input_size)[None].to(device), target)  # patch as the whole input
    loader = torch.utils.data.DataLoader(
        ImageDataset(records, model.resize_size, model.input_size),
        batch_size=batch_size,
        num_workers=min(4, os.cpu_count() or 1) if workers is None else workers,
        collate_fn=collate,
    )
    tiles = (patch_tiles, control_tiles)
    tally = _tally(model, loader, records, placements, tiles, target, batch_size, examples, device)
    if not tally.counted:
        raise AtlasError(f"none of the {tally.n_read} readable images was classified correctly before patching")
    report = {
        "model": model.name,
        "weights": model.weights,
        "target": names[target],
        "target_index": target,
        "source": names[source] if source is not None else None,
        "source_index": source,
        "patch_alone": {"top1": names[alone.top1[0]], "p_top1": alone.p_top1.item(), "p_target": alone.p_target.item()},
        "mode": "search" if len(placements) > 1 else "static",
        "placements": [vars(p) for p in placements],
        "seed": seed,
        "device": str(device),
        "n_selected": len(records),
        "n_images": tally.n_read,
        "n_skipped": len(tally.skipped),
        "skipped": tally.skipped,
        **_rates(tally, records, names, placements, target),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return report, _pick_examples(tally.flipped, tally.others, examples)


@dataclass
class _Tally:
    """What one pass over the images gathered, for the images classified correctly before patching (counted)."""

    skipped: list[str] = field(default_factory=list)  # "path: reason" of unreadable images
    counted: list[int] = field(default_factory=list)  # their rows in `records`
    own: list[torch.Tensor] = field(default_factory=list)  # their labels, per batch
    before: list[Predictions] = field(default_factory=list)  # per batch: unpatched, with the patch, with noise
    patched: list[Predictions] = field(default_factory=list)
    control: list[Predictions] = field(default_factory=list)
    flipped: list[Example] = field(default_factory=list)  # strip candidates that the patch flipped, and others
    others: list[Example] = field(default_factory=list)
    n_read: int = 0


def _tally(
    model: Classifier,
    loader: torch.utils.data.DataLoader,
    records: list[ImageRecord],
    placements: list[Placement],
    tiles: tuple[list[torch.Tensor], list[torch.Tensor]],
    target: int,
    batch_size: int,
    examples: int,
    device: str | torch.device,
) -> _Tally:
    """Predict every correctly classified image unpatched, with the patch and with noise at every placement."""
    patch_tiles, control_tiles = tiles
    tally = _Tally()
    for rows, batch, bad in progress(loader, desc="patch", unit="batch"):
        tally.skipped += [f"{records[row].path}: {reason}" for row, reason in bad]
        if batch is None:
            continue
        tally.n_read += len(rows)
        labels = torch.tensor([records[row].label for row in rows])
        first = predict(model, batch.to(device), target)
        keep = (first.top1 == labels).nonzero().flatten()
        if len(keep) == 0:
            continue
        images = batch[keep].to(device)
        with_patch = predict_pasted(model, images, patch_tiles, placements, target, batch_size)
        with_noise = predict_pasted(model, images, control_tiles, placements, target, batch_size)
        patch_best, noise_best = best_placement(with_patch, target), best_placement(with_noise, target)
        for j, k in enumerate(keep.tolist()):
            flipped = with_patch.top1[j, patch_best[j]].item() == target
            kept = tally.flipped if flipped else tally.others
            if len(kept) < examples:
                kept.append(Example(len(tally.counted), batch[k].clone(), int(patch_best[j]), int(noise_best[j])))
            tally.counted.append(rows[k])
        tally.own.append(labels[keep])
        tally.before.append(Predictions(*(values[keep] for values in first)))
        tally.patched.append(with_patch)
        tally.control.append(with_noise)
    return tally


def _rates(
    tally: _Tally, records: list[ImageRecord], names: list[str], placements: list[Placement], target: int
) -> dict:
    """The report's measurements: flip and leave rates with the patch and with noise, per placement and per image."""
    own = torch.cat(tally.own)
    before, patch, noise = (
        Predictions(*map(torch.cat, zip(*p, strict=True))) for p in (tally.before, tally.patched, tally.control)
    )
    return {
        "n": len(tally.counted),
        "mean_p_target_before": before.p_target.mean().item(),
        **outcome(patch, own, target),
        **{f"noise_{key}": value for key, value in outcome(noise, own, target).items()},
        "per_placement": _per_placement(placements, patch, noise, target),
        "images": _per_image(records, tally.counted, names, before, patch, noise, target),
    }


def _per_placement(placements: list[Placement], patch: Predictions, noise: Predictions, target: int) -> list[dict]:
    """The static rate of every placement and how often the search kept it."""
    kept = best_placement(patch, target).bincount(minlength=len(placements))
    return [
        {
            "ratio": p.ratio,
            "corner": p.corner,
            "flip_rate": (patch.top1[:, i] == target).float().mean().item(),
            "noise_flip_rate": (noise.top1[:, i] == target).float().mean().item(),
            "mean_p_target_after": patch.p_target[:, i].mean().item(),
            "chosen": int(kept[i]),
        }
        for i, p in enumerate(placements)
    ]


def _per_image(
    records: list[ImageRecord],
    counted: list[int],
    names: list[str],
    before: Predictions,
    patch: Predictions,
    noise: Predictions,
    target: int,
) -> list[dict]:
    patch_best, noise_best = best_placement(patch, target), best_placement(noise, target)
    rows = []
    for i, row in enumerate(counted):
        b, n = patch_best[i], noise_best[i]
        rows.append(
            {
                "path": records[row].path,
                "before": names[before.top1[i]],
                "p_before": round(before.p_top1[i].item(), 4),
                "p_target_before": round(before.p_target[i].item(), 4),
                "placement": b.item(),
                "after": names[patch.top1[i, b]],
                "p_after": round(patch.p_top1[i, b].item(), 4),
                "p_target_after": round(patch.p_target[i, b].item(), 4),
                "noise_after": names[noise.top1[i, n]],
                "noise_p_target_after": round(noise.p_target[i, n].item(), 4),
            }
        )
    return rows


def _pick_examples(flipped: list[Example], others: list[Example], count: int) -> list[Example]:
    """Half flipped and half not where both exist, in data order within each half."""
    n_flipped = max((count + 1) // 2, count - len(others))
    return sorted(flipped[:n_flipped] + others[: count - min(n_flipped, len(flipped))], key=lambda e: e.record)


# report -----------------------------------------------------------------------------------------------
def write_report(
    report: dict, examples: list[Example], patch: torch.Tensor, out: str | Path, patch_spec: str = ""
) -> Path:
    """`out/report.json`, `out/report.md` and the strip's JPEG thumbnails under `out/thumbs/`."""
    out = Path(out)
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    placements = [Placement(**p) for p in report["placements"]]
    _save_thumb(resize_patch(patch, THUMB_PX), thumbs / "patch.jpg")
    noise = noise_tiles(placements, report["seed"])
    patch_tiles = [resize_patch(patch, p.size) for p in placements]
    strip = []
    for e in examples:
        row = report["images"][e.record]
        stem = f"{e.record:05d}"
        _save_thumb(e.image, thumbs / f"{stem}_before.jpg")
        place, noise_place = placements[e.patch_place], placements[e.noise_place]
        _save_thumb(paste(e.image[None], [patch_tiles[e.patch_place]], [place])[0, 0], thumbs / f"{stem}_patch.jpg")
        _save_thumb(paste(e.image[None], [noise[e.noise_place]], [noise_place])[0, 0], thumbs / f"{stem}_noise.jpg")
        strip.append({**row, "thumbs": [f"thumbs/{stem}_{kind}.jpg" for kind in ("before", "patch", "noise")]})
    report = {"patch": patch_spec, **report, "examples": strip}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return out / "report.json"


def _save_thumb(image: torch.Tensor, path: Path) -> None:
    pixels = (image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(pixels).resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR).save(path, quality=85)


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f}%"


def _markdown(r: dict) -> str:
    who = f"images of {r['source']}" if r["source"] else "labelled images (own label as the source)"
    lines = [
        f"# Patch report: {r['patch'] or 'patch'} -> {r['target']}",
        "",
        f"![patch](thumbs/patch.jpg) Model {r['model']} ({r['weights']}), {r['mode']} placement, "
        f"{len(r['placements'])} placement(s), seed {r['seed']}, {r['seconds']} s on {r['device']}. "
        f"The patch alone is classified {r['patch_alone']['top1']} ({_pct(r['patch_alone']['p_top1'])}).",
        "",
        f"{r['n']} of {r['n_images']} {who} were classified correctly before patching and are counted "
        f"({r['n_skipped']} unreadable skipped).",
        "",
        "| | patch | noise control |",
        "|---|---|---|",
        f"| top-1 becomes {r['target']} | {_pct(r['flip_rate'])} | {_pct(r['noise_flip_rate'])} |",
        f"| top-1 leaves the source class | {_pct(r['leave_rate'])} | {_pct(r['noise_leave_rate'])} |",
        f"| mean P({r['target']}) before -> after | {_pct(r['mean_p_target_before'])} -> "
        f"{_pct(r['mean_p_target_after'])} | {_pct(r['mean_p_target_before'])} -> "
        f"{_pct(r['noise_mean_p_target_after'])} |",
        "",
        "| size | corner | flip (static) | noise flip | mean P(target) | kept by search |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['ratio']} | {p['corner']} | {_pct(p['flip_rate'])} | {_pct(p['noise_flip_rate'])} | "
        f"{_pct(p['mean_p_target_after'])} | {p['chosen']} |"
        for p in r["per_placement"]
    ]
    lines += ["", "| before | patched | noise |", "|---|---|---|"]
    for e in r["examples"]:
        before, patched, noise = (f"![]({path})" for path in e["thumbs"])
        lines.append(
            f"| {before}<br>{e['before']} {_pct(e['p_before'])} | {patched}<br>{e['after']} {_pct(e['p_after'])} | "
            f"{noise}<br>{e['noise_after']} |"
        )
    return "\n".join(lines) + "\n"


# suggestions from the atlas ----------------------------------------------------------------------------
def suggest_cells(
    store: str | Path, source: int, target: int, layer: str | None = None, grid: int | None = None, top: int = 10
) -> list[dict]:
    """Atlas cells that push most toward `target` and away from `source`: patch candidates, each with its
    cell (x, y) and patch spec.

    Score of a cell: mean attribution to the target minus that to the source (the class-comparison
    axis of reference 1.7), over the non-empty cells (count >= the grid's min_count).
    """
    with open_store(store) as f:
        layer_view = Layer(f, layer)
        grid = grid if grid is not None else only_grid(layer_view.group)
        view = layer_view.grid(grid, needs=(COUNT, ATTRIBUTION))
        attribution = view.group[ATTRIBUTION]
        if not (0 <= source < attribution.shape[-1] and 0 <= target < attribution.shape[-1]):
            raise AtlasError(f"the store's attributions have {attribution.shape[-1]} classes; got {source}, {target}")
        toward, away = attribution[..., target], attribution[..., source]
        count, non_empty = view.read(COUNT), view.non_empty()
        layer_name = layer_view.name
    score = np.where(non_empty, toward - away, -np.inf)
    order = np.argsort(-score, axis=None, kind="stable")[: min(top, int(np.isfinite(score).sum()))]
    return [
        {
            "cell": (int(x), int(y)),
            "count": int(count[y, x]),
            "score": float(score[y, x]),
            "spec": f"{store}:{layer_name}:{grid}:x={x},y={y}",
        }
        for y, x in zip(*np.unravel_index(order, score.shape), strict=True)
    ]
