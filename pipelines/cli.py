"""`atlas` command line: one sub-command per stage, each a thin wrapper over the stage's functions, and `atlas run`
for the multi-stage runs (atlas.runs, over pipelines/). The Makefile calls only this.

Each sub-command is added by one `_add_<name>` function below; `main` catches AtlasError and prints
it on one line, for every command alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from pathlib import Path

from atlas import AtlasError, __version__
from atlas.config import PARAM_HELP, Parser, add_flags, check_number, given
from atlas.runtime import check_device, resolve, set_threads
from pipelines.runner import RunContext, run_stage
from pipelines.runs import add_run


def _add_layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list a model's layers: name, channels, height, width")
    p.add_argument("model", help="zoo name (`atlas models`), torchvision name, or pkg.mod:factory")
    p.add_argument("--weights", help="weights file, or 'random'")

    def run(args: argparse.Namespace) -> None:
        from atlas.models.zoo import load_model

        model = load_model(args.model, weights=args.weights or "random")  # shapes do not need trained weights
        for name, channels, height, width in model.layer_shapes():
            print(f"{name}\t{channels}\t{height}\t{width}")

    p.set_defaults(run=run)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo: name, input size, default layer, labels, weights source")

    def run(_args: argparse.Namespace) -> None:
        from atlas.models.registry import zoo_table

        rows = zoo_table()
        widths = [max(len(row[i]) for row in rows) + 2 for i in range(5)]  # columns as wide as their longest entry
        for *columns, weights in rows:
            print("".join(f"{text:<{width}}" for text, width in zip(columns, widths, strict=True)) + weights)
        print("and any torchvision classifier by name, or your own as package.module:factory")

    p.set_defaults(run=run)


CLUSTER_HELP = (
    "run on dask: 'local' (a LocalCluster: one worker per GPU, else a few CPU workers; --workers N sets how many) "
    "or a scheduler address tcp://HOST:PORT (--workers N waits for N workers); needs a shared file system"
)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from atlas.runtime import MEMORY_FORMATS, PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast precision (see atlas/runtime.py)")
    p.add_argument("--memory-format", default="auto", choices=MEMORY_FORMATS, help="model and input memory format")


def _add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="stage 1: activations and attributions of a dataset into an HDF5 store")
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `atlas layers`)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's ImageNet weights)")
    p.add_argument("--layer", action="append", help="layer to collect (repeatable; default: the model's atlas layer)")
    p.add_argument("--data", required=True, help="image folder, text file of image paths, or 'demo'")
    p.add_argument("--out", required=True, help="HDF5 store to write")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cluster", help=CLUSTER_HELP)
    p.set_defaults(run=_run_collect)


def _run_collect(args: argparse.Namespace) -> None:
    from atlas.images import list_images
    from atlas.models.zoo import load_model
    from atlas.stages.collect import collect

    if args.cluster:
        print(_collect_on_cluster(args))
        return
    device = str(resolve("collect", args.device).device)
    settings = _collect_settings(args)  # checked before the model loads
    model = load_model(args.model, weights=args.weights, device=device)
    records = list_images(args.data, model.class_names, model.imagenet_index)[: args.limit]
    print(collect(model, records, args.out, device=device, **settings))


def _collect_settings(args: argparse.Namespace) -> dict:
    """The collect flags that one process and a cluster run take alike, checked by CollectSettings."""
    from atlas.stages.collect import CollectSettings

    settings = dataclasses.asdict(CollectSettings.from_config(given(args, tuple(STAGE_FLAGS["collect"][2]))))
    return dict(settings, layers=args.layer, dataset=str(args.data))


def _collect_on_cluster(args: argparse.Namespace) -> Path:
    from atlas.cluster import collect_on_cluster, connect
    from atlas.images import list_images
    from atlas.models.zoo import load_model

    labels = load_model(args.model, weights="random")  # class names only: no weights needed
    records = list_images(args.data, labels.class_names, labels.imagenet_index)[: args.limit]
    with connect(args.cluster, args.workers) as client:
        options = _collect_settings(args)
        del options["workers"]  # with --cluster, --workers counts dask workers
        return collect_on_cluster(client, args.model, records, args.out, args.weights, device=args.device, **options)


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="stage 4: one feature-visualisation icon per grid cell")
    p.add_argument("store", help="HDF5 store with grids (`atlas grid`)")
    p.add_argument("--layer", help="the store's layer (default: its only one)")
    p.add_argument("--grid", type=int, required=True, help="grid size G to render")
    p.add_argument(
        "--batch-size", type=int, help="icon attempts optimised together (default: fit GPU memory; 16 on CPU)"
    )
    p.add_argument("--model", help="override the store's model")
    p.add_argument("--weights", help="override the store's weights: a file, or 'random'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_runtime(p)
    p.add_argument("--cluster", help=CLUSTER_HELP)
    p.add_argument("--workers", type=int, help="with --cluster: dask workers")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.render import RenderSettings, render_store

        _regrid_stale(Path(args.store), args.layer, args.grid)  # a render after `atlas project` renders its layout
        options = dict(
            layer=args.layer,
            grid=args.grid,
            settings=RenderSettings.from_config(given(args, tuple(STAGE_FLAGS["render"][2]))),
            batch_size=args.batch_size,
            device=args.device,
            model=args.model,
            weights=args.weights,
            precision=args.precision,
            memory_format=args.memory_format,
        )
        if args.cluster:
            from atlas.cluster import connect, render_on_cluster

            with connect(args.cluster, args.workers) as client:
                summary = render_on_cluster(client, args.store, **options)
        else:
            summary = render_store(args.store, **options)
        print(
            f"{summary['layer']} grid {summary['grid']}: rendered {summary['rendered']} icons "
            f"({summary['already_done']} already done) in {summary['seconds']:.0f} s"
        )

    p.set_defaults(run=run)


def _regrid_stale(store: Path, layer: str | None, size: int) -> None:
    """Grid the layer again, with the settings its grid recorded, when `atlas project` ran since that grid was made
    (the runner's grid stage, which skips a grid made from the layout as it is)."""
    import json

    from atlas.stages.grid import GRID, GridSettings
    from atlas.store import GRIDS, SETTINGS, layer_group

    with RunContext(store, store.parent) as ctx:
        group = layer_group(ctx.store, layer)
        cells = group.get(f"{GRIDS}/{size}")
        if cells is None or SETTINGS not in cells.attrs:
            return  # no grid (render says so), or one from before lineage was recorded
        recorded = GridSettings.from_config(json.loads(cells.attrs[SETTINGS]))
        run_stage(ctx, GRID, recorded, group.name.strip("/"))


def _add_compose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="stage 5: atlas images, zoomable tiles, cell metadata and the viewer")
    p.add_argument("store", help="HDF5 store with rendered icons")
    p.add_argument("--out", required=True, help="run folder to write (re-running adds to it)")
    p.add_argument("--layer", action="append", help="layer to compose (repeatable; default: all rendered)")
    p.add_argument("--grid", type=int, action="append", help="grid size (repeatable; default: all rendered)")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.compose import ComposeSettings, compose_run

        settings = ComposeSettings.from_config(given(args, tuple(STAGE_FLAGS["compose"][2])))
        index = compose_run(args.store, args.out, layers=args.layer, grids=args.grid, settings=settings)
        print(f"{index}  (view it: atlas view {args.out})")

    p.set_defaults(run=run)


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="serve a run folder's viewer on 127.0.0.1 and print its URL")
    p.add_argument("run_dir", help="run folder written by `atlas compose`")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")

    def run(args: argparse.Namespace) -> None:
        from atlas.view import serve

        serve(args.run_dir, port=int(check_number("--port", args.port, 0, 65535)))

    p.set_defaults(run=run)


def _add_dream(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dream", help="classic DeepDream on your photo at a layer: octaves and jitter (2015)")
    p.add_argument("photo", help="image file to dream on")
    p.add_argument("--layer", required=True, help="layer to dream at (`atlas layers MODEL`)")
    p.add_argument("--out", required=True, type=Path, help="the dreamt photo, PNG")
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `atlas models`)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's own)")
    p.add_argument("--side", type=int, default=512, help="the photo's longer side is scaled to at most this (px)")
    p.add_argument("--octaves", type=int, help="scales, each 1.4 times the last (default and the notebook's: 4)")
    p.add_argument("--steps", type=int, help="gradient steps per octave (default and the notebook's: 10)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args: argparse.Namespace) -> None:
        from PIL import Image

        from atlas.images import UNREADABLE, load_rgb
        from atlas.models.zoo import load_model
        from atlas.optvis.dream import OCTAVES, STEPS, dream_picture

        octaves = int(check_number("--octaves", OCTAVES if args.octaves is None else args.octaves, 1, 10))
        steps = int(check_number("--steps", STEPS if args.steps is None else args.steps, 1))
        side = int(check_number("--side", args.side, 32))
        try:
            picture = load_rgb(args.photo)
        except UNREADABLE as err:
            raise AtlasError(f"cannot read {args.photo}: {err}") from err
        model = load_model(args.model, weights=args.weights, device=str(resolve("render", args.device).device))
        layer = model.resolve_layer(args.layer)
        _photo, dreamt = dream_picture(model, picture, layer, side, octaves=octaves, steps=steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dreamt).save(args.out)
        print(f"{args.out}: {args.photo} dreamt at {model.name} {layer} ({octaves} octaves x {steps} steps)")

    p.set_defaults(run=run)


def _add_circuit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "circuit", help="how a unit is built from a layer below: expanded weights, attributions, ablation"
    )
    p.add_argument("unit", help="LAYER:UNIT, e.g. mixed4c:447")
    p.add_argument("--from", dest="below", required=True, help="the layer below, e.g. mixed4b")
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `atlas models`)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's own)")
    p.add_argument("--data", default="demo", help="images for the unit's top examples: folder, list or 'demo'")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--top-k", type=int, default=8, help="the unit's top examples the attributions are taken on")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args: argparse.Namespace) -> None:
        import json

        from atlas.images import list_images
        from atlas.microscope.circuits import unit_circuit
        from atlas.models.zoo import load_model

        layer, _, unit = args.unit.rpartition(":")
        if not layer or not unit.isdigit():
            raise AtlasError(f"{args.unit!r}: name the unit as LAYER:UNIT, e.g. mixed4c:447")
        top_k = int(check_number("--top-k", args.top_k, 1))
        model = load_model(args.model, weights=args.weights, device=str(resolve("render", args.device).device))
        records = list_images(args.data, model.class_names, model.imagenet_index)[: args.limit]
        report = unit_circuit(model, layer, int(unit), args.below, records, top_k=top_k)
        name = f"{report['layer']}:{report['unit']}"
        print(f"{name} from {report['below']}, on its top {len(report['examples'])} of {len(records)} images")
        if "no_weights" in report:
            print(f"  {report['no_weights']}")
        for lens in report["lenses"]:
            print(f"  {lens['how']}:")
            for sign in ("positive", "negative"):
                listed = ", ".join(f"{report['below']}:{c} {v:+.3g}" for c, v in lens[sign])
                print(f"    {sign:<9} {listed or '(none)'}")
        falls = ", ".join(
            f"{c} {100 * fall:.0f} % (shares {100 * report['shared_examples'][c]:.0f} % of its top examples)"
            for c, fall in sorted(report["ablation"].items(), key=lambda item: -item[1])
        )
        print(f"  zeroing each input, {name}'s activation on its top examples falls by: {falls}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    p.set_defaults(run=run)


def _add_project(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help="stage 2: 2-D layout of a layer's activations (UMAP or t-SNE), in [0, 1]")
    p.add_argument("store", help="HDF5 store with activations (`atlas collect`)")
    p.add_argument("--layer", help="the store's layer (default: its only one)")
    p.add_argument("--device", default=None, help="cpu or cuda, for kNN search and layout (default: cuda if there)")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.project import LayoutSettings, project_store

        settings = LayoutSettings.from_config(given(args, tuple(STAGE_FLAGS["project"][2])))
        layout = project_store(args.store, args.layer, settings, device=str(resolve("project", args.device).device))
        print(f"{args.store}: layout of {len(layout)} samples ({settings.method})")

    p.set_defaults(run=run)


def _add_grid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="stage 3: per-cell mean activations and attributions, and the whitening matrix")
    p.add_argument("store", help="HDF5 store with a layout (`atlas project`)")
    p.add_argument("--layer", help="the store's layer (default: its only one)")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.grid import GridSettings, grid_store

        settings = GridSettings.from_config(given(args, tuple(STAGE_FLAGS["grid"][2])))
        counts = grid_store(args.store, layer=args.layer, **dataclasses.asdict(settings))
        for size, count in counts.items():
            filled = (count >= settings.min_count).sum()
            print(f"grid {size}: {filled} of {size * size} cells hold >= {settings.min_count}")

    p.set_defaults(run=run)


# Each stage command's settings flags: module, settings class, and field -> help. The flags' types and defaults
# come from the class (atlas.config.add_flags), so a default is stated once; a flag not given is not passed.
# They are made for the command being run only, as importing the stages (torch, umap) takes seconds.
STAGE_FLAGS = {
    "collect": (
        "atlas.stages.collect",
        "CollectSettings",
        {
            "positions": "random interior positions per image (paper: 1)",
            "seed": "seed of the positions",
            "batch_size": "images per batch",
            "workers": "image-loading processes (none: up to 4); with --cluster: dask workers",
            "precision": "autocast precision: auto, fp32 or bf16 (atlas/runtime.py)",
            "memory_format": "model and input memory format: auto, contiguous or channels_last",
            "attribution": "gradient (h . grad, the paper's), integrated (integrated gradients from the layer's mean "
            "activation) or occlusion (none: the model's, `atlas models`)",
            "attribution_steps": "integration points of --attribution integrated",
            "baseline_images": "images whose mean activation is the baseline of integrated and occlusion",
        },
    ),
    "project": (
        "atlas.layout",
        "LayoutSettings",
        {
            "method": "umap or tsne",
            "n_neighbors": "UMAP neighbours (paper: 50; mixed3a/3b: 200)",
            "min_dist": "UMAP min_dist (paper: 0.05)",
            "metric": "distance (paper: cosine; mixed3a/3b: euclidean)",
            "perplexity": "t-SNE perplexity (lucid's notebooks: 50)",
            "knn": "UMAP's neighbour search: auto (exact on a GPU or for small inputs, else nndescent), umap-learn, "
            "nndescent (pynndescent on all cores) or exact (torch, on --device)",
            "sgd": "UMAP's layout SGD: torch (umap-learn's schedule, vectorised, on --device) or umap-learn (CPU)",
            "init": "UMAP's initial layout: pca or spectral (the paper's, far slower at large N)",
            "seed": "seed of the layout (none: unseeded)",
        },
    ),
    "grid": (
        "atlas.stages.grid",
        "GridSettings",
        {
            "sizes": "comma-separated grid sizes (paper: 20,40,80,160; 320)",
            "min_count": "samples a cell needs (lucid's: more than 5)",
        },
    ),
    "render": (
        "atlas.stages.render",
        "RenderSettings",
        {
            "size": "icon size in px (paper: 80)",
            "steps": "optimisation steps (paper: 1024)",
            "attempts": "attempts per icon, best kept (paper: 4)",
            "cossim_pow": "exponent of the cosine in the objective",
            "transforms": "atlas (paper), standard (lucid), crops or none",
            "param": PARAM_HELP,
            "lr": "learning rate (none: the parameterisation's own)",
            "decay_power": "fft spectrum 1/f^decay_power (lucid's: 1)",
            "whiten": "whiten the target direction by the layer's covariance (paper)",
            "accentuate": "start each icon from its cell's most typical example patch and change no pixel by more "
            "than this distance (0-1; feature accentuation); none: from noise (paper)",
            "seed": "seed of the icons' starting noise",
        },
    ),
    "compose": (
        "atlas.stages.compose",
        "ComposeSettings",
        {
            "labels": "write top-class labels into atlas.png",
            "examples": "dataset example patches per cell (0: none)",
            "tile_format": "Deep Zoom tiles: jpg or png",
        },
    ),
}
THREADS_HELP = (
    "torch's CPU threads (default: the cores this process may use, fewer when other processes keep them busy)"
)
COMMANDS = [
    _add_models,
    _add_layers,
    _add_collect,
    _add_project,
    _add_grid,
    _add_render,
    _add_compose,
    _add_view,
    _add_dream,
    _add_circuit,
    add_run,
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `atlas` parser; with the name of the stage command being run, that command's settings flags too."""
    parser = Parser(prog="atlas", description="Activation atlases for PyTorch image classifiers")
    parser.add_argument("--version", action="version", version=f"atlas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    if command in STAGE_FLAGS:
        module, name, helps = STAGE_FLAGS[command]
        add_flags(sub.choices[command], getattr(importlib.import_module(module), name), helps)
    return parser


# sub-commands that became runs: the old name prints one line naming the new one
MOVED = {name: f"atlas run {name}" for name in ("class-atlas", "microscope", "patch")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    if command in MOVED:
        print(f"atlas {command}: moved: use `{MOVED[command]}` (same arguments)", file=sys.stderr)
        return 2
    args = build_parser(next((word for word in argv if word in STAGE_FLAGS), None)).parse_args(argv)
    command = " ".join(["atlas", args.command, *([args.pipeline] if args.command == "run" else [])])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        check_edge(args)
        args.run(args)
    except AtlasError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; finished work is kept, rerun the same command to go on", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader has gone (`atlas layers ... | head`): stop without a word, and keep Python's flush at exit quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    return 0


def check_edge(args: argparse.Namespace) -> None:
    """The flags every sub-command shares, checked before any work: --device against the devices torch sees, and
    --limit (the stages check their own numbers, for the command line and configs alike); then torch's threads."""
    if getattr(args, "device", None):
        check_device(args.device)
    if getattr(args, "limit", None) is not None:
        check_number("--limit", args.limit, 1)
    logging.getLogger("atlas").debug("%d torch threads", set_threads(args.threads))


if __name__ == "__main__":
    sys.exit(main())
