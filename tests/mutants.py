"""`make mutants`: deliberate bugs, one at a time in a temporary copy, each run against the tests that guard it.

A mutant is caught when its tests fail, SURVIVED when they pass, and could-not-apply when its snippet does not
occur exactly once (the code moved: re-anchor it). Exits non-zero when any mutant survives or cannot apply, or
when the guarding tests fail on the unchanged code. Add a mutant whenever a bug is fixed.

    python -m tests.mutants [--jobs 2] [ID ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "data", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
TIMEOUT_S = 300  # per mutant; the slowest guard set takes about a minute on a busy 2-core machine


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    snippet: str  # must occur exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # test files (or node ids) that must catch it


ATTRIBUTIONS = ("tests/test_attributions.py",)
RENDER = ("tests/test_render.py",)
PATCH = ("tests/test_patch.py",)
PIPELINE = ("tests/test_pipeline.py",)
IMAGES = ("tests/test_images.py",)
PROPERTIES = ("tests/test_properties.py",)
RESUME = ("tests/test_resume.py",)
MUTANTS = [
    # the bugs of issue 16, one per row of its table
    Mutant(
        "attributions-plain-max-pool",
        "atlas/attribution.py",
        "relax = [pool.register_forward_hook(_RelaxedMaxPool(pool)) for pool in pools]",
        "relax = []",
        ATTRIBUTIONS,
    ),
    Mutant(
        "attributions-first-pass-positions",
        "atlas/attribution.py",
        "pass_of(slots[start : start + per_pass], set(positions) - set(seen))",
        "pass_of(slots[0 : len(slots[start : start + per_pass])], set(positions) - set(seen))",
        (*ATTRIBUTIONS, "tests/test_runtime.py"),
    ),
    Mutant(
        "attributions-times-zero",
        "atlas/attribution.py",
        "return {layer: torch.stack(parts, 1).float() for layer, parts in by_layer.items()}, seen",
        "return {layer: 0 * torch.stack(parts, 1).float() for layer, parts in by_layer.items()}, seen",
        ATTRIBUTIONS,
    ),
    Mutant(
        "resume-redoes-finished-shards",
        "atlas/shards.py",
        "return [b for b in batches if not (parts / shard_name(b[0])).exists()]",
        "return list(batches)",
        ("tests/test_collect.py::test_an_interrupted_collection_keeps_its_finished_shards_and_collects_only_the_rest",),
    ),
    Mutant(
        "project-layout-min-max-no-margin",
        "atlas/stages/project.py",
        "layout = normalize_layout(embed(view[ACTIVATIONS], settings, device))",
        "layout = normalize_layout(embed(view[ACTIVATIONS], settings, device), 0.0, 100.0, 0.0)",
        ("tests/test_project.py::test_project_store_normalises_from_widened_percentiles",),
    ),
    Mutant(
        "fuzzy-union-is-a-sum",
        "atlas/layout.py",
        "union = weight + reverse - weight * reverse",
        "union = weight + reverse",
        ("tests/test_layout.py::test_fuzzy_graph_is_umap_learns_fuzzy_simplicial_set",),
    ),
    Mutant(
        "layout-sgd-moves-each-block-from-moved-positions",
        "atlas/layout_sgd.py",
        "tails.index_select(0, sampled), a, b)\n            layout.add_(step, alpha=2.0 * learning_rate)",
        "tails.index_select(0, sampled), a, b)\n                layout.add_(step, alpha=2.0 * learning_rate)\n"
        "                step.zero_()",
        ("tests/test_layout.py::test_optimize_layout_in_edge_blocks_moves_as_in_one_piece",),
    ),
    Mutant(
        "render-ignores-whitening",
        "atlas/stages/render.py",
        "whitening=whitening, transforms=stack, mixed_precision=mixed_precision,",
        "whitening=None, transforms=stack, mixed_precision=mixed_precision,",
        RENDER,
    ),
    Mutant(
        "render-done-after-first-attempt",
        "atlas/stages/render.py",
        "if attempt == settings.attempts - 1]",
        "if attempt == 0]",
        RENDER,
    ),
    Mutant(
        "transforms-no-rotation",
        "atlas/optvis/transform.py",
        "        return _affine(images, matrices)\n",
        "        return images\n",
        ("tests/test_optvis.py",),
    ),
    Mutant(
        "patch-noise-rate-from-unpatched-images",
        "atlas/patch.py",
        "with_noise = predict_pasted(model, images, control_tiles, placements, target, batch_size)",
        "with_noise = Predictions(*(f[:, None].expand(-1, len(placements)) for f in predict(model, images, target)))",
        PATCH,
    ),
    Mutant(
        "patch-search-probability-beats-flip",
        "atlas/patch.py",
        "(pred.top1 == target).float() * 2.0 + pred.p_target",
        "(pred.top1 == target).float() * 0.0 + pred.p_target",
        PATCH,
    ),
    Mutant(
        "pipeline-renders-default-grid-sizes",
        "pipelines/atlas.py",
        'sizes = list(config["grid"].sizes)',
        "sizes = [20, 40, 80]",
        PIPELINE,
    ),
    # more of the same kinds
    Mutant(
        "pipeline-reruns-finished-stages",
        "pipelines/runner.py",
        "    if stage.name not in ctx.force and up_to_date(ctx, stage, settings, layer):",
        "    if False:",
        PIPELINE,
    ),
    Mutant(
        "config-accepts-unknown-keys",
        "atlas/config.py",
        "        check_keys(values, {field.name for field in dataclasses.fields(cls)}, where or cls.__name__)"
        "  # type: ignore[arg-type]\n",
        "",
        (*PIPELINE, "tests/test_edges.py::test_a_key_the_run_sets_itself_is_refused_by_name"),
    ),
    Mutant(
        "attributions-swap-y-and-x",
        "atlas/attribution.py",
        "out[entering.index(layer)][rows, 0, where[:, 0], where[:, 1]] = 1",
        "out[entering.index(layer)][rows, 0, where[:, 1], where[:, 0]] = 1",
        ATTRIBUTIONS,
    ),
    Mutant(
        "images-no-pixel-bound",
        "atlas/images.py",
        "if max_pixels is not None and image.width * image.height > max_pixels:",
        "if False:",
        IMAGES,
    ),
    Mutant(
        "images-draft-too-small",
        "atlas/images.py",
        'image.draft("RGB", (min_side, min_side))',
        'image.draft("RGB", (min_side // 4, min_side // 4))',
        IMAGES,
    ),
    Mutant(
        "render-keeps-last-attempt",
        "atlas/stages/render.py",
        "if attempt == 0 or values[j] > objective[i] or np.isnan(objective[i]):",
        "if True:",
        RENDER,
    ),
    # bugs fixed in session 3: later stages guessing what the store should say
    Mutant(
        "store-weights-silent-fallback",
        "atlas/models/zoo.py",
        'if "/" in label or label.endswith(WEIGHTS_SUFFIXES):',
        "if False:",
        ("tests/test_store.py",),
    ),
    Mutant(
        "compose-guesses-resize-size",
        "atlas/examples.py",
        'store.attrs["resize_size"] if "resize_size" in store.attrs else round(input_size * 256 / 224)',
        "round(input_size * 256 / 224)",
        ("tests/test_store.py",),
    ),
    # issue 17: one fingerprint decides every reuse
    Mutant(
        "render-resumes-despite-changed-settings",
        "atlas/stages/render.py",
        "if existing is not None and ICON_DONE in grid and fresh(existing, recorded, grid_made):",
        "if existing is not None and ICON_DONE in grid:",
        RENDER,
    ),
    Mutant(
        "fingerprint-ignores-key-order-normalisation",
        "atlas/store.py",
        "return json.dumps(settings, sort_keys=True, default=_jsonable)",
        "return json.dumps(settings, default=_jsonable)",
        ("tests/test_store.py",),
    ),
    Mutant(
        "labels-in-imagenet-order-for-inceptionv1",
        "atlas/images.py",
        "return imagenet_label if imagenet_index is None else imagenet_index[imagenet_label]",
        "return imagenet_label",
        ("tests/test_inceptionv1.py::test_imagenet_labels_of_images_become_inceptionv1_logits",),
    ),
    Mutant(
        "render-ignores-decay-power",
        "atlas/stages/render.py",
        "        decay_power=settings.decay_power,\n",
        "",
        RENDER,
    ),
    Mutant(
        "lrn-symmetric-window",
        "atlas/models/inceptionv1.py",
        "band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2))",
        "band = (offset.abs() <= self.size // 2)",
        ("tests/test_inceptionv1.py",),
    ),
    # issue 21: a stage that loads a dataset whole instead of streaming it in row blocks
    Mutant(
        "grid-reads-the-store-whole",
        "atlas/stages/grid.py",
        "CHUNK_ROWS = 65536  # rows per streamed block",
        "CHUNK_ROWS = 10**9  # rows per streamed block",
        ("tests/test_memory.py",),
    ),
    # issue 28: runs that looked fine and were not, and the one-line bugs of its mutation audit
    Mutant(
        "pipeline-trusts-its-memory-not-the-store",
        "pipelines/runner.py",
        "    if stage.name not in ctx.force and up_to_date(ctx, stage, settings, layer):",
        "    if stage.name not in ctx.force:",
        (
            "tests/test_pipeline.py::test_the_store_decides_a_deleted_or_truncated_store_is_rebuilt_and_force_redoes_stages",
        ),
    ),
    # issue 23: lineage in the store
    Mutant(
        "freshness-ignores-what-a-product-was-made-from",
        "atlas/store.py",
        '    return str(node.attrs.get(MADE_FROM, "")) == made_from',
        "    return True",
        (
            "tests/test_pipeline.py::test_a_render_after_a_new_layout_renders_again_and_a_compose_after_new_icons_composes_again",
            "tests/test_pipeline.py::test_changed_settings_redo_their_stage_and_every_later_one_and_a_missing_atlas_image_is_composed_again",
        ),
    ),
    Mutant(
        "layer-view-trusts-row-counts",
        "atlas/store.py",
        "            if name in SAMPLE_ROWS and self.group[name].shape[0] != self.rows:",
        "            if False:",
        (
            "tests/test_store.py::test_the_layer_view_names_what_is_missing_or_short_and_the_stage_that_makes_it",
            "tests/test_grid.py::test_missing_or_stale_layout_is_an_error",
        ),
    ),
    Mutant(
        "collect-runs-the-network-once-per-layer",
        "atlas/stages/collect.py",
        "        found = attribution_pass(\n            model, images, where_t, sizes, method",
        "        found = {n: attribution_pass(model, images, {n: where_t[n]}, {n: sizes[n]}, method=attribution.method,"
        " baselines=baselines, steps=attribution.steps)[n] for n in layers}\n        print(\n            model, images,"
        " where_t, sizes, method",
        ("tests/test_collect.py::test_four_layers_are_decoded_and_run_once_per_batch_and_equal_four_one_layer_runs",),
    ),
    Mutant(
        "positions-depend-on-the-layer",
        "atlas/stages/collect.py",
        "    rng = np.random.default_rng([seed, image_row])",
        "    rng = np.random.default_rng([seed, image_row, sum(map(ord, layer))])",
        ("tests/test_collect.py::test_four_layers_are_decoded_and_run_once_per_batch_and_equal_four_one_layer_runs",),
    ),
    Mutant(
        "a-rerun-collects-every-layer-again",
        "atlas/stages/collect.py",
        "    missing = [name for name in names if name not in (have or ())]",
        "    missing = list(names)",
        ("tests/test_collect.py::test_a_rerun_with_one_more_layer_collects_only_that_layer_and_keeps_the_others",),
    ),
    Mutant(
        "layers-page-outlines-the-hovered-cell-instead-of-its-samples",
        "atlas/viewer/layers.js",
        "for (const r of rows) counts.set(all[i][r], (counts.get(all[i][r]) ?? 0) + 1);",
        "for (const r of rows) counts.set(index, (counts.get(index) ?? 0) + 1);",
        (
            "tests/test_viewer_browser.py::"
            "test_layers_side_by_side_outline_where_a_hovered_cells_samples_fall_in_the_other_layer",
        ),
    ),
    Mutant(
        "expanded-weights-through-the-relus",
        "atlas/microscope/circuits.py",
        "        if isinstance(module, nn.ReLU):",
        "        if isinstance(module, nn.Identity):",
        ("tests/test_circuits.py",),
    ),
    Mutant(
        "ablation-zeroes-nothing",
        "atlas/microscope/circuits.py",
        "        zeroed[:, channel] = 0",
        "        zeroed[:, channel] = zeroed[:, channel]",
        ("tests/test_circuits.py",),
    ),
    Mutant(
        "dataparallel-prefix-kept",
        "atlas/models/zoo.py",
        'if p != "module"): value',
        'if p != "modules"): value',
        ("tests/test_zoo.py",),
    ),
    Mutant(
        "places-images-take-imagenet-labels",
        "atlas/models/zoo.py",
        "        return [-1] * len(imagenet_wnids())",
        "        return None",
        ("tests/test_zoo.py",),
    ),
    Mutant(
        "timm-models-normalised-as-torchvisions",
        "atlas/models/zoo.py",
        'ImagenetNormalize(net.pretrained_cfg["mean"], net.pretrained_cfg["std"])',
        "ImagenetNormalize()",
        ("tests/test_zoo.py",),
    ),
    Mutant(
        "places-googlenet-has-inception5hs-channels",
        "atlas/models/zoo.py",
        "InceptionV1(classes=PLACES365_LOGITS, channels=PAPER_CHANNELS)",
        "InceptionV1(classes=PLACES365_LOGITS)",
        ("tests/test_zoo.py",),
    ),
    Mutant(
        "circuit-from-the-wrong-layer",
        "atlas/microscope/circuits.py",
        "    return {layer: ranked[i - 1] if i else None for i, layer in enumerate(ranked)}",
        "    return {layer: ranked[0] if i else None for i, layer in enumerate(ranked)}",
        ("tests/test_circuits.py",),
    ),
    Mutant(
        "circuit-inputs-link-into-the-units-own-layer",
        "atlas/microscope/site.py",
        '    below = slug(report["below"])',
        '    below = slug(report["layer"])',
        ("tests/test_microscope.py::test_a_unit_page_lists_its_inputs_from_the_layer_below_and_links_to_their_pages",),
    ),
    Mutant(
        "used-by-from-the-wrong-layer",
        "atlas/microscope/site.py",
        '        if circuit is None or json.loads(circuit.attrs["settings"])["below"] != layer:',
        '        if circuit is None or json.loads(circuit.attrs["settings"])["layer"] != layer:',
        ("tests/test_microscope.py::test_a_unit_page_lists_its_inputs_from_the_layer_below_and_links_to_their_pages",),
    ),
    Mutant(
        "listed-inputs-get-no-page",
        "pipelines/microscope.py",
        '                    todo = shown[layer] if kind == "channel" else chosen[layer]',
        "                    todo = chosen[layer]",
        ("tests/test_microscope.py::test_a_unit_page_lists_its_inputs_from_the_layer_below_and_links_to_their_pages",),
    ),
    Mutant(
        "diversity-across-units",
        "atlas/optvis/objectives.py",
        "        size = group or h.shape[0]",
        "        size = h.shape[0]",
        ("tests/test_optvis.py",),
    ),
    Mutant(
        "neuron-lens-is-the-channel",
        "atlas/microscope/lenses.py",
        "        return neuron(layer, list(units))",
        "        return channel(layer, list(units))",
        ("tests/test_microscope.py::test_the_unit_lenses_objectives",),
    ),
    Mutant(
        "examples-of-one-layer-for-all",
        "atlas/microscope/examples.py",
        "            value, position = unit_maxima(acts[layer])",
        "            value, position = unit_maxima(acts[layers[0]])",
        ("tests/test_microscope.py::test_one_pass_over_several_layers_finds_what_one_pass_each_finds",),
    ),
    Mutant(
        "graph-edges-from-module-order",
        "atlas/microscope/graph.py",
        "    graph = layer_graph(model, layers)\n",
        "    graph = LayerGraph(layer_graph(model, layers).nodes, [])\n",
        ("tests/test_microscope.py::test_a_unit_page_lists_its_inputs_from_the_layer_below_and_links_to_their_pages",),
    ),
    Mutant(
        "positions-unchecked",
        "atlas/stages/collect.py",
        "    check_counts(records, {name: shapes[name] for name in names}, positions)\n",
        "",
        ("tests/test_edges.py::test_positions_outside_the_layers_interior_are_refused",),
    ),
    Mutant(
        "no-readable-image-is-a-success",
        "atlas/shards.py",
        "if not adding and len(skipped) == len(records):",
        "if False:",
        ("tests/test_edges.py::test_a_folder_without_one_readable_image_is_an_error_not_an_empty_store",),
    ),
    Mutant(
        "class-without-winners-accepted",
        "pipelines/class_atlas.py",
        "if count == 0 and not force:",
        "if False:",
        ("tests/test_class_atlas.py",),
    ),
    Mutant(
        "per-layer-override-of-the-default-layer",
        "atlas/config.py",
        '.get(str(layer or config.get("layer")), {})',
        '.get(str(config.get("layer")), {})',
        ("tests/test_pipeline.py::test_a_per_layer_override_applies_that_layers_settings_only",),
    ),
    Mutant(
        "decay-power-nan-accepted",
        "atlas/stages/render.py",
        "if not self.decay_power >= 0:",
        "if self.decay_power < 0:",
        ("tests/test_render.py::test_a_nan_or_negative_decay_power_is_refused_before_any_render",),
    ),
    Mutant(
        "class-names-keep-hyphens",
        "atlas/classes.py",
        'return re.sub(r"[^0-9a-z]+", "", name.lower())',
        'return re.sub(r"[^0-9a-z-]+", "", name.lower())',
        ("tests/test_classes.py",),
    ),
    Mutant(
        "class-folders-labelled-by-position",
        "atlas/images.py",
        "return by_name.get(normal_name(name), -1)",
        "return by_name.get(name, -1)",
        ("tests/test_images.py::test_class_sub_folders_are_labelled_by_the_class_they_name_in_any_spelling",),
    ),
    Mutant(
        "jitter-never-largest-offset",
        "atlas/optvis/transform.py",
        "rows = rand.integers(d + 1)[:, None]",
        "rows = rand.integers(d)[:, None]",
        ("tests/test_optvis.py::test_jitter_reaches_every_offset_from_0_to_d",),
    ),
    Mutant(
        "patch-noise-of-seed-0",
        "atlas/patch.py",
        "noise_tiles(placements, seed)]",
        "noise_tiles(placements, 0)]",
        ("tests/test_patch.py::test_the_noise_control_draws_its_noise_from_the_seed",),
    ),
    Mutant(
        "exif-orientation-ignored",
        "atlas/images.py",
        "image = ImageOps.exif_transpose(image)",
        "image = image",
        ("tests/test_images.py::test_the_exif_orientation_is_applied",),
    ),
    Mutant(
        "centre-crop-offsets-swapped",
        "atlas/images.py",
        "left, top = (width - crop_size) // 2, (height - crop_size) // 2",
        "top, left = (width - crop_size) // 2, (height - crop_size) // 2",
        ("tests/test_images.py::test_the_centre_crop_stays_inside_a_landscape_or_portrait_photo",),
    ),
    Mutant(
        "shard-names-unpadded",
        "atlas/shards.py",
        'return f"batch-{first_row:09d}.npz"',
        'return f"batch-{first_row}.npz"',
        ("tests/test_collect.py::test_a_merge_of_more_than_ten_shards_keeps_the_row_order",),
    ),
    Mutant(
        "fft-image-without-lucids-scale",
        "atlas/optvis/param.py",
        'norm="ortho") / FFT_MAGIC',
        'norm="ortho")',
        ("tests/test_optvis.py::test_fft_image_is_lucids_formula_at_its_overall_scale",),
    ),
    Mutant(
        "deep-zoom-levels-round-down",
        "atlas/site.py",
        "top = math.ceil(math.log2(full))",
        "top = math.floor(math.log2(full))",
        ("tests/test_compose.py::test_deep_zoom_has_a_level_per_halving_down_to_1_px_on_any_canvas",),
    ),
    Mutant(
        "labels-with-cell-axes-swapped",
        "atlas/stages/compose.py",
        "names[grid.top_classes[y, x, 0]]",
        "names[grid.top_classes[x, y, 0]]",
        ("tests/test_compose.py::test_each_label_is_its_own_cells_top_class_under_that_cell",),
    ),
    Mutant(
        "threads-count-their-reader-as-busy",
        "atlas/runtime.py",
        '.split("/")[0]) - 1)',
        '.split("/")[0]))',
        ("tests/test_runtime.py::test_default_threads_are_the_affinitys_cores_less_the_threads_running_now",),
    ),
    # issue 27: feature accentuation and the visualisation defaults
    Mutant(
        "accentuation-leaves-its-radius",
        "atlas/optvis/param.py",
        "return (self.start + self.radius * torch.tanh(rgb)).clamp(0, 1)",
        "return (self.start + torch.tanh(rgb)).clamp(0, 1)",
        ("tests/test_param.py",),
    ),
    Mutant(
        "accentuation-starts-from-another-cells-example",
        "atlas/stages/render.py",
        "return example_crops(store, layer, picked[cells, 0].tolist(), size)",
        "return example_crops(store, layer, picked[cells[::-1], 0].tolist(), size)",
        RENDER,
    ),
    Mutant(
        "visualize-defaults-to-lucids-stack",
        "atlas/optvis/__init__.py",
        'TRANSFORMS = "crops"',
        'TRANSFORMS = "standard"',
        ("tests/test_optvis.py",),
    ),
    # issue 37: attributions from the layer's mean activation, and the second icon set
    Mutant(
        "integrated-gradients-from-zero",
        "atlas/attribution.py",
        "base = baselines[layer].to(h.device, h.dtype).view(1, -1, 1, 1)",
        "base = 0 * baselines[layer].to(h.device, h.dtype).view(1, -1, 1, 1)",
        ATTRIBUTIONS,
    ),
    Mutant(
        "integrated-gradients-at-the-image",
        "atlas/attribution.py",
        "alphas = [(j + 0.5) / steps for j in range(steps)]",
        "alphas = [1.0 for j in range(steps)]",
        ATTRIBUTIONS,
    ),
    Mutant(
        "baseline-methods-swap-y-and-x",
        "atlas/attribution.py",
        "masks[k, rows, 0, where[:, k, 0], where[:, k, 1]] = 1",
        "masks[k, rows, 0, where[:, k, 1], where[:, k, 0]] = 1",
        ATTRIBUTIONS,
    ),
    Mutant(
        "occlusion-sign",
        "atlas/attribution.py",
        "parts.append(logits - _occluded(model, module, images, h, base, chunk))",
        "parts.append(_occluded(model, module, images, h, base, chunk) - logits)",
        ATTRIBUTIONS,
    ),
    Mutant(
        "lite0-labels-by-the-papers-gradient",
        "configs/efficientnet-lite0.yaml",
        "  attribution: integrated  #",
        "  attribution: gradient    #",
        ("tests/test_pipeline.py::test_on_the_demo_run_a_photos_class_shades_the_cells_that_hold_its_samples",),
    ),
    Mutant(
        "lite0-defaults-to-the-papers-gradient",
        "atlas/models/registry.py",
        'attribution="integrated",',
        'attribution="gradient",',
        ("tests/test_zoo.py::test_atlas_models_lists_each_microscope_model_with_its_weights",),
    ),
    Mutant(
        "resumed-collection-computes-its-baseline-again",
        "atlas/stages/collect.py",
        "    if kept.exists():",
        "    if False:",
        (
            "tests/test_collect.py::test_integrated_gradients_start_from_the_kept_mean_activation_and_the_store_records_them",
        ),
    ),
    Mutant(
        "baseline-over-every-image",
        "atlas/stages/collect.py",
        'count = min(meta["baseline_images"], len(records))',
        "count = len(records)",
        (
            "tests/test_collect.py::test_integrated_gradients_start_from_the_kept_mean_activation_and_the_store_records_them",
        ),
    ),
    Mutant(
        "attribution-method-left-out-of-the-settings",
        "atlas/stages/collect.py",
        "        **attribution,\n    }",
        "    }",
        ("tests/test_collect.py::test_the_attribution_method_is_part_of_a_collections_settings",),
    ),
    Mutant(
        "accentuated-icons-overwrite-the-visualisations",
        "atlas/stages/render.py",
        "return grid.require_group(ACCENTUATED) if create else grid.get(ACCENTUATED)",
        "return grid if create else grid.get(ACCENTUATED)",
        ("tests/test_render.py::test_accentuated_icons_start_from_their_cells_most_typical_example_and_stay_near_it",),
    ),
    Mutant(
        "compose-ignores-new-accentuated-icons",
        "atlas/store.py",
        'return f"{icons}+{accentuated}" if icons and accentuated else icons',
        "return icons",
        (
            "tests/test_pipeline.py::test_an_accentuated_section_renders_a_second_icon_set_that_compose_shows_beside_the_first",
        ),
    ),
    Mutant(
        "viewer-icon-switch-keeps-the-visualisations",
        "atlas/viewer/viewer.js",
        "const tiles = (entry) => entry.views?.[icons] ?? entry.tiles;",
        "const tiles = (entry) => entry.tiles;",
        ("tests/test_viewer_browser.py::test_the_icon_switch_shows_visualisations_accentuated_examples_and_examples",),
    ),
    # issue 41: one runner, the store opened once, typed settings
    Mutant(
        "settings-skip-their-types",
        "atlas/config.py",
        "                value = _typed(name, value, hints[field.name])",
        "                pass",
        (
            "tests/test_settings.py",
            "tests/test_edges.py::test_a_bad_config_number_stops_make_atlas_in_one_line_and_leaves_nothing",
        ),
    ),
    Mutant(
        "runner-opens-the-store-at-every-question",
        "pipelines/runner.py",
        "        if self._store is None and self.store_path.exists():",
        "        if self.store_path.exists():",
        (
            "tests/test_pipeline.py::test_a_run_opens_its_store_at_most_three_times_a_rerun_once_and_measures_the_layers_once",
        ),
    ),
    Mutant(
        "layer-shapes-measured-at-every-ask",
        "atlas/models/classifier.py",
        "        if known is None or known[0] != self.input_size:",
        "        if True:",
        (
            "tests/test_pipeline.py::test_a_run_opens_its_store_at_most_three_times_a_rerun_once_and_measures_the_layers_once",
        ),
    ),
    Mutant(
        "layout-records-the-other-methods-parameters",
        "atlas/stages/project.py",
        '    other = TSNE_ONLY if settings.method == "umap" else UMAP_ONLY',
        "    other: tuple = ()",
        ("tests/test_project.py::test_a_layout_records_its_own_methods_parameters_only",),
    ),
    Mutant(
        "composed-atlas-records-default-settings",
        "atlas/stages/compose.py",
        '"settings": asdict(settings), "made": made, "store": where}',
        '"settings": asdict(ComposeSettings()), "made": made, "store": where}',
        (
            "tests/test_pipeline.py::test_changed_settings_redo_their_stage_and_every_later_one_and_a_missing_atlas_image_is_composed_again",
        ),
    ),
    Mutant(
        "torch-umap-graph-loses-its-tails",
        "atlas/layout.py",
        "coo_matrix((weight, (head, tail)), shape=(len(initial), len(initial)))",
        "coo_matrix((weight, (head, head)), shape=(len(initial), len(initial)))",
        ("tests/test_layout.py::test_torch_umap_owns_the_engine_fit_keeps_the_fuzzy_graph_and_the_embedding",),
    ),
    Mutant(
        "run-folder-never-held",
        "pipelines/runner.py",
        "            lock.acquire(timeout=0)",
        "            pass",
        (
            "tests/test_edges.py::test_a_second_run_into_a_held_run_folder_stops_in_one_line_and_leaves_the_first_runs_work",
        ),
    ),
    Mutant(
        "last-batch-runs-at-its-own-shape",
        "atlas/stages/collect.py",
        "    if pad_to is not None and pad_to > kept:",
        "    if False:",
        (
            "tests/test_collect.py::test_the_same_photos_give_the_same_store_at_one_and_two_threads_beside_a_busy_neighbour",
        ),
    ),
    Mutant(
        "layout-pow-on-every-thread",
        "atlas/layout_sgd.py",
        '    if x.device.type != "cpu":\n        return x.pow(exponent)',
        "    if True:\n        return x.pow(exponent)",
        ("tests/test_layout.py::test_a_seeded_layout_is_the_same_at_one_and_two_threads",),
    ),
    Mutant(
        "grid-room-checked-only-at-grid",
        "pipelines/atlas.py",
        '        check_room(list(config["grid"].sizes), samples, ctx.shapes[layer][0], classes)',
        "        pass",
        ("tests/test_edges.py::test_a_bad_config_number_stops_make_atlas_in_one_line_and_leaves_nothing",),
    ),
    # issue 40 part 4: the pure functions' properties (tests/test_properties.py), one kind each
    Mutant(
        "cells-rows-and-columns-swapped",
        "atlas/stages/grid.py",
        "return (scaled[:, 1] * size + scaled[:, 0]).astype(np.int32)",
        "return (scaled[:, 0] * size + scaled[:, 1]).astype(np.int32)",
        PROPERTIES,
    ),
    Mutant(
        "positions-depend-on-their-count",
        "atlas/stages/collect.py",
        "return interior[drawn[np.sort(first)[:count]]]",
        "return interior[drawn[first[:count]]]",
        PROPERTIES,
    ),
    Mutant(
        "coarse-cells-nest-transposed",
        "atlas/stages/grid.py",
        "return sums.reshape(coarse, m, coarse, m, -1)",
        "return sums.reshape(m, coarse, m, coarse, -1)",
        PROPERTIES,
    ),
    Mutant(
        "layout-axis-flipped",
        "atlas/stages/project.py",
        "return np.clip(scaled, 0.0, 1.0).astype(np.float32)",
        "return np.clip(scaled * [1.0, -1.0] + [0.0, 1.0], 0.0, 1.0).astype(np.float32)",
        PROPERTIES,
    ),
    Mutant(
        "jitter-flips-rows",
        "atlas/optvis/transform.py",
        "rows = rand.integers(d + 1)[:, None] + torch.arange(h - d, device=images.device)",
        "rows = rand.integers(d + 1)[:, None] + torch.arange(h - d, device=images.device).flip(0)",
        PROPERTIES,
    ),
    Mutant(
        "deep-images-inverted",
        "atlas/images.py",
        "pixels = (pixels - pixels.min()) / (span if span > 0 else 1.0) * 255.0",
        "pixels = (pixels.max() - pixels) / (span if span > 0 else 1.0) * 255.0",
        PROPERTIES,
    ),
    Mutant(
        "model-input-transposed",
        "atlas/images.py",
        "/ 255.0).permute(2, 0, 1).contiguous()",
        "/ 255.0).permute(2, 1, 0).contiguous()",
        PROPERTIES,
    ),
    Mutant(
        "icons-drop-cells-at-the-minimum-count",
        "atlas/canvas.py",
        "return np.where(count >= min_count, scale, 0.0)",
        "return np.where(count > min_count, scale, 0.0)",
        PROPERTIES,
    ),
    Mutant(
        "top-classes-smallest-first",
        "atlas/stages/grid.py",
        'order = np.argsort(-values, axis=1, kind="stable")',
        'order = np.argsort(values, axis=1, kind="stable")',
        PROPERTIES,
    ),
    Mutant(
        "labels-at-the-cell-top",
        "atlas/stages/compose.py",
        "image.paste(label, (round(left), round((y + 1) * cell_px - label.height)), label)",
        "image.paste(label, (round(left), round(y * cell_px)), label)",
        PROPERTIES,
    ),
    # issue 40 part 1: stopped, changed and forced runs (tests/test_resume.py)
    Mutant(
        "a-run-of-zero-steps-accepted",
        "pipelines/atlas.py",
        "if config.get(section) and config[section].steps < 1:",
        "if config.get(section) and config[section].steps < 0:",
        ("tests/test_edges.py",),
    ),
    Mutant(
        "linked-cells-filled-not-outlined",
        "atlas/viewer/viewer.js",
        "context.strokeRect(x + line / 2, y + line / 2, scale - line, scale - line);",
        "context.fillStyle = context.strokeStyle;\n      context.fillRect(x, y, scale, scale);",
        (
            "tests/test_viewer_browser.py::test_layers_side_by_side_outline_where_a_hovered_cells_samples_fall_in_the_other_layer",
        ),
    ),
    Mutant(
        "comparison-legend-sides-swapped",
        "atlas/stages/compose.py",
        "legend = None if sides is None else (names[sides[0]], names[sides[1]])",
        "legend = None if sides is None else (names[sides[1]], names[sides[0]])",
        ("tests/test_class_atlas.py",),
    ),
    Mutant(
        "home-view-shows-a-finer-grid",
        "atlas/viewer/viewer.js",
        "const cellPx = Math.max(CELL_PX, (viewer.viewport.getHomeZoom() * width) / sizes[0]);",
        "const cellPx = CELL_PX;",
        (
            "tests/test_viewer_browser.py::test_the_home_view_shows_the_coarsest_grid_even_when_every_grid_is_legible_there",
        ),
    ),
    Mutant(
        "class-atlas-suggestion-without-its-store",
        "atlas/viewer/layers.js",
        'make class-atlas${layerAtlas.store ? ` STORE="${layerAtlas.store}"` : ""} CLASS=',
        "make class-atlas CLASS=",
        (
            "tests/test_viewer_browser.py::test_layers_side_by_side_outline_where_a_hovered_cells_samples_fall_in_the_other_layer",
        ),
    ),
    Mutant(
        "no-pixel-bound-crashes",
        "atlas/images.py",
        "if max_pixels is not None and image.width * image.height > max_pixels:",
        "if image.width * image.height > max_pixels:",
        IMAGES,
    ),
    Mutant(
        "render-done-when-any-icon-is",
        "atlas/stages/render.py",
        "return ICON_DONE in icons and bool(icons[ICON_DONE][()][non_empty].all())",
        "return ICON_DONE in icons and bool(icons[ICON_DONE][()][non_empty].any())",
        RESUME,
    ),
    Mutant(
        "compose-done-without-its-tiles",
        "atlas/stages/compose.py",
        'for name in ("atlas.png", "tiles.dzi"))]',
        'for name in ("atlas.png",))]',
        RESUME,
    ),
    Mutant(
        "forced-collect-keeps-the-store",
        "atlas/stages/collect.py",
        "if path.exists() and (forced or collected_layers(path, None) is None):",
        "if path.exists() and collected_layers(path, None) is None:",
        RESUME,
    ),
    Mutant(
        "photos-known-by-name-only",
        "atlas/images.py",
        'digest.update(f"{path}\\t{size}\\n".encode())',
        'digest.update(f"{path}\\n".encode())',
        RESUME,
    ),
    Mutant(
        "grid-done-without-its-cells",
        "atlas/stages/grid.py",
        "return all(name in node for name in GRIDDED) and len(node[CELL]) == rows",
        "return True",
        RESUME,
    ),
]


def copy_tree(dest: Path) -> Path:
    """The worktree without .venv, .git and data, with .venv linked back (its site-packages are not copied)."""
    shutil.copytree(ROOT, dest, ignore=SKIP, symlinks=True)
    (dest / ".venv").symlink_to((ROOT / ".venv").resolve())
    return dest


def pytest_in(tree: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # two runs share two cores
    env.pop("PYTHONPATH", None)  # `python -m` from the copy's root imports the copy's own packages
    command = [str(tree / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def first_failure(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return lines[0].split(" - ")[0] if lines else output.strip().splitlines()[-1] if output.strip() else ""


def run_mutant(mutant: Mutant, scratch: Path) -> tuple[str, str, float]:
    """(verdict, detail, seconds) for one mutant, in a fresh copy under `scratch`."""
    started = time.perf_counter()
    tree = copy_tree(scratch / mutant.id)
    target = tree / mutant.file
    source = target.read_text()
    found = source.count(mutant.snippet)
    if found != 1:
        return "could-not-apply", f"snippet found {found} times in {mutant.file}", 0.0
    target.write_text(source.replace(mutant.snippet, mutant.replacement))
    try:
        result = pytest_in(tree, mutant.tests)
    except subprocess.TimeoutExpired:
        return "timeout", f"tests ran past {TIMEOUT_S} s", time.perf_counter() - started
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    seconds = time.perf_counter() - started
    if result.returncode == 0:
        return "SURVIVED", "every guarding test passed", seconds
    if result.returncode in (1, 2) and ("FAILED" in result.stdout or "ERROR" in result.stdout):
        return "caught", first_failure(result.stdout), seconds
    return "error", f"pytest exit {result.returncode}: {first_failure(result.stdout + result.stderr)}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.ids or m.id in args.ids]
    if args.ids and len(chosen) != len(set(args.ids)):
        print(f"unknown mutant id among {args.ids}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        scratch = Path(tmp)
        # the guards must pass on the unchanged code, from the copy's own packages, or a "caught" means nothing
        base = copy_tree(scratch / "baseline")
        where = subprocess.run(
            [str(base / ".venv/bin/python"), "-c", "import atlas; print(atlas.__file__)"],
            cwd=base, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        ).stdout.strip()  # fmt: skip
        if not where.startswith(str(base)):
            print(f"the copy imports atlas from {where!r}, not from the copy", file=sys.stderr)
            return 2
        guards = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
        baseline = pytest_in(base, guards)
        if baseline.returncode != 0:
            print(f"the guarding tests fail on the unchanged code: {first_failure(baseline.stdout)}", file=sys.stderr)
            return 2
        print(f"baseline: {len(guards)} guarding test sets pass on the unchanged code", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [(m, pool.submit(run_mutant, m, scratch)) for m in chosen]
            verdicts = []
            for mutant, future in futures:
                verdict, detail, seconds = future.result()
                verdicts.append(verdict)
                print(f"{verdict:15s} {mutant.id:42s} {seconds:5.0f} s  {detail}", flush=True)
    caught = verdicts.count("caught")
    print(
        f"total: {caught} of {len(chosen)} mutants caught, {verdicts.count('SURVIVED')} survived, "
        f"{verdicts.count('could-not-apply')} could not apply, "
        f"{len(chosen) - caught - verdicts.count('SURVIVED') - verdicts.count('could-not-apply')} errors or timeouts "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
