"""`atlas` command line: one sub-command per stage, each a thin wrapper over the stage's functions, and `atlas run`
for the multi-stage runs (atlas.runs, over pipelines/). The Makefile calls only this.

Each sub-command is added by one `_add_<name>` function below; `main` catches AtlasError and prints
it on one line, for every command alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from atlas import AtlasError, __version__
from atlas.config import PARAM_CHOICES, PARAM_HELP, Parser, check_number, given
from atlas.runs import add_run
from atlas.runtime import check_device, resolve, set_threads


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
    p = sub.add_parser("models", help="list the model zoo: name, input size, default layer, weights source")

    def run(_args: argparse.Namespace) -> None:
        from atlas.models.registry import zoo_table

        for name, size, layer, weights in zoo_table():
            print(f"{name:<20}{size:<10}{layer:<14}{weights}")
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
    # the flags' defaults are CollectSettings' (atlas/stages/collect.py): a flag not given is not passed
    p.add_argument("--positions", type=int, help="random interior positions per image (default and paper: 1)")
    p.add_argument("--seed", type=int, help="seed of the positions (default 0)")
    p.add_argument("--batch-size", type=int, help="images per batch (default 32)")
    p.add_argument(
        "--workers", type=int, help="image-loading processes (default: up to 4); with --cluster: dask workers"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_runtime(p)
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

    flags = ("positions", "seed", "batch_size", "workers", "precision", "memory_format")
    settings = dataclasses.asdict(CollectSettings.from_config(given(args, flags)))
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
    # the flags' defaults are RenderSettings' (atlas/stages/render.py): a flag not given is not passed
    p.add_argument("--size", type=int, help="icon size in px (default and paper: 80)")
    p.add_argument("--steps", type=int, help="optimisation steps (default and paper: 1024)")
    p.add_argument("--attempts", type=int, help="attempts per icon, best kept (default and paper: 4)")
    p.add_argument(
        "--batch-size", type=int, help="icon attempts optimised together (default: fit GPU memory; 16 on CPU)"
    )
    p.add_argument("--cossim-pow", type=float, help="exponent of the cosine in the objective (default 4)")
    p.add_argument("--transforms", help="atlas (default, paper), standard (lucid), crops or none")
    p.add_argument("--param", choices=PARAM_CHOICES, help=PARAM_HELP)
    p.add_argument("--lr", type=float, help="learning rate (default: the parameterisation's own)")
    p.add_argument("--decay-power", type=float, help="fft spectrum 1/f^decay_power (default 1, lucid's)")
    p.add_argument(
        "--no-whiten", dest="whiten", action="store_false", default=None, help="do not whiten the target direction"
    )
    p.add_argument(
        "--accentuate",
        type=float,
        metavar="DISTANCE",
        help="start each icon from its cell's most typical example patch and change no pixel by more than DISTANCE "
        "(0-1; feature accentuation). Default: start from noise (paper)",
    )
    p.add_argument("--model", help="override the store's model")
    p.add_argument("--weights", help="override the store's weights: a file, or 'random'")
    p.add_argument("--seed", type=int, help="seed of the icons' starting noise (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_runtime(p)
    p.add_argument("--cluster", help=CLUSTER_HELP)
    p.add_argument("--workers", type=int, help="with --cluster: dask workers")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.render import RenderSettings, render_store
        from pipelines.atlas import regrid_stale

        regrid_stale(Path(args.store), args.layer, args.grid)  # a render after `atlas project` renders its layout
        flags = [field.name for field in dataclasses.fields(RenderSettings)]
        options = dict(
            layer=args.layer,
            grid=args.grid,
            settings=RenderSettings.from_config(given(args, flags)),
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


def _add_compose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="stage 5: atlas images, zoomable tiles, cell metadata and the viewer")
    p.add_argument("store", help="HDF5 store with rendered icons")
    p.add_argument("--out", required=True, help="run folder to write (re-running adds to it)")
    p.add_argument("--layer", action="append", help="layer to compose (repeatable; default: all rendered)")
    p.add_argument("--grid", type=int, action="append", help="grid size (repeatable; default: all rendered)")
    # the flags' defaults are ComposeSettings' (atlas/stages/compose.py)
    p.add_argument(
        "--no-labels",
        dest="labels",
        action="store_false",
        default=None,
        help="do not write top-class labels into atlas.png",
    )
    p.add_argument("--examples", type=int, help="dataset example patches per cell (default 4; 0: none)")
    p.add_argument("--tile-format", choices=["jpg", "png"], help="Deep Zoom tiles (default jpg)")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.compose import ComposeSettings, compose_run

        settings = ComposeSettings.from_config(given(args, ("labels", "examples", "tile_format")))
        index = compose_run(args.store, args.out, layers=args.layer, grids=args.grid, settings=settings)
        print(f"{index}  (view it: atlas view {args.out})")

    p.set_defaults(run=run)


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="serve a run folder's viewer on 127.0.0.1 and print its URL")
    p.add_argument("run_dir", help="run folder written by `atlas compose`")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")

    def run(args: argparse.Namespace) -> None:
        from atlas.view import serve

        serve(args.run_dir, port=args.port)

    p.set_defaults(run=run)


def _add_project(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help="stage 2: 2-D layout of a layer's activations (UMAP or t-SNE), in [0, 1]")
    p.add_argument("store", help="HDF5 store with activations (`atlas collect`)")
    p.add_argument("--layer", help="the store's layer (default: its only one)")
    # the flags' defaults are LayoutSettings' (atlas/layout.py): a flag not given is not passed
    p.add_argument("--method", choices=["umap", "tsne"], help="default: umap")
    p.add_argument("--n-neighbors", type=int, help="UMAP neighbours (default and paper: 50; mixed3a/3b: 200)")
    p.add_argument("--min-dist", type=float, help="UMAP min_dist (default and paper: 0.05)")
    p.add_argument("--metric", help="distance (default and paper: cosine; mixed3a/3b: euclidean)")
    p.add_argument("--perplexity", type=float, help="t-SNE perplexity (default and lucid notebooks: 50)")
    p.add_argument(
        "--knn",
        choices=["auto", "umap-learn", "nndescent", "exact"],
        help="UMAP's neighbour search: umap-learn's own, pynndescent on all cores, or exact in torch on --device "
        "(default auto: exact on a GPU or for small inputs, else pynndescent on all cores)",
    )
    p.add_argument(
        "--sgd",
        choices=["torch", "umap-learn"],
        help="UMAP's layout SGD: umap-learn's schedule vectorised in torch on --device (default), or umap-learn's "
        "own (CPU)",
    )
    p.add_argument(
        "--init",
        choices=["pca", "spectral"],
        help="UMAP's initial layout (default: pca; spectral, the paper's, is far slower at large N)",
    )
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", default=None, help="cpu or cuda, for kNN search and layout (default: cuda if there)")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.project import LayoutSettings, project_store

        flags = ("method", "n_neighbors", "min_dist", "metric", "perplexity", "knn", "sgd", "init", "seed")
        settings = LayoutSettings.from_config(given(args, flags))
        layout = project_store(args.store, args.layer, settings, device=str(resolve("project", args.device).device))
        print(f"{args.store}: layout of {len(layout)} samples ({settings.method})")

    p.set_defaults(run=run)


def _add_grid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="stage 3: per-cell mean activations and attributions, and the whitening matrix")
    p.add_argument("store", help="HDF5 store with a layout (`atlas project`)")
    p.add_argument("--layer", help="the store's layer (default: its only one)")
    # the flags' defaults are GridSettings' (atlas/stages/grid.py): a flag not given is not passed
    p.add_argument("--sizes", help="comma-separated grid sizes (default 20,40,80; paper: 20,40,80,160; 320)")
    p.add_argument("--min-count", type=int, help="samples a cell needs (default 6, lucid's: more than 5)")

    def run(args: argparse.Namespace) -> None:
        from atlas.stages.grid import GridSettings, grid_store

        if args.sizes is not None:
            try:
                args.sizes = [int(size) for size in args.sizes.split(",")]
            except ValueError as err:
                raise AtlasError(f"--sizes wants comma-separated integers, not {args.sizes!r}") from err
        settings = GridSettings.from_config(given(args, ("sizes", "min_count")))
        counts = grid_store(args.store, layer=args.layer, **dataclasses.asdict(settings))
        for size, count in counts.items():
            filled = (count >= settings.min_count).sum()
            print(f"grid {size}: {filled} of {size * size} cells hold >= {settings.min_count}")

    p.set_defaults(run=run)


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
    add_run,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="atlas", description="Activation atlases for PyTorch image classifiers")
    parser.add_argument("--version", action="version", version=f"atlas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
