"""The viewer in headless Chromium: it opens a composed run, zooms to the finer grid and shows a hovered cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from atlas.compose import ComposeSettings, compose_run
from tests.browser import ARTIFACTS, needs_chromium, served_page
from tests.test_compose import write_rendered_store

COARSE, FINE, ICON_PX = 10, 40, 80  # 3200 px atlas: the home view is small enough to show the coarse grid


@needs_chromium
def test_viewer_zooms_and_shows_the_hovered_cell(tmp_path: Path) -> None:
    store = write_rendered_store(tmp_path, sizes=(COARSE, FINE), n=3000, icon_px=ICON_PX)
    run = tmp_path / "run"
    compose_run(store, run, settings=ComposeSettings(examples=2))
    # a second atlas of the same layer, as a class atlas will be: the viewer offers a class switch
    manifest = json.loads((run / "atlases.json").read_text())
    layer_atlas = manifest["atlases"][0]
    manifest["atlases"].append(
        {**layer_atlas, "id": "class-3", "kind": "class", "class": "class 3", "title": "class 3"}
    )
    (run / "atlases.json").write_text(json.dumps(manifest))
    with h5py.File(store) as f:
        grid = f[f"mixed4c/grid/{FINE}"]
        count, top, min_count = grid["count"][()], grid["top_classes"][()], grid.attrs["min_count"]
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 800}) as (page, url, errors):
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("window.atlasViewer.world.getItemAt(0).getFullyLoaded()")
        assert page.locator("#status").get_attribute("data-grid") == str(COARSE)
        assert page.locator("#class option").all_inner_texts() == ["all samples", "class 3"]
        box = page.locator("#atlas").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(6):  # scroll-zoom in until the pyramid switches to the fine grid
            page.mouse.wheel(0, -300)
            page.wait_for_timeout(150)
        page.wait_for_function(f"document.getElementById('status').dataset.grid === '{FINE}'", timeout=10_000)
        page.wait_for_function("window.atlasViewer.world.getItemAt(0).getFullyLoaded()")
        # hover the centre of the non-empty fine cell closest to the middle of the view
        centre = page.evaluate(
            "() => { const v = window.atlasViewer, item = v.world.getItemAt(0);"
            " const p = item.viewportToImageCoordinates(v.viewport.getCenter(true)); return [p.x, p.y]; }"
        )
        side = ICON_PX
        ys, xs = np.nonzero(count >= min_count)
        nearest = np.argmin((xs + 0.5 - centre[0] / side) ** 2 + (ys + 0.5 - centre[1] / side) ** 2)
        y, x = int(ys[nearest]), int(xs[nearest])
        point = page.evaluate(
            "([x, y]) => { const item = window.atlasViewer.world.getItemAt(0);"
            " const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));"
            " const r = window.atlasViewer.canvas.getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }",
            [(x + 0.5) * side, (y + 0.5) * side],
        )
        page.mouse.move(*point)
        info = page.locator(f'#info[data-grid="{FINE}"][data-x="{x}"][data-y="{y}"]')
        info.wait_for()
        assert info.locator(".count").inner_text() == str(count[y, x])
        names = info.locator(".classes .name").all_inner_texts()
        assert names == [f"class {k}" for k in top[y, x]]
        page.wait_for_function("[...document.querySelectorAll('#info .examples img')].every(img => img.complete)")
        loaded = page.evaluate("[...document.querySelectorAll('#info .examples img')].map(i => i.naturalWidth)")
        assert all(width > 0 for width in loaded)
        screenshot = tmp_path / "viewer.png"
        page.screenshot(path=str(screenshot))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, ARTIFACTS / "viewer.png")
        # a fixed grid shows that grid's atlas.png and its cells
        page.select_option("#grid", str(COARSE))
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.mouse.move(*point)
        page.locator(f'#info[data-grid="{COARSE}"][data-x="{x * COARSE // FINE}"]').wait_for()
        page.select_option("#class", "class-3")
        page.wait_for_function("document.body.dataset.ready === '1'")
        assert page.locator("#title").inner_text() == "tiny · class 3"
        assert page.locator("#grid").input_value() == str(COARSE)  # the grid choice is kept
    assert not errors, errors


@needs_chromium
def test_viewer_shows_a_heatmap_cells_attribution_to_its_class(tmp_path: Path) -> None:
    store = write_rendered_store(tmp_path, sizes=(4,))
    run = tmp_path / "run"
    compose_run(store, run, heatmap_class=3, settings=ComposeSettings(examples=0))
    cells = json.loads((run / "heatmap-mixed4c-3/grid-4/cells.json").read_text())["cells"]
    cell = next(c for c in cells if not c["empty"])
    with served_page(run, tmp_path / "chromium-profile", {"width": 1000, "height": 700}) as (page, url, errors):
        page.goto(f"{url}#atlas=heatmap-mixed4c-3&grid=4&cell={cell['x']},{cell['y']}")  # a linked, pinned cell
        info = page.locator(f'#info[data-grid="4"][data-x="{cell["x"]}"][data-y="{cell["y"]}"]')
        info.wait_for()
        assert info.locator("dt").all_inner_texts()[-1] == "attribution to class 3"
        value = page.evaluate("v => Number(v).toPrecision(3)", cell["heatmap"]["attribution"])  # the viewer's format
        opacity = page.evaluate("v => Math.round(100 * v)", cell["heatmap"]["opacity"])
        assert info.locator(".heat").inner_text() == f"{value} (shown at {opacity} %)"
    assert not errors, errors
