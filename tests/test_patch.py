"""The patch lab on tiny colour models whose right answers are known in closed form."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from atlas import AtlasError
from atlas import patch as lab
from atlas.images import ImageRecord, list_images
from atlas.models.classifier import Classifier
from pipelines.cli import main
from tests.synthetic import blank_png

SIZE = 32  # input side of the fake models: 32 px keeps every test fast
COLOURS = ["red", "green", "blue"]
RED, GREEN, BLUE = range(3)


class ChannelMeans(nn.Module):
    """Logits = 50 x the mean of each colour channel inside a window (fractions of the image)."""

    def __init__(self, window: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)):
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = self.window
        region = x[..., round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
        return 50.0 * region.mean(dim=(2, 3))


class Recorder(nn.Module):
    """Always says 'red'; keeps every input it sees."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.tensor([5.0, 0.0, 0.0]).expand(len(x), 3) + 0.0 * x.sum()


def colour_model(net: nn.Module | None = None) -> Classifier:
    """A Classifier over red/green/blue (also a `pkg.module:factory` for the CLI)."""
    net = net or ChannelMeans()
    return Classifier("colours", net, nn.Identity(), SIZE, COLOURS, "", "none", resize_size=SIZE)


def write_image(path: Path, rgb: tuple[float, float, float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.broadcast_to(np.round(np.array(rgb) * 255).astype(np.uint8), (SIZE, SIZE, 3))
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


def patch_of(rgb: tuple[float, float, float], side: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, side, side).clone()


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """red/: 2 images a blue patch of 0.6 flips (bluish background), 2 it cannot, 1 unreadable;
    green/: 2 red images (wrong before); blue/: 1 image (already the target)."""
    root = tmp_path / "data"
    for i in range(2):
        write_image(root / "red" / f"bluish{i}.png", (1.0, 0.0, 0.6))
        write_image(root / "red" / f"pure{i}.png", (1.0, 0.0, 0.0))
        write_image(root / "green" / f"mislabelled{i}.png", (1.0, 0.0, 0.0))
    write_image(root / "blue" / "sky.png", (0.0, 0.0, 1.0))
    (root / "red" / "broken.png").write_bytes(b"not a png")
    return root


def measure(model: Classifier, patch: torch.Tensor, records: list[ImageRecord], **kw) -> tuple[dict, list]:
    return lab.measure_patch(model, patch, records, BLUE, workers=0, batch_size=4, **kw)


# geometry -----------------------------------------------------------------------------------------
def test_corner_placement_is_a_fraction_of_the_free_space():
    # notebook: size = ratio * 224, position = fraction of (224 - size); 0.4 -> 90 px, free space 134
    assert lab.corner_placement(224, 0.4, "tl") == lab.Placement(0.4, "tl", 90, 0, 0)
    assert lab.corner_placement(224, 0.4, "tr") == lab.Placement(0.4, "tr", 90, 0, 134)
    assert lab.corner_placement(224, 0.4, "bl") == lab.Placement(0.4, "bl", 90, 134, 0)
    assert lab.corner_placement(224, 0.4, "br") == lab.Placement(0.4, "br", 90, 134, 134)
    assert lab.corner_placement(224, 1.0, "br") == lab.Placement(1.0, "br", 224, 0, 0)
    for ratio, corner in ((0.0, "tl"), (1.5, "tl"), (0.4, "middle")):
        with pytest.raises(AtlasError):
            lab.corner_placement(224, ratio, corner)


def test_paste_writes_each_tile_exactly_at_its_place_and_nothing_else():
    images = torch.rand(2, 3, 20, 20)
    tiles = [torch.arange(48.0).view(3, 4, 4) / 48, torch.full((3, 6, 6), 2.0)]
    places = [lab.Placement(0.2, "tl", 4, 3, 5), lab.Placement(0.3, "br", 6, 14, 14)]
    out = lab.paste(images, tiles, places)
    assert out.shape == (2, 2, 3, 20, 20)
    for p, (tile, place) in enumerate(zip(tiles, places, strict=True)):
        inside = torch.zeros(20, 20, dtype=torch.bool)
        inside[place.top : place.top + place.size, place.left : place.left + place.size] = True
        for n in range(2):
            assert torch.equal(out[n, p][:, inside].view(3, place.size, place.size), tile)
            assert torch.equal(out[n, p][:, ~inside], images[n][:, ~inside])


def test_paste_clips_tiles_that_reach_past_the_border():
    images = torch.rand(1, 3, 20, 20)
    tile = torch.arange(75.0).view(3, 5, 5)
    out = lab.paste(images, [tile, tile], [lab.Placement(1.0, "x", 5, -2, 17), lab.Placement(1.0, "x", 5, 30, 0)])
    assert torch.equal(out[0, 0, :, 0:3, 17:20], tile[:, 2:5, 0:3])
    rest = torch.ones(20, 20, dtype=torch.bool)
    rest[0:3, 17:20] = False
    assert torch.equal(out[0, 0][:, rest], images[0][:, rest])
    assert torch.equal(out[0, 1], images[0])  # entirely outside: nothing pasted


def test_resize_patch_gives_a_square_and_keeps_colours():
    patch = lab.resize_patch(patch_of((0.2, 0.4, 1.0), side=7)[:, :, :5], 13)
    assert patch.shape == (3, 13, 13)
    assert torch.allclose(patch, patch_of((0.2, 0.4, 1.0), side=13), atol=1e-6)


# patch specs --------------------------------------------------------------------------------------
def test_load_patch_reads_files_and_crops(tmp_path: Path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    whole = lab.load_patch(str(tmp_path / "p.png"))
    assert torch.equal(whole, torch.from_numpy(pixels / np.float32(255)).permute(2, 0, 1))
    crop = lab.load_patch(f"{tmp_path / 'p.png'}@2,3,7,9")  # x0,y0,x1,y1
    assert torch.equal(crop, whole[:, 3:9, 2:7])
    assert lab.patch_file(f"{tmp_path / 'p.png'}@2,3,7,9") == str(tmp_path / "p.png")
    for bad in (f"{tmp_path / 'p.png'}@0,0,13,5", f"{tmp_path / 'p.png'}@5,0,5,5", str(tmp_path / "missing.png")):
        with pytest.raises(AtlasError):
            lab.load_patch(bad)


def add_grid(store: Path, layer: str = "mixed4c") -> None:
    """A 3x3 grid whose cell (y, x) has attribution y * 3 + x to class 1 and 0 to class 0; cell (2, 2) is
    below min_count, and icons whose pixels encode the cell."""
    with h5py.File(store, "a") as f:
        cells = f[layer].create_group("grid/3")
        cells.attrs["min_count"] = 5
        count = np.full((3, 3), 10)
        count[2, 2] = 4
        cells["count"] = count
        attribution = np.zeros((3, 3, 10), np.float32)
        attribution[..., 1] = np.arange(9).reshape(3, 3)
        cells["attribution"] = attribution
        cells["icons"] = np.broadcast_to(np.arange(9, dtype=np.uint8).reshape(3, 3, 1, 1, 1) * 20, (3, 3, 6, 6, 3))


def test_load_patch_reads_an_atlas_icon(synthetic_store: Path):
    add_grid(synthetic_store)
    icon = lab.load_patch(f"{synthetic_store}:mixed4c:3:x=2,y=1")
    assert icon.shape == (3, 6, 6)
    assert torch.allclose(icon, torch.full((3, 6, 6), 100 / 255))  # cell y 1 * 3 + x 2 = 5 -> pixel 100
    for bad in (f"{synthetic_store}:mixed4c:3:x=2,y=2", f"{synthetic_store}:mixed4c:3:x=0,y=3"):
        with pytest.raises(AtlasError, match="empty|outside"):
            lab.load_patch(bad)
    with pytest.raises(AtlasError, match="layer .x. is not in the store"):
        lab.load_patch(f"{synthetic_store}:x:3:x=0,y=0")
    # the other order, and bare numbers (y,x before issue 25), are refused with the spec to write instead
    with pytest.raises(AtlasError, match="write x first, x=2,y=1"):
        lab.load_patch(f"{synthetic_store}:mixed4c:3:y=1,x=2")
    with pytest.raises(AtlasError, match="does not name its coordinates: write x=X,y=Y"):
        lab.load_patch(f"{synthetic_store}:mixed4c:3:1,2")


def test_suggest_ranks_non_empty_cells_toward_target_minus_source(synthetic_store: Path, capsys):
    add_grid(synthetic_store)
    cells = lab.suggest_cells(synthetic_store, source=0, target=1, top=3)
    assert [c["cell"] for c in cells] == [(1, 2), (0, 2), (2, 1)]  # (x, y); (2, 2) scores highest but is empty
    assert [c["score"] for c in cells] == [7.0, 6.0, 5.0]
    assert cells[0]["spec"] == f"{synthetic_store}:mixed4c:3:x=1,y=2"
    assert torch.equal(lab.load_patch(cells[0]["spec"]), lab.load_patch(f"{synthetic_store}:mixed4c:3:x=1,y=2"))
    assert [c["cell"] for c in lab.suggest_cells(synthetic_store, source=1, target=0, top=2)] == [(0, 0), (1, 0)]
    argv = ["run", "patch", "--suggest", "red", "green", "--store", str(synthetic_store), "--top", "2"]
    assert main([*argv, "--model", "tests.test_patch:colour_model"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cell (x,y)\tcount\tscore\tpatch"
    assert lines[1:] == [
        f"1,2\t10\t7\t{synthetic_store}:mixed4c:3:x=1,y=2",
        f"0,2\t10\t6\t{synthetic_store}:mixed4c:3:x=0,y=2",
    ]


# selection and rates ------------------------------------------------------------------------------
def test_select_records_by_source_label_or_own_label(tmp_path: Path, colour_folder: Path):
    records = list_images(colour_folder, COLOURS)
    everyone = lab.select_records(records, BLUE)
    assert sorted(r.label for r in everyone) == [RED] * 5 + [GREEN] * 2  # the target's own images left out
    reds = lab.select_records(records, BLUE, source=RED, exclude=str(colour_folder / "red" / "pure0.png"))
    assert sorted(Path(r.path).name for r in reds) == ["bluish0.png", "bluish1.png", "broken.png", "pure1.png"]
    unlabelled = [ImageRecord(str(tmp_path / "a.png")), ImageRecord(str(tmp_path / "b.png"))]
    assert [r.label for r in lab.select_records(unlabelled, BLUE, source=RED)] == [RED, RED]
    with pytest.raises(AtlasError):
        lab.select_records(records, BLUE, source=BLUE)
    with pytest.raises(AtlasError):
        lab.select_records(unlabelled, BLUE)


def test_rates_count_only_the_images_correct_before(colour_folder: Path):
    model = colour_model()
    records = lab.select_records(list_images(colour_folder, COLOURS), BLUE)
    report, _ = measure(model, patch_of((0.0, 0.0, 1.0)), records, ratios=(0.6,))
    # blue patch of 19x19 on 32x32: red mean 0.65 vs blue 0.35 + 0.65 b; only the bluish (b=0.6) ones flip
    assert (report["n_selected"], report["n_images"], report["n_skipped"], report["n"]) == (7, 6, 1, 4)
    assert report["flip_rate"] == 0.5 and report["leave_rate"] == 0.5
    assert report["noise_flip_rate"] == 0.0 and report["noise_leave_rate"] == 0.0  # noise: blue mean only 0.5
    counted = sorted(Path(row["path"]).name for row in report["images"])
    assert counted == ["bluish0.png", "bluish1.png", "pure0.png", "pure1.png"]
    logits = 50.0 * torch.tensor([[1.0, 0.0, 0.6], [1.0, 0.0, 0.0]])
    assert report["mean_p_target_before"] == pytest.approx(logits.softmax(-1)[:, BLUE].mean().item(), rel=1e-3)
    # a large green patch takes every image out of 'red' without making any of them blue
    report, _ = measure(model, patch_of((0.0, 1.0, 0.0)), records, ratios=(0.8,))
    assert (report["n"], report["flip_rate"], report["leave_rate"]) == (4, 0.0, 1.0)


def test_search_keeps_the_best_corner_and_size(tmp_path: Path):
    records = [ImageRecord(str(write_image(tmp_path / f"r{i}.png", (1.0, 0.0, 0.0))), RED) for i in range(3)]
    model = colour_model(ChannelMeans(window=(0.0, 0.5, 0.5, 1.0)))  # sees only the top-right quadrant
    blue = patch_of((0.0, 0.0, 1.0))
    static, _ = measure(model, blue, records, ratios=(0.4,), corners=("tl",))
    assert (static["mode"], static["n"], static["flip_rate"]) == ("static", 3, 0.0)
    search, _ = measure(model, blue, records, ratios=(0.2, 0.4), corners=tuple(lab.CORNERS))
    assert (search["mode"], search["flip_rate"], search["noise_flip_rate"]) == ("search", 1.0, 0.0)
    rates = {(p["ratio"], p["corner"]): (p["flip_rate"], p["chosen"]) for p in search["per_placement"]}
    # only 13x13 at the top right covers enough of the quadrant (169 of 256 px) to flip it
    assert rates == {key: ((1.0, 3) if key == (0.4, "tr") else (0.0, 0)) for key in rates}
    assert len(rates) == 8


def test_noise_control_uses_the_same_placements(tmp_path: Path):
    records = [ImageRecord(str(write_image(tmp_path / f"g{i}.png", (0.5, 0.5, 0.5))), RED) for i in range(3)]
    recorder = Recorder()
    ratios, corners = (0.25, 0.5), ("tl", "br", "tr")
    report, _ = measure(colour_model(recorder), patch_of((1.0, 1.0, 1.0)), records, ratios=ratios, corners=corners)
    assert report["n"] == 3
    grey = torch.from_numpy(np.asarray(Image.open(records[0].path), np.float32) / 255).permute(2, 0, 1)
    boxes = {"patch": [], "noise": []}
    for x in torch.cat(recorder.seen[1:]):  # [0] is the patch alone
        changed = (x != grey).any(dim=0)
        if not changed.any():
            continue  # an unpatched image (the first pass)
        ys, xs = changed.nonzero().unbind(1)
        box = (ys.min().item(), xs.min().item(), ys.max().item() + 1, xs.max().item() + 1)
        boxes["patch" if torch.all(x[:, changed] == 1.0) else "noise"].append(box)
    places = [lab.corner_placement(SIZE, r, c) for r in ratios for c in corners]
    expected = sorted((p.top, p.left, p.top + p.size, p.left + p.size) for p in places) * 3
    assert sorted(boxes["patch"]) == sorted(expected)
    assert sorted(boxes["noise"]) == sorted(expected)


def test_cli_writes_the_report(tmp_path: Path, colour_folder: Path):
    write_image(tmp_path / "blue_patch.png", (0.0, 0.0, 1.0))
    argv = ["run", "patch", "--model", "tests.test_patch:colour_model", "--patch", str(tmp_path / "blue_patch.png")]
    argv += ["--data", str(colour_folder), "--target", "blue", "--source", "red", "--out", str(tmp_path / "out")]
    assert main([*argv, "--size", "0.6", "--examples", "2", "--workers", "0", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["n"], report["flip_rate"], report["noise_flip_rate"]) == (4, 0.5, 0.0)
    assert report["source"] == "red" and report["target"] == "blue"
    assert [e["after"] for e in report["examples"]] == ["blue", "red"]  # one flipped, one not
    for example in report["examples"]:
        for thumb in example["thumbs"]:
            assert Image.open(tmp_path / "out" / thumb).size == (lab.THUMB_PX, lab.THUMB_PX)
    assert "| top-1 becomes blue | 50.0% | 0.0% |" in (tmp_path / "out" / "report.md").read_text()
    assert main(["run", "patch", "--model", "tests.test_patch:colour_model", "--data", str(colour_folder)]) == 2


class RedOrRough(nn.Module):
    """'red' by 50 x the red mean, 'blue' by 200 x the mean step between horizontal neighbours: noise is blue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rough = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        return torch.stack([50.0 * x[:, 0].mean(dim=(1, 2)), torch.zeros_like(rough), 200.0 * rough], dim=1)


def test_the_noise_control_rate_counts_the_noise_that_flips(tmp_path: Path):
    records = [
        ImageRecord(str(write_image(tmp_path / f"{name}{i}.png", (red, 0.0, 0.0))), RED)
        for name, red in (("bright", 1.0), ("dim", 0.2))
        for i in range(2)
    ]
    model = colour_model(RedOrRough())
    report, _ = measure(model, patch_of((0.0, 0.0, 1.0)), records, ratios=(0.6,))
    assert report["n"] == 4
    assert report["flip_rate"] == 0.0  # a flat patch is not rough
    # uniform noise over ~35 % of the image: a mean step of ~0.33 x 0.35 gives 'blue' ~23, above the dim images' 10
    assert report["noise_flip_rate"] == 0.5 and report["noise_leave_rate"] == 0.5
    flipped = {Path(row["path"]).name: row["noise_after"] for row in report["images"]}
    assert flipped == {"bright0.png": "red", "bright1.png": "red", "dim0.png": "blue", "dim1.png": "blue"}


def test_the_search_prefers_a_placement_that_flips_over_a_higher_target_probability():
    # image 0: placement 0 raises P(target) to 0.49 but red stays top; placement 1 flips with P(target) 0.40
    # image 1: nothing flips, so the most probable target wins
    pred = lab.Predictions(
        top1=torch.tensor([[RED, BLUE, RED], [RED, RED, GREEN]]),
        p_top1=torch.tensor([[0.50, 0.40, 0.9], [0.6, 0.7, 0.5]]),
        p_target=torch.tensor([[0.49, 0.40, 0.05], [0.1, 0.3, 0.2]]),
    )
    assert lab.best_placement(pred, BLUE).tolist() == [1, 1]
    rates = lab.outcome(pred, torch.tensor([RED, RED]), BLUE)
    assert rates["flip_rate"] == 0.5 and rates["mean_p_target_after"] == pytest.approx(0.35)


def test_a_patch_over_the_size_bound_is_a_clear_error(tmp_path: Path):
    with pytest.raises(AtlasError, match="cannot be read: .*over the bound|cannot be read: .*exceeds limit"):
        lab.load_patch(str(blank_png(tmp_path / "bomb.png", 20000, 10000)))


def test_the_noise_control_draws_its_noise_from_the_seed(tmp_path: Path):
    records = [ImageRecord(str(write_image(tmp_path / f"dim{i}.png", (0.2, 0.0, 0.0))), RED) for i in range(2)]
    model = colour_model(RedOrRough())
    noise = {
        seed: [
            row["noise_p_target_after"]
            for row in measure(model, patch_of((0.0, 0.0, 1.0)), records, seed=seed)[0]["images"]
        ]
        for seed in (0, 3)
    }
    assert noise[0] != noise[3]  # another seed, other noise: probabilities after the noise patch differ


def test_patch_settings_refuse_a_corner_or_size_that_cannot_be_placed():
    assert lab.PatchSettings().ratios == (lab.DEFAULT_RATIO,)  # the article's static test
    with pytest.raises(AtlasError, match="corners among"):
        lab.PatchSettings(corners=("middle",))
    with pytest.raises(AtlasError, match=r"\(0, 1\]"):
        lab.PatchSettings(ratios=(1.5,))
    with pytest.raises(AtlasError, match="unknown key 'ratio'"):
        lab.PatchSettings.from_config({"ratio": 0.3})
