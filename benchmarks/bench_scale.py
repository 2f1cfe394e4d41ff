"""Scale: project, grid and compose of a paper-shaped store, at 100k and 1M rows, in bounded memory.

The store has the paper's shape (1M samples of InceptionV1 mixed4c: 512 channels, 1008 attribution columns,
float32: 6 GB) and is written in row blocks, never held whole. Activations come from a few hundred Gaussian
clusters on a 32-dim subspace through ReLU (bench_project's recipe, drawn block by block), so UMAP has
structure to find; each cluster's samples attribute most to one class, so cells have top classes. Samples
point at the demo photos (the dataset examples are real crops).

Each stage runs in a fresh process, so its peak RSS (VmHWM) is its own, plus Python, torch and umap:
- project: `atlas.stages.project.project_store` at the paper's settings (50 / 0.05 / cosine, our default path);
- grid: `atlas.stages.grid.grid_store` at 20, 40, 80 and 160 (the paper's production zoom levels);
- render is NOT run: `flat_icons` writes one flat colour per cell (by its top class), 80 px, as render lays
  them out, so compose has the paper's icon volume (25,600 icons at 160);
- compose: `atlas.stages.compose.compose_run`, 4 example patches per cell, Deep Zoom pyramid, labels;
- viewer: the composed folder in headless Chromium: first paint, the home view loaded, zoomed in until the
  160 x 160 grid shows (zoom_to_grid_s includes a 50 ms frame per 1.5x zoom step), a hovered cell's classes
  and examples, and the browser's memory.
Beside ours, in the same run: umap-learn (`umap.UMAP` with the paper's n_neighbors, min_dist and metric and its
own defaults otherwise: spectral init, its own SGD, unseeded so it uses every core) on the same activations, at
100k and at 1M within UMAP_LEARN_TIMEOUT_S.

Last, `run_filled`: grid, compose and the viewer again at 1M on a nearly full 160 x 160 grid (a spread layout in
place of UMAP's, which fills ~4 % of the cells of these clusters).

`SCALE_STAGES=project python -m benchmarks.run scale` stops after the projection rows; `SCALE_UMAP_ROWS=N` runs
umap-learn only up to N rows.
Targets (issue 21): every stage at 1M within 6 GiB peak RSS; `x_100k` is the growth ratio 1M / 100k.
Needs about 8 GB of free disk in the temporary folder ($TMPDIR) and takes about 40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import in_subprocess

ROWS = (100_000, 1_000_000)
CHANNELS = 512  # InceptionV1 mixed4c
CLASSES = 1008  # lucid's InceptionV1 logits
CLUSTERS = 300
LAYER = "mixed4c"
SIZES = [20, 40, 80, 160]
ICON_PX = 80  # the paper's icon size
BLOCK = 65536  # rows written at once
PAPER_UMAP = {"n_neighbors": 50, "min_dist": 0.05, "metric": "cosine"}  # mixed4a-5b
UMAP_LEARN_TIMEOUT_S = 600  # at 1M its spectral init alone ran over 9 minutes on 2 cores (bench_project)
LIMIT_MIB = 6 * 1024  # the bound on every stage's peak RSS at 1M
STAGES = os.environ.get("SCALE_STAGES", "all")  # "project": the store, ours and umap-learn only
UMAP_LEARN_MAX_ROWS = int(os.environ.get("SCALE_UMAP_ROWS", max(ROWS)))  # umap-learn runs up to this many rows


def write_paper_store(
    path: str | Path,
    n: int,
    channels: int = CHANNELS,
    classes: int = CLASSES,
    clusters: int = CLUSTERS,
    seed: int = 0,
) -> dict:
    """Write a collected store of `n` clustered samples block by block (never more than BLOCK rows in memory)."""
    from atlas.images import demo_images
    from atlas.store import STR

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    latent = 32
    mixing = (rng.normal(size=(latent, channels)) / np.sqrt(latent)).astype(np.float32)
    centres = rng.normal(size=(clusters, latent)).astype(np.float32)
    weights = rng.dirichlet(np.ones(clusters))
    cluster_class = rng.choice(classes, size=clusters, replace=False)
    photos = [record.path for record in demo_images()]
    with h5py.File(path, "w") as store:
        store.attrs.update(model="synthetic", weights="random", input_size=224, resize_size=256, positions=1, seed=seed)
        store.create_dataset("classes", data=np.array([f"class {k}" for k in range(classes)], dtype=object), dtype=STR)
        store.create_dataset("images/path", data=np.array(photos, dtype=object), dtype=STR)
        store.create_dataset("images/label", data=np.full(len(photos), -1, np.int64))
        group = store.create_group(LAYER)
        group.attrs.update(channels=channels, height=14, width=14)
        chunk = min(4096, n)
        activations = group.create_dataset("activations", (n, channels), np.float32, chunks=(chunk, channels))
        attributions = group.create_dataset("attributions", (n, classes), np.float32, chunks=(chunk, classes))
        image_index = group.create_dataset("image_index", (n,), np.int64)
        position = group.create_dataset("position", (n, 2), np.int32)
        for start in range(0, n, BLOCK):
            rows = min(BLOCK, n - start)
            which = rng.choice(clusters, size=rows, p=weights)
            points = (centres[which] + 0.8 * rng.standard_normal((rows, latent), np.float32)) @ mixing
            points += 0.2 * rng.standard_normal((rows, channels), np.float32)
            activations[start : start + rows] = np.maximum(points, 0)
            attribution = 0.05 * rng.standard_normal((rows, classes), np.float32)
            attribution[np.arange(rows), cluster_class[which]] += 1.0
            attributions[start : start + rows] = attribution
            image_index[start : start + rows] = rng.integers(0, len(photos), rows)
            position[start : start + rows] = rng.integers(1, 13, (rows, 2))
    return {"seconds": time.perf_counter() - started}


def flat_icons(path: str, sizes: list[int], icon_px: int = ICON_PX) -> dict:
    """Stand-in for render: each non-empty cell's icon is one flat colour (from its top class), a row at a time."""
    started = time.perf_counter()
    palette = np.random.default_rng(1).integers(30, 230, size=(CLASSES, 3), dtype=np.uint8)
    with h5py.File(path, "r+") as store:
        for size in sizes:
            grid = store[f"{LAYER}/grid/{size}"]
            kept = grid["count"][()] >= int(grid.attrs["min_count"])
            colour = np.where(kept[..., None], palette[np.maximum(grid["top_classes"][:, :, 0], 0)], 255)
            for name in ("icons", "icon_cosine", "icon_objective", "icon_done"):
                if name in grid:
                    del grid[name]
            icons = grid.create_dataset(
                "icons", (size, size, icon_px, icon_px, 3), np.uint8, chunks=(1, 1, icon_px, icon_px, 3)
            )
            for y in range(size):
                icons[y] = np.broadcast_to(colour[y][:, None, None, :], (size, icon_px, icon_px, 3))
            grid["icon_cosine"] = np.where(kept, 1.0, np.nan).astype(np.float32)
            grid["icon_objective"] = np.where(kept, 0.0, np.nan).astype(np.float32)
            grid["icon_done"] = kept
    return {"seconds": time.perf_counter() - started}


def project_case(path: str) -> dict:
    from atlas.stages.project import LayoutSettings, project_store

    started = time.perf_counter()
    layout = project_store(path, LAYER, LayoutSettings(**PAPER_UMAP, seed=0), "cpu")
    return {"seconds": time.perf_counter() - started, "trustworthiness": _trustworthiness(path, layout)}


def _trustworthiness(path: str, layout: np.ndarray, samples: int = 3000) -> float:
    """sklearn's trustworthiness (10 neighbours, cosine) of the same evenly strided rows of every layout."""
    from sklearn.manifold import trustworthiness

    rows = np.linspace(0, len(layout) - 1, samples).astype(np.int64)
    with h5py.File(path) as store:
        x = store[f"{LAYER}/activations"][rows]
    return round(float(trustworthiness(x, layout[rows], n_neighbors=10, metric="cosine")), 4)


def grid_case(path: str) -> dict:
    from atlas.stages.grid import grid_store

    started = time.perf_counter()
    counts = grid_store(path, LAYER, sizes=SIZES)
    filled = "/".join(str(int((counts[size] >= 6).sum())) for size in SIZES)
    return {"seconds": time.perf_counter() - started, "cells_filled": filled}


def compose_case(path: str, out: str) -> dict:
    from atlas.stages.compose import ComposeSettings, compose_run

    started = time.perf_counter()
    compose_run(path, out, [LAYER], settings=ComposeSettings(examples=4))
    seconds = time.perf_counter() - started
    cells = Path(out) / f"layer-{LAYER}" / f"grid-{max(SIZES)}" / "cells.json"
    return {"seconds": seconds, "cells_json_mib": round(cells.stat().st_size / 2**20, 1)}


def umap_learn_case(path: str) -> dict:
    """umap-learn as a user would call it on the store's activations (loaded whole: it needs them in memory)."""
    import warnings

    import umap

    with h5py.File(path) as store:
        x = store[f"{LAYER}/activations"][()]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value")
        layout = umap.UMAP(**PAPER_UMAP).fit_transform(x)
    return {"seconds": time.perf_counter() - started, "trustworthiness": _trustworthiness(path, layout)}


def _chromium_rss_mib(profile: Path) -> float:
    """Resident memory of every Chromium process of this profile (browser, renderer, GPU, utility)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(profile).encode() not in command:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return round(total / 1024, 1)


def viewer_case(folder: Path, grid: int = max(SIZES), fixed: bool = False, filled: bool = False) -> dict:
    """Open the composed folder in headless Chromium, zoom in until `grid` shows (or, `fixed`, open that grid's
    atlas.png from a link), hover a non-empty cell; time and memory."""
    from tests.browser import served_page

    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    screenshot = (
        Path(__file__).with_name("scale") / f"viewer-{grid}{'-fixed' if fixed else ''}{'-filled' if filled else ''}.png"
    )
    screenshot.parent.mkdir(exist_ok=True)
    with served_page(folder, profile, {"width": 1400, "height": 900}) as (page, url, errors):
        started = time.perf_counter()
        page.goto(f"{url}#atlas=layer-{LAYER}&grid={grid}" if fixed else url)
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()", timeout=60_000)
        home_s = time.perf_counter() - started
        paint = page.evaluate(
            "() => (performance.getEntriesByName('first-contentful-paint')[0] || {startTime: NaN}).startTime"
        )
        # zoom on the centre until the pyramid shows the finest grid, then hover the cell under the centre
        zoomed = time.perf_counter()
        for _ in range(0 if fixed else 40):  # the viewer picks the grid on its next frame: one step per frame
            if page.locator("#status").get_attribute("data-grid") == str(grid):
                break
            page.evaluate("() => window.atlasViewer.viewport.zoomBy(1.5, undefined, true)")
            page.wait_for_timeout(50)
        page.wait_for_function(f"document.getElementById('status').dataset.grid === '{grid}'", timeout=60_000)
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()", timeout=60_000)
        zoom_s = time.perf_counter() - zoomed
        x, y = _cell_near_centre(page, folder, grid)
        page.evaluate(  # centre the cell: on a sparse grid the nearest full one may be off screen
            "([x, y, grid]) => { const item = window.atlasShownItem(); const side = item.getContentSize().x / grid;"
            " window.atlasViewer.viewport.panTo(item.imageToViewportCoordinates("
            "   new OpenSeadragon.Point((x + 0.5) * side, (y + 0.5) * side)), true); }",
            [x, y, grid],
        )
        page.wait_for_timeout(50)
        point = page.evaluate(
            "([x, y, grid]) => { const item = window.atlasShownItem();"
            " const side = item.getContentSize().x / grid;"
            " const p = item.imageToViewerElementCoordinates("
            "   new OpenSeadragon.Point((x + 0.5) * side, (y + 0.5) * side));"
            " const r = window.atlasViewer.canvas.getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }",
            [x, y, grid],
        )
        hovered = time.perf_counter()
        page.mouse.move(*point)
        info = page.locator(f'#info[data-grid="{grid}"][data-x="{x}"][data-y="{y}"]')
        info.wait_for(timeout=60_000)
        hover_s = time.perf_counter() - hovered
        classes = info.locator(".classes .name").count()
        examples = info.locator(".examples img").count()
        page.screenshot(path=str(screenshot))
        heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : 0")
        rss = _chromium_rss_mib(profile)
    return {
        "first_paint_s": round(paint / 1000, 2),
        "seconds": home_s,
        "zoom_to_grid_s": zoom_s,
        "hover_s": hover_s,
        "hover_classes": classes,
        "hover_examples": examples,
        "browser_rss_mib": rss,
        "js_heap_mib": round(heap / 2**20, 1),
        "errors": len(errors),
        "screenshot": str(screenshot.relative_to(Path(__file__).parent)),
    }


def _cell_near_centre(page: object, folder: Path, grid: int) -> tuple[int, int]:
    """(x, y) of the non-empty cell of `grid` closest to the centre of the view."""
    import json

    cells = json.loads((folder / f"layer-{LAYER}" / f"grid-{grid}" / "cells.json").read_text())["cells"]
    centre = page.evaluate(
        "() => { const v = window.atlasViewer, item = window.atlasShownItem();"
        " const p = item.viewportToImageCoordinates(v.viewport.getCenter(true));"
        " return [p.x / item.getContentSize().x, p.y / item.getContentSize().y]; }"
    )
    full = [c for c in cells if not c["empty"]]
    best = min(full, key=lambda c: ((c["x"] + 0.5) / grid - centre[0]) ** 2 + ((c["y"] + 0.5) / grid - centre[1]) ** 2)
    return best["x"], best["y"]


def _size_mib(path: Path) -> float:
    return round(path.stat().st_size / 2**20)


def _folder_mib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20)


def _free_page_cache(path: Path) -> None:
    """Drop the store from the page cache (best effort), so each stage reads it as a later run would: from disk."""
    os.sync()  # dirty pages cannot be dropped
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except OSError:
        pass


def run_size(n: int, folder: Path, umap_timeout: float | None) -> list[dict]:
    """Every stage at `n` rows; the store and the composed run stay in `folder`."""
    store = folder / "store.h5"
    out = folder / "run"
    rows = []

    def row(stage: str, result: dict | None, note: str = "") -> None:
        measured = {"stage": stage, "rows": n, **(result or {}), "store_mib": _size_mib(store)}
        rows.append({**measured, "note": note} if note else measured)
        print(rows[-1], flush=True)

    row("write store (synthetic)", in_subprocess("benchmarks.bench_scale", "write_paper_store", path=str(store), n=n))
    _free_page_cache(store)
    row("project (ours: UMAP 50/0.05/cosine)", in_subprocess("benchmarks.bench_scale", "project_case", path=str(store)))
    umap = None
    if umap_timeout and n <= UMAP_LEARN_MAX_ROWS:
        umap = in_subprocess("benchmarks.bench_scale", "umap_learn_case", timeout=umap_timeout, path=str(store))
    ran = umap_timeout and n <= UMAP_LEARN_MAX_ROWS
    row(
        "project baseline: umap-learn UMAP(50/0.05/cosine), its defaults",
        umap,
        "" if umap else f"did not finish within {umap_timeout:.0f} s" if ran else "not run (SCALE_UMAP_ROWS)",
    )
    if STAGES == "project":
        return rows
    _free_page_cache(store)
    row("grid 20/40/80/160", in_subprocess("benchmarks.bench_scale", "grid_case", path=str(store)))
    row(
        "render stand-in: flat-colour icons (not render)",
        in_subprocess("benchmarks.bench_scale", "flat_icons", path=str(store), sizes=SIZES),
        "one colour per cell, 80 px; no optimisation",
    )
    _free_page_cache(store)
    composed = in_subprocess("benchmarks.bench_scale", "compose_case", path=str(store), out=str(out))
    row("compose (4 examples per cell)", {**composed, "run_mib": _folder_mib(out)}, "icons are flat colours")
    row("viewer: zoom in to 160x160 (headless Chromium)", viewer_case(out), "RSS: all Chromium processes")
    row("viewer: 160x160 atlas.png from a link", viewer_case(out, fixed=True), "RSS: all Chromium processes")
    return rows


def spread_layout(path: str, seed: int = 0) -> dict:
    """Stand-in for project: a layout spread over the square (50 overlapping blobs, bench_grid's), so that the
    160 x 160 grid is nearly full, as a real atlas's is, where UMAP of the synthetic clusters fills ~4 % of it."""
    rng = np.random.default_rng(seed)
    centres = rng.random((50, 2))
    with h5py.File(path, "r+") as store:
        n = store[f"{LAYER}/activations"].shape[0]
        if f"{LAYER}/layout" in store:
            del store[f"{LAYER}/layout"]
        points = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.08, (n, 2))
        store[f"{LAYER}/layout"] = np.clip(points, 0.0, 1.0).astype(np.float32)
    return {"seconds": 0.0}


def run_filled(n: int = max(ROWS)) -> list[dict]:
    """grid, stand-in icons, compose and the viewer on a nearly full 160 x 160 grid (`spread_layout`, no project)."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary:
        store, out = Path(temporary) / "store.h5", Path(temporary) / "run"
        in_subprocess("benchmarks.bench_scale", "write_paper_store", path=str(store), n=n)
        spread_layout(str(store))
        stages = [
            ("grid 20/40/80/160, spread layout", "grid_case", {"path": str(store)}),
            ("render stand-in: flat-colour icons (not render)", "flat_icons", {"path": str(store), "sizes": SIZES}),
            ("compose (4 examples per cell), spread layout", "compose_case", {"path": str(store), "out": str(out)}),
        ]
        for stage, function, arguments in stages:
            _free_page_cache(store)
            rows.append({"stage": stage, "rows": n, **in_subprocess("benchmarks.bench_scale", function, **arguments)})
            print(rows[-1], flush=True)
        rows.append({"stage": "viewer: zoom in to 160x160, spread layout", "rows": n, **viewer_case(out, filled=True)})
    return rows


def run(sizes: tuple[int, ...] = ROWS, umap_timeout: float = UMAP_LEARN_TIMEOUT_S) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary:
        for n in sizes:
            folder = Path(temporary) / str(n)
            folder.mkdir()
            rows += run_size(n, folder, umap_timeout)
            (folder / "store.h5").unlink()  # 6 GB at 1M: one store on disk at a time
    smallest = {row["stage"]: row for row in rows if row["rows"] == min(sizes)}
    for row in rows:
        base = smallest.get(row["stage"])
        if row["rows"] != min(sizes) and base and base.get("seconds") and row.get("seconds"):
            row["x_100k"] = round(row["seconds"] / base["seconds"], 2)
    if STAGES != "project":
        rows += run_filled(max(sizes))
    for row in rows:
        if "peak_rss_mib" in row:
            row["within_6_gib"] = row["peak_rss_mib"] <= LIMIT_MIB
    return rows
