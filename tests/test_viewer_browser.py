"""The viewer in headless Chromium: it opens a composed run, zooms to the finer grid and shows a hovered cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlas.patch import load_patch
from atlas.stages.compose import ComposeSettings, compose_run, heatmap_opacity
from atlas.store import STR
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
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        assert page.locator("#status").get_attribute("data-grid") == str(COARSE)
        assert page.locator("#class option").all_inner_texts() == ["all samples", "class 3"]
        box = page.locator("#atlas").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(12):  # scroll-zoom in until the viewer switches to the fine grid
            page.mouse.wheel(0, -300)
            page.wait_for_timeout(150)
            if page.locator("#status").get_attribute("data-grid") == str(FINE):
                break
        page.wait_for_function(f"document.getElementById('status').dataset.grid === '{FINE}'", timeout=10_000)
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        # hover the centre of the non-empty fine cell closest to the middle of the view
        centre = page.evaluate(
            "() => { const v = window.atlasViewer, item = window.atlasShownItem();"
            " const p = item.viewportToImageCoordinates(v.viewport.getCenter(true)); return [p.x, p.y]; }"
        )
        side = ICON_PX
        ys, xs = np.nonzero(count >= min_count)
        nearest = np.argmin((xs + 0.5 - centre[0] / side) ** 2 + (ys + 0.5 - centre[1] / side) ** 2)
        y, x = int(ys[nearest]), int(xs[nearest])
        point = page.evaluate(
            "([x, y]) => { const item = window.atlasShownItem();"
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
        cells = json.loads((run / f"layer-mixed4c/grid-{FINE}/cells.json").read_text())["cells"]
        examples = next(c for c in cells if (c["x"], c["y"]) == (x, y))["examples"]
        captions = [e["class"] or Path(e["image"]).name for e in examples]  # the photo's class where labelled
        assert info.locator(".examples figcaption").all_inner_texts() == captions
        assert any(e["class"] for e in examples)
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
    cell = next(c for c in cells if not c["empty"] and c["x"] != c["y"])  # a transposed cell is another
    with served_page(run, tmp_path / "chromium-profile", {"width": 1000, "height": 700}) as (page, url, errors):
        page.goto(f"{url}#atlas=heatmap-mixed4c-3&grid=4&cell={cell['x']},{cell['y']}")  # a linked, pinned cell
        info = page.locator(f'#info[data-grid="4"][data-x="{cell["x"]}"][data-y="{cell["y"]}"]')
        info.wait_for()
        assert info.locator("dt").all_inner_texts()[-1] == "attribution to class 3"
        value = page.evaluate("v => Number(v).toPrecision(3)", cell["heatmap"]["attribution"])  # the viewer's format
        opacity = page.evaluate("v => Math.round(100 * v)", cell["heatmap"]["opacity"])
        assert info.locator(".heat").inner_text() == f"{value} (shown at {opacity} %)"
        # the viewer's x,y is the patch spec's: the spec it shows loads this cell's icon
        spec = info.locator(".patch-spec").inner_text()
        assert spec == f"store.h5:mixed4c:4:x={cell['x']},y={cell['y']}"
    with h5py.File(store) as f:
        icon = f["mixed4c/grid/4/icons"][cell["y"], cell["x"]]
    patch = load_patch(spec.replace("store.h5", str(store), 1))
    assert np.array_equal((patch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), icon)
    assert not errors, errors


SHARK = 2  # the class chosen by name below; the store never ran class-atlas for it


def _named_run(tmp_path: Path, sizes: tuple[int, ...]) -> tuple[Path, Path]:
    """A rendered store whose classes have ImageNet-like names, "great white shark" among them, and its composed
    run folder (no examples): (store, run)."""
    store = write_rendered_store(tmp_path, sizes=sizes, n=3000, icon_px=ICON_PX)
    names = [f"class {k}" for k in range(10)]
    names[SHARK] = "great white shark"
    with h5py.File(store, "a") as f:
        f.create_dataset("classes", data=np.array(names, dtype=object), dtype=STR)
    run = tmp_path / "run"
    compose_run(store, run, settings=ComposeSettings(examples=0))
    return store, run


def _shade_opacity(page: object, grid: int) -> np.ndarray:
    """The opacity [G, G] each cell is shown at under the class shading (1 - the white overlay's alpha)."""
    page.wait_for_function(f"document.querySelector('.class-shade')?.dataset.grid === '{grid}'")
    alpha = page.evaluate(
        "() => { const c = document.querySelector('.class-shade');"
        " return [...c.getContext('2d').getImageData(0, 0, c.width, c.height).data].filter((_, i) => i % 4 === 3); }"
    )
    return 1 - np.array(alpha).reshape(grid, grid) / 255


@needs_chromium
def test_any_class_shades_the_cells_from_the_stores_attributions(tmp_path: Path) -> None:
    store, run = _named_run(tmp_path, (COARSE, FINE))
    with h5py.File(store) as f:
        grid = f[f"mixed4c/grid/{COARSE}"]
        attribution, count = grid["attribution"][:, :, SHARK], grid["count"][()]
        expected = heatmap_opacity(attribution, count, int(grid.attrs["min_count"]))
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 800}) as (page, url, errors):
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("document.querySelectorAll('#class-names option').length === 10")
        search = page.locator("#class-search")
        search.fill("no such class")
        search.press("Enter")
        assert "unknown" in search.get_attribute("class")
        assert page.locator(".class-shade").count() == 0
        search.fill("Great White Shark")  # type-ahead over every class name, any case
        search.press("Enter")
        shown = _shade_opacity(page, COARSE)
        np.testing.assert_allclose(shown, expected, atol=0.02)  # int8 attributions, 8-bit alpha
        assert page.locator("#class-atlas").is_hidden()  # no class atlas of the shark to offer
        y, x = np.unravel_index(np.argmax(np.where(count >= 3, attribution, -np.inf)), count.shape)
        page.goto(f"{url}#atlas=layer-mixed4c&grid={COARSE}&cell={x},{y}")
        page.reload()
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("document.querySelectorAll('#class-names option').length === 10")
        search.fill("great white shark")
        search.press("Enter")
        value = page.locator(f'#info[data-x="{x}"][data-y="{y}"] .class-attribution')
        value.wait_for()
        shown_value, rest = value.inner_text().split(" ", 1)
        assert float(shown_value) == pytest.approx(float(attribution[y, x]), abs=float(np.abs(attribution).max()) / 127)
        assert rest == "(shown at 100 %)"  # the cell with the largest attribution
        screenshot = tmp_path / "class-on-demand.png"
        page.screenshot(path=str(screenshot))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, ARTIFACTS / "class-on-demand.png")
        search.fill("")
        search.press("Enter")
        page.wait_for_function("document.querySelector('.class-shade') === null")
    assert not errors, errors


@needs_chromium
def test_an_existing_class_atlas_is_offered_beside_the_shading(tmp_path: Path) -> None:
    store, run = _named_run(tmp_path, (COARSE,))
    manifest = json.loads((run / "atlases.json").read_text())
    layer_atlas = manifest["atlases"][0]
    shark_atlas = {**layer_atlas, "id": "class-mixed4c-2", "kind": "class", "class": "great white shark"}
    manifest["atlases"].append({**shark_atlas, "class_index": SHARK, "title": "mixed4c: great white shark"})
    (run / "atlases.json").write_text(json.dumps(manifest))
    with served_page(run, tmp_path / "chromium-profile", {"width": 1000, "height": 700}) as (page, url, errors):
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#class-names option').length === 10")
        page.locator("#class-search").fill("great white shark")
        page.locator("#class-search").press("Enter")
        link = page.locator("#class-atlas")
        assert link.inner_text() == "open the class atlas of great white shark"
        link.click()
        page.wait_for_function("document.body.dataset.ready === '1'")
        assert page.locator("#title").inner_text() == "tiny · mixed4c: great white shark"
    assert not errors, errors


def _zoom_until(page: object, grid: int, factor: float) -> None:
    """Zoom about the centre by `factor` a step at a time until the status names `grid`."""
    for _ in range(40):
        if page.locator("#status").get_attribute("data-grid") == str(grid):
            break
        page.evaluate("f => { const v = window.atlasViewer.viewport; v.zoomBy(f, v.getCenter(true), true); }", factor)
        page.wait_for_timeout(50)  # a frame or two: the viewer updates the grid as the viewport changes
    page.wait_for_function(f"document.getElementById('status').dataset.grid === '{grid}'")
    page.wait_for_function("window.atlasShownItem().getFullyLoaded()")


@needs_chromium
def test_zoom_switches_the_grid_and_its_shading(tmp_path: Path) -> None:
    middle = 20
    store, run = _named_run(tmp_path, (COARSE, middle, FINE))
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 800}) as (page, url, errors):
        tiles: list[str] = []
        page.on("request", lambda request: tiles.append(request.url) if "tiles_files" in request.url else None)
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        # the home view is the coarsest grid, and only its pyramid is fetched
        assert page.locator("#status").get_attribute("data-grid") == str(COARSE)
        assert tiles and all(f"grid-{COARSE}/" in tile for tile in tiles)
        page.locator("#class-search").fill("great white shark")
        page.locator("#class-search").press("Enter")
        page.wait_for_function(f"document.querySelector('.class-shade')?.dataset.grid === '{COARSE}'")
        _zoom_until(page, middle, 1.1)
        _zoom_until(page, FINE, 1.1)
        assert any(f"grid-{FINE}/" in tile for tile in tiles)
        opacities = page.evaluate(
            "() => { const w = window.atlasViewer.world; return [...Array(w.getItemCount()).keys()]"
            ".map(i => w.getItemAt(i).getOpacity()); }"
        )
        assert opacities == [0, 0, 1]  # the fine grid alone is drawn
        with h5py.File(store) as f:
            grid = f[f"mixed4c/grid/{FINE}"]
            expected = heatmap_opacity(grid["attribution"][:, :, SHARK], grid["count"][()], 3)
        np.testing.assert_allclose(_shade_opacity(page, FINE), expected, atol=0.02)  # the fine grid's shading
        _zoom_until(page, COARSE, 1 / 1.1)  # zooming out goes back through the grids
        page.evaluate("() => window.atlasViewer.viewport.goHome(true)")
        page.wait_for_function(f"document.getElementById('status').dataset.grid === '{COARSE}'")
    assert not errors, errors


@needs_chromium
def test_the_home_view_shows_the_coarsest_grid_even_when_every_grid_is_legible_there(tmp_path: Path) -> None:
    """Grids of 2 and 4 cells of 80 px: at home even the finer one's cells are large, yet the home view is the
    coarsest grid, zooming in reaches the finer one and zooming out comes back (only the Grid box could, before)."""
    _store, run = _named_run(tmp_path, (2, 4))
    with served_page(run, tmp_path / "chromium-profile", {"width": 1400, "height": 900}) as (page, url, errors):
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        assert page.locator("#status").get_attribute("data-grid") == "2"
        _zoom_until(page, 4, 1.1)
        _zoom_until(page, 2, 1 / 1.1)
    assert not errors, errors


@needs_chromium
def test_a_copied_link_opens_the_same_view(tmp_path: Path) -> None:
    store, run = _named_run(tmp_path, (COARSE, FINE))
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 800}) as (page, url, errors):
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("document.querySelectorAll('#class-names option').length === 10")
        page.locator("#class-search").fill("great white shark")
        page.locator("#class-search").press("Enter")
        _zoom_until(page, FINE, 1.2)
        with h5py.File(store) as f:
            count = f[f"mixed4c/grid/{FINE}/count"][()]
        y, x = np.argwhere(count >= 3)[len(np.argwhere(count >= 3)) // 2]  # a cell with samples, off the centre
        page.evaluate(
            "p => window.atlasViewer.viewport.panTo(new OpenSeadragon.Point(p[0], p[1]), true)",
            [(x + 0.5) / FINE, (y + 0.5) / FINE],
        )
        box = page.locator("#atlas").bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # pin the cell in the middle
        pinned = page.locator(f'#info[data-grid="{FINE}"]')
        pinned.wait_for()
        cell = (pinned.get_attribute("data-x"), pinned.get_attribute("data-y"))
        assert cell == (str(x), str(y))
        page.wait_for_timeout(300)  # past the pan's animation-finish, which writes the URL too
        before = page.evaluate(
            "() => { const v = window.atlasViewer.viewport, c = v.getCenter(); return [v.getZoom(), c.x, c.y]; }"
        )
        page.locator("#copy-link").click()
        page.wait_for_function("document.getElementById('status').textContent === 'link copied'")
        link = page.evaluate("() => navigator.clipboard.readText()")
        assert link == page.evaluate("() => location.href")
        assert f"cell={cell[0]}%2C{cell[1]}" in link and "class=2" in link
        page.goto("about:blank")
        page.goto(link)
        page.wait_for_function("document.body.dataset.ready === '1'")
        restored = page.locator(f'#info[data-grid="{FINE}"][data-x="{cell[0]}"][data-y="{cell[1]}"]')
        restored.wait_for()  # the pinned cell, with its panel
        after = page.evaluate(
            "() => { const v = window.atlasViewer.viewport, c = v.getCenter(); return [v.getZoom(), c.x, c.y]; }"
        )
        np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3)
        assert page.locator("#status").get_attribute("data-grid") == str(FINE)
        page.wait_for_function(f"document.querySelector('.class-shade')?.dataset.grid === '{FINE}'")
        assert page.locator("#class-search").input_value() == "great white shark"
        assert restored.locator(".class-attribution").count() == 1
    assert not errors, errors


@needs_chromium
def test_the_layer_menu_is_in_natural_order(tmp_path: Path) -> None:
    store = write_rendered_store(tmp_path, sizes=(4,))
    run = tmp_path / "run"
    compose_run(store, run, settings=ComposeSettings(examples=0))
    manifest = json.loads((run / "atlases.json").read_text())
    atlas = manifest["atlases"][0]
    layers = ["_blocks.10", "_blocks.6", "_blocks.2", "_blocks.6.se"]
    manifest["atlases"] = [{**atlas, "id": f"layer-{layer}", "layer": layer, "title": layer} for layer in layers]
    (run / "atlases.json").write_text(json.dumps(manifest))
    with served_page(run, tmp_path / "chromium-profile", {"width": 1000, "height": 700}) as (page, url, errors):
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        assert page.locator("#layer option").all_inner_texts() == [
            "_blocks.2",
            "_blocks.6",
            "_blocks.6.se",
            "_blocks.10",
        ]
    assert not errors, errors


def _labels(page: object) -> list[dict]:
    return page.evaluate(
        "() => [...document.querySelectorAll('.labels .label')].map(l => ({text: l.textContent, title: l.title,"
        " x: Number(l.dataset.x), y: Number(l.dataset.y), grid: Number(l.dataset.grid), step: Number(l.dataset.step)}))"
    )


@needs_chromium
def test_labels_are_text_that_follows_the_zoom_and_the_class(tmp_path: Path) -> None:
    store, run = _named_run(tmp_path, (COARSE, FINE))
    with h5py.File(store) as f:
        grids = {size: f[f"mixed4c/grid/{size}"] for size in (COARSE, FINE)}
        count = {size: g["count"][()] for size, g in grids.items()}
        attribution = {size: g["attribution"][:, :, SHARK] for size, g in grids.items()}
        top = {size: g["top_classes"][()] if "top_classes" in g else None for size, g in grids.items()}
    names = [f"class {k}" for k in range(10)]
    names[SHARK] = "great white shark"
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 800}) as (page, url, errors):
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("document.querySelectorAll('.labels .label').length > 0")
        home = _labels(page)
        # zoomed out: one label per block of cells, the densest cell's top class, in full (cut only by CSS)
        assert all(label["grid"] == COARSE and label["step"] > 1 for label in home)
        assert len(home) < (count[COARSE] >= 3).sum()
        for label in home:
            x, y, step = label["x"], label["y"], label["step"]
            block = count[COARSE][y - y % step : y - y % step + step, x - x % step : x - x % step + step]
            assert count[COARSE][y, x] == block.max()
            assert label["text"] == label["title"]
        _zoom_until(page, FINE, 1.1)
        page.evaluate("() => window.atlasViewer.viewport.zoomBy(1.6, null, true)")
        page.wait_for_function("[...document.querySelectorAll('.labels .label')].every(l => l.dataset.step === '1')")
        # zoomed in: every cell in view with samples is labelled with its own top class
        labels = _labels(page)
        assert labels and all(label["grid"] == FINE for label in labels)
        for label in labels:
            assert label["title"] == names[top[FINE][label["y"], label["x"]][0]]
        page.evaluate("() => window.atlasViewer.viewport.goHome(true)")
        page.wait_for_function("[...document.querySelectorAll('.labels .label')].every(l => l.dataset.step !== '1')")
        # with a class chosen, each block's label is the cell most attributed to it, among those half shown or more
        page.locator("#class-search").fill("great white shark")
        page.locator("#class-search").press("Enter")
        page.wait_for_function("document.querySelector('.class-shade')?.dataset.class === '2'")
        opacity = heatmap_opacity(attribution[COARSE], count[COARSE], 3)
        ranked = _labels(page)
        assert ranked
        tolerance = np.abs(attribution[COARSE]).max() / 127
        for label in ranked:
            x, y, step = label["x"], label["y"], label["step"]
            rows, cols = slice(y - y % step, y - y % step + step), slice(x - x % step, x - x % step + step)
            shown = np.where(opacity[rows, cols] >= 0.5, attribution[COARSE][rows, cols], -np.inf)
            assert opacity[y, x] >= 0.5 - 0.02 and attribution[COARSE][y, x] >= shown.max() - tolerance
        page.locator("#labels").uncheck()  # labels off
        page.wait_for_function("document.querySelectorAll('.labels .label').length === 0")
        assert "labels=0" in page.evaluate("() => location.hash")
    assert not errors, errors


LAYERS = ("mixed4c", "mixed5b")


def _two_layer_run(tmp_path: Path, size: int, icon_px: int) -> tuple[Path, Path]:
    """A store with two rendered layers over the same sample rows (laid out differently), composed."""
    store = write_rendered_store(tmp_path, sizes=(size,), n=600, icon_px=icon_px, seed=0)
    (tmp_path / "other").mkdir()
    other = write_rendered_store(tmp_path / "other", sizes=(size,), n=600, icon_px=icon_px, seed=1)
    with h5py.File(store, "a") as f, h5py.File(other) as g:
        g.copy("mixed4c", f, name="mixed5b")
        for key in ("image_index", "position"):  # the same samples: the same images, at the same places
            f[f"mixed5b/{key}"][...] = f[f"mixed4c/{key}"][()]
    run = tmp_path / "run"
    compose_run(store, run, settings=ComposeSettings(examples=0))
    return store, run


def _hover_cell(page: object, frame: object, x: int, y: int, icon_px: int) -> None:
    """Move the mouse over cell (x, y) of the atlas in `frame`, an iframe of `page`."""
    inside = frame.evaluate(
        "([x, y]) => { const item = window.atlasShownItem();"
        " const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));"
        " const r = window.atlasViewer.canvas.getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }",
        [(x + 0.5) * icon_px, (y + 0.5) * icon_px],
    )
    box = frame.frame_element().bounding_box()
    page.mouse.move(box["x"] + inside[0], box["y"] + inside[1], steps=4)


@needs_chromium
def test_layers_side_by_side_outline_where_a_hovered_cells_samples_fall_in_the_other_layer(tmp_path: Path) -> None:
    size, icon_px = 8, 40
    store, run = _two_layer_run(tmp_path, size, icon_px)
    manifest = json.loads((run / "atlases.json").read_text())
    first = next(a for a in manifest["atlases"] if a["layer"] == "mixed4c")
    # a class atlas of class 3 at mixed4c only (its files are the layer atlas's): the class row shows it there
    manifest["atlases"].append(
        {**first, "id": "class-mixed4c-3", "kind": "class", "class": "class 3", "class_index": 3}
    )
    (run / "atlases.json").write_text(json.dumps(manifest))
    with h5py.File(store) as f:
        cell_a, cell_b = f[f"mixed4c/grid/{size}/cell"][()], f[f"mixed5b/grid/{size}/cell"][()]
        count = f[f"mixed4c/grid/{size}/count"][()]
    y, x = np.unravel_index(np.argmax(count), count.shape)  # the fullest cell of mixed4c
    expected = set(cell_b[cell_a == y * size + x].tolist())
    assert 1 < len(expected) < size * size  # its samples fall in several cells of mixed5b, not everywhere
    with served_page(run, tmp_path / "chromium-profile", {"width": 1400, "height": 900}) as (page, url, errors):
        page.goto(f"{url}layers.html")
        page.wait_for_function("document.body.dataset.ready === '1'")
        assert page.locator(".panel h2").all_inner_texts()[0].startswith("mixed4c")
        frames = [page.frame_locator(f'iframe[data-atlas="layer-{layer}"]') for layer in LAYERS]
        for frame in frames:
            frame.locator("body[data-ready='1']").wait_for()
        source, target = (page.frame(url=lambda u, layer=layer: f"layer-{layer}" in u) for layer in LAYERS)
        source.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        target.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        _hover_cell(page, source, int(x), int(y), icon_px)
        target.wait_for_function("document.querySelector('.linked-cells')?.dataset.cells")
        outlined = target.evaluate("document.querySelector('.linked-cells').dataset.cells")
        assert {int(c) for c in outlined.split(",")} == expected
        # outlines, not fills: each outlined cell's middle stays clear, so its icon shows; its edge is drawn
        alphas = target.evaluate(
            "(grid) => { const c = document.querySelector('.linked-cells'); const s = c.width / grid;"
            " const g = c.getContext('2d'); return c.dataset.cells.split(',').map(Number).map((i) => {"
            " const x = (i % grid) * s, y = Math.floor(i / grid) * s;"
            " return [g.getImageData(x + s / 2, y + s / 2, 1, 1).data[3], g.getImageData(x, y + s / 2, 1, 1).data[3]];"
            " }); }",
            size,
        )
        assert all(middle == 0 and edge > 0 for middle, edge in alphas), alphas
        assert page.locator(".panel h2 .info").first.inner_text() == f"cell (x {x}, y {y}): {count[y, x]} samples"
        screenshot = tmp_path / "layers.png"
        page.screenshot(path=str(screenshot))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, ARTIFACTS / "layers.png")
        # hovering the other way: mixed5b's cell outlines mixed4c's cells of the same samples
        y2, x2 = divmod(int(cell_b[cell_a == y * size + x][0]), size)
        _hover_cell(page, target, x2, y2, icon_px)
        back = set(cell_a[cell_b == y2 * size + x2].tolist())
        source.wait_for_function("document.querySelector('.linked-cells')?.dataset.cells")
        got = source.evaluate("document.querySelector('.linked-cells').dataset.cells")
        assert {int(c) for c in got.split(",")} == back
        # a class: every layer shaded by it, and its class atlases in a second row
        page.fill("#class-search", "class 3")
        page.press("#class-search", "Enter")
        page.locator("#class-row .panel").first.wait_for()
        rows = page.locator("#class-row .panel")
        assert rows.count() == 2
        assert rows.nth(0).get_attribute("data-atlas") == "class-mixed4c-3"
        # the suggested command names the layer atlas's store: without STORE= it would look for another run
        assert f'make class-atlas STORE="{store.resolve()}" CLASS="class 3"' in rows.nth(1).inner_text()
        for frame in (source, target):
            frame.wait_for_function("document.querySelector('.class-shade')?.dataset.class === '3'")
    assert not errors, errors


def _add_accentuated_icons(store: Path, size: int, colour: tuple[int, int, int]) -> None:
    """A grid's second icon set, as `atlas render` with `accentuate` leaves it: every icon one solid colour."""
    with h5py.File(store, "a") as f:
        grid = f[f"mixed4c/grid/{size}"]
        shape = grid["icons"].shape
        accentuated = grid.create_group("accentuated")
        accentuated["icons"] = np.broadcast_to(np.array(colour, np.uint8), shape)
        for name in ("icon_cosine", "icon_objective"):
            accentuated[name] = grid[name][()]
        accentuated["icon_done"] = np.ones(shape[:2], bool)


def _shown_colour(page: object) -> list[int]:
    """The colour at the centre of the pinned cell's icon, read from the canvas OpenSeadragon draws."""
    return page.evaluate(
        "() => { const v = window.atlasViewer, c = v.drawer.canvas, r = c.getBoundingClientRect();"
        " const h = document.querySelector('.cell-highlight').getBoundingClientRect();"
        " const x = (h.left + h.width / 2 - r.left) * c.width / r.width;"
        " const y = (h.top + h.height / 2 - r.top) * c.height / r.height;"
        " return [...c.getContext('2d').getImageData(Math.round(x), Math.round(y), 1, 1).data.slice(0, 3)]; }"
    )


@needs_chromium
def test_the_icon_switch_shows_visualisations_accentuated_examples_and_examples(tmp_path: Path) -> None:
    """compose draws a grid's accentuated icons and its typical examples as atlases of their own; the viewer's Icons
    switch shows each at the same place, and a link keeps the choice."""
    store = write_rendered_store(tmp_path, sizes=(4,), icon_px=ICON_PX)
    _add_accentuated_icons(store, 4, (200, 30, 40))
    run = tmp_path / "run"
    compose_run(store, run, settings=ComposeSettings(examples=1))
    views = json.loads((run / "atlases.json").read_text())["atlases"][0]["grids"][0]["views"]
    assert views == {
        "visualisation": "layer-mixed4c/grid-4/tiles.dzi",
        "accentuated": "layer-mixed4c/grid-4/accentuated/tiles.dzi",
        "examples": "layer-mixed4c/grid-4/examples/tiles.dzi",
    }
    cells = json.loads((run / "layer-mixed4c/grid-4/cells.json").read_text())["cells"]
    cell = next(c for c in cells if not c["empty"] and c["examples"] and c["examples"][0]["patch"])
    with h5py.File(store) as f:
        visualisation = f["mixed4c/grid/4/icons"][cell["y"], cell["x"], 0, 0].tolist()
    with served_page(run, tmp_path / "chromium-profile", {"width": 1000, "height": 700}) as (page, url, errors):
        page.goto(f"{url}#grid=4&cell={cell['x']},{cell['y']}&labels=0")
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        assert not page.locator("#icons-choice").is_hidden()
        assert page.locator("#icons option").all_inner_texts() == [
            "feature visualisations", "accentuated examples", "dataset examples"
        ]  # fmt: skip
        assert np.abs(np.array(_shown_colour(page)) - visualisation).max() <= 8  # JPEG tiles
        page.select_option("#icons", "accentuated")
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        assert np.abs(np.array(_shown_colour(page)) - (200, 30, 40)).max() <= 8
        assert "icons=accentuated" in page.url and f"cell={cell['x']}%2C{cell['y']}" in page.url
        page.select_option("#icons", "examples")
        page.wait_for_function("document.body.dataset.ready === '1'")
        page.wait_for_function("window.atlasShownItem().getFullyLoaded()")
        shown = _shown_colour(page)
        assert np.abs(np.array(shown) - visualisation).max() > 8 and np.abs(np.array(shown) - (200, 30, 40)).max() > 8
        link = page.url
        page.goto("about:blank")
        page.goto(link)  # the link opens the examples again
        page.wait_for_function("document.body.dataset.ready === '1'")
        assert page.locator("#icons").input_value() == "examples"
    assert not errors, errors
