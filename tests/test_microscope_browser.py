"""The microscope site in headless Chromium: home -> model -> layer -> unit, its images, and its atlas cell."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.browser import ARTIFACTS, needs_chromium, served_page
from tests.test_microscope import LAYER, build_site

ALL_IMAGES_LOADED = "[...document.images].every(img => img.complete && img.naturalWidth > 0)"


@needs_chromium
def test_unit_pages_show_their_lenses_and_link_to_the_atlas_cell(tmp_path: Path) -> None:
    run = build_site(tmp_path, units="4")
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 900}) as (page, url, errors):
        page.goto(url)
        page.get_by_role("link", name="tiny").click()
        page.locator(f'.graph [data-layer="{LAYER}"]').click()  # the model graph's node links to the layer page
        page.wait_for_url(re.compile(rf"/tiny/{LAYER}/index\.html$"))
        assert page.locator("#units a.unit").count() == 4
        page.wait_for_function(ALL_IMAGES_LOADED)  # unit thumbnails, DeepDream, photos and caricatures
        assert page.locator(".caricature img").count() == 4
        page.fill("#jump input", "2")  # the filter keeps unit 2 only; Enter opens it
        assert page.locator("#units a.unit:visible").count() == 1
        page.press("#jump input", "Enter")
        page.wait_for_url(re.compile(rf"/{LAYER}/2\.html$"))
        page.wait_for_function(ALL_IMAGES_LOADED)  # visualisation, whole images and patches
        assert page.locator(".example").count() == 3
        assert page.locator(".example .box").count() == 3
        screenshot = tmp_path / "microscope.png"
        page.screenshot(path=str(screenshot), full_page=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, ARTIFACTS / "microscope-unit.png")
        page.keyboard.press("ArrowRight")
        page.wait_for_url(re.compile(rf"/{LAYER}/3\.html$"))
        page.keyboard.press("ArrowLeft")
        page.wait_for_url(re.compile(rf"/{LAYER}/2\.html$"))
        link = page.locator("a.atlas-cell").last  # the finest grid's cell
        grid, x, y = re.search(r"grid=(\d+)&cell=(\d+),(\d+)$", link.get_attribute("href")).groups()
        link.click()
        page.wait_for_url(re.compile(r"/atlas\.html#"))
        page.locator(f'#info[data-grid="{grid}"][data-x="{x}"][data-y="{y}"]').wait_for()
        page.locator(".cell-highlight.pinned").wait_for()
        assert page.locator("#grid").input_value() == grid
        assert f"cell={x}%2C{y}" in page.url or f"cell={x},{y}" in page.url  # the hash keeps the cell
    assert not errors, errors


@needs_chromium
def test_a_mixed4c_unit_links_to_its_mixed4b_inputs_and_they_link_back(tmp_path: Path) -> None:
    from tests.test_circuits import A
    from tests.test_microscope import build_two_layer_site

    run = build_two_layer_site(tmp_path)
    shots = {}
    with served_page(run, tmp_path / "chromium-profile", {"width": 1200, "height": 900}) as (page, url, errors):
        page.goto(url)
        page.get_by_role("link", name="hand-set").first.click()
        page.wait_for_url(re.compile(r"/hand-set/index\.html$"))
        assert page.locator(".graph g.node").count() >= 2
        shots["model"] = page.screenshot(full_page=True)
        page.locator('.graph [data-layer="mixed4c"]').click()
        page.wait_for_url(re.compile(r"/hand-set/mixed4c/index\.html$"))
        page.wait_for_function(ALL_IMAGES_LOADED)  # with the photo dreamt at mixed4b and at mixed4c
        assert page.locator(".dreams .dream img").count() == 3
        shots["layer"] = page.screenshot(full_page=True)
        page.locator('#units a.unit[data-unit="0"]').click()
        page.wait_for_url(re.compile(r"/hand-set/mixed4c/0\.html$"))
        page.wait_for_function(ALL_IMAGES_LOADED)  # the inputs' thumbnails and weight maps included
        shots["unit"] = page.screenshot(full_page=True)
        first = page.locator(".circuit .inputs.positive a.input").first  # the expanded weights' strongest input
        assert first.get_attribute("data-unit") == str(A)
        first.click()
        page.wait_for_url(re.compile(rf"/hand-set/mixed4b/{A}\.html$"))
        page.locator("a.user").first.click()  # back up through "Used by"
        page.wait_for_url(re.compile(r"/hand-set/mixed4c/0\.html$"))
    assert not errors, errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name, png in shots.items():
        (ARTIFACTS / f"microscope-circuit-{name}.png").write_bytes(png)
