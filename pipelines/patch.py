"""`atlas run patch`: the adversarial patch experiment (the article's "Testing dozens of patches", reference 1.8).

Paste one picture on every selected image, count how often the top-1 class becomes the target (over the
images classified correctly before), with a uniform-noise patch at the same placements as the control;
or rank atlas cells as patch candidates. The measurements are atlas.patch's; this module wires them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from atlas import patch as lab
from atlas.classes import resolve_class
from atlas.images import list_images
from atlas.models.zoo import load_model
from atlas.runtime import resolve
from atlas.store import open_store


def run_patch_experiment(
    patch_spec: str,
    data: str,
    target: str,
    out: str | Path,
    *,
    model_name: str = "efficientnet-lite0",
    weights: str | None = None,
    source: str | None = None,
    settings: lab.PatchSettings = lab.PatchSettings(),
    limit: int | None = None,
    workers: int | None = None,
    device: str | None = None,
) -> tuple[dict, Path]:
    """Measure one patch at the settings' ratios x corners (the best per image when several); returns (report,
    report path).
    device: default CUDA when there is one (atlas.runtime.resolve)."""
    device = str(resolve("patch", device).device)
    model = load_model(model_name, weights=weights, device=device)
    target_class = resolve_class(target, model.class_names)
    source_class = resolve_class(source, model.class_names) if source else None
    patch = lab.load_patch(patch_spec)
    records = list_images(data, model.class_names, model.imagenet_index)
    records = lab.select_records(records, target_class, source_class, exclude=lab.patch_file(patch_spec))[:limit]
    report, strip = lab.measure_patch(
        model,
        patch,
        records,
        target_class,
        source_class,
        **asdict(settings),
        device=device,
        workers=workers,
    )
    return report, lab.write_report(report, strip, patch, out, patch_spec=patch_spec)


def suggest_patches(
    store: str | Path,
    source: str,
    target: str,
    *,
    model_name: str | None = None,
    layer: str | None = None,
    grid: int | None = None,
    top: int = 10,
) -> list[dict]:
    """The `top` atlas cells of `store` that push most from `source` towards `target` (atlas.patch.suggest_cells)."""
    with open_store(store) as f:
        model_name = model_name or str(f.attrs.get("model", ""))
    names = load_model(model_name, weights="random").class_names  # names only: no weights needed
    source_class, target_class = (resolve_class(name, names) for name in (source, target))
    return lab.suggest_cells(store, source_class, target_class, layer=layer, grid=grid, top=top)
