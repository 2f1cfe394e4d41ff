"""`atlas run`: the multi-stage runs, each a thin command over its pipeline in pipelines/ (the CLI over pipelines/
over the library): `atlas run atlas` (make atlas), `class-atlas`, `microscope` and `patch`."""

from __future__ import annotations

import argparse
from pathlib import Path

from atlas import AtlasError
from atlas.config import PARAM_CHOICES, PARAM_HELP, given


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="a multi-stage run: atlas (make atlas), class-atlas, microscope or patch")
    runs = p.add_subparsers(dest="pipeline", required=True, metavar="RUN")
    for add in (_add_atlas, _add_class_atlas, _add_microscope, _add_patch):
        add(runs)


def layer_list(text: str) -> list[str]:
    """`a,b,c` (spaces free) as a list of layer names, each once."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"no layer named in {text!r}")
    return names


def _add_atlas(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("atlas", help="collect -> project -> grid -> render -> compose into one run folder (make atlas)")
    p.add_argument("--config", help="config file (default: configs/<model>.yaml, else the offline default's)")
    p.add_argument("--model", help="model (default: the zoo model that owns --layer, else the config's)")
    p.add_argument(
        "--layer",
        "--layers",
        dest="layers",
        type=layer_list,
        help="a layer, or several as a,b,c: collected in one pass, each atlas beside the others (default: the "
        "config's layer: or layers:)",
    )
    p.add_argument("--data", help="image folder, text file of paths, or 'demo'")
    p.add_argument("--limit", type=int, help="use the first N images only")
    p.add_argument("--device")
    p.add_argument("--weights", help="weights file, or 'random'")
    p.add_argument("--out", type=Path, help="run folder (default: data/runs/<model>-<layer>[+<layer>...])")
    p.add_argument(
        "--force",
        nargs="*",
        metavar="STAGE",
        help="redo these stages (collect, project, grid, render, compose; none named: all) and every later one, "
        "whatever the store holds",
    )

    def run(args: argparse.Namespace) -> None:
        from pipelines.atlas import STAGES, pick_model, run_atlas

        unknown = sorted(set(args.force or ()) - set(STAGES))
        if unknown:
            raise AtlasError(f"--force {' '.join(unknown)}: the stages are {', '.join(STAGES)}")
        model_name, config_file = pick_model(args.model, args.layers, args.config)
        force = STAGES if args.force == [] else args.force or ()
        index = run_atlas(
            config_file,
            model_name,
            args.layers,
            args.data,
            args.limit,
            args.device,
            args.out,
            args.weights,
            force,
            args.threads,
        )
        pngs = sorted(index.parent.glob("layer-*/grid-*/atlas.png"))
        print(f"\natlas images: {', '.join(str(p) for p in pngs) or '(none)'}")
        print(f"viewer:       {index}  (serve it with `make view OUT={index.parent}` or `atlas view {index.parent}`)")
        if args.layers and len(args.layers) > 1:
            print(f"side by side: {index.parent / 'layers.html'}")

    p.set_defaults(run=run)


def _add_class_atlas(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("class-atlas", help="class activation atlas of one class, or a two-class comparison (--vs)")
    p.add_argument(
        "store", nargs="?", type=Path, help="HDF5 store with activations and attributions (default: make atlas's)"
    )
    p.add_argument(
        "--layer",
        "--layers",
        dest="layers",
        type=layer_list,
        help="the store's layer, or several as a,b,c: a class atlas of each (default: the store's only one)",
    )
    p.add_argument("--class", dest="class_name", required=True, help="class name (case and spacing free) or index")
    p.add_argument("--vs", help="second class: lay the samples out by attribution difference (--class left)")
    p.add_argument("--out", type=Path, help="run folder (default: the store's; other atlases in it are kept)")
    p.add_argument("--config", help="settings file (default: configs/<the store's model>.yaml, class_atlas:)")
    p.add_argument("--method", choices=["tsne", "umap"], help="class atlas layout (default t-SNE, the article's)")
    p.add_argument("--top", type=int, help="magnitude filter: top N positive attributions (paper: 3000; --vs: 2000)")
    p.add_argument("--size", type=int, help="icon size in px (paper: 80)")
    p.add_argument("--steps", type=int, help="optimisation steps (paper: 1056)")
    p.add_argument("--attempts", type=int, help="attempts per icon, best kept (paper: 3)")
    p.add_argument("--batch-size", type=int, help="icon attempts optimised together")
    p.add_argument("--param", choices=PARAM_CHOICES, help=PARAM_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="build it even for a class no sample has as top class")

    def run(args: argparse.Namespace) -> None:
        import time

        from pipelines.class_atlas import default_store, print_written, run_class_atlas

        store = args.store or default_store()
        out = args.out or store.parent

        chosen = {
            "select": {"top": args.top},
            "project": {"method": args.method},
            "render": {
                "size": args.size,
                "steps": args.steps,
                "attempts": args.attempts,
                "param": args.param,
            },
        }
        overrides = {section: {k: v for k, v in values.items() if v is not None} for section, values in chosen.items()}
        started = time.perf_counter()
        entries = []
        for layer in args.layers or [None]:  # the class traced through the layers: one class atlas each
            entries += run_class_atlas(
                store,
                out,
                args.class_name,
                args.vs,
                layer,
                args.config,
                args.device,
                overrides,
                args.batch_size,
                args.force,
            )
        print_written(entries, out, time.perf_counter() - started)

    p.set_defaults(run=run)


def _add_microscope(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "microscope",
        help="a page per unit of one or more layers: feature visualisations, dataset examples, circuit, atlas cell",
    )
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `atlas layers`)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's ImageNet weights)")
    p.add_argument(
        "--layer",
        "--layers",
        dest="layers",
        type=layer_list,
        help="layer, or layers a,b,c (each but the lowest gets its circuit from the next one below), or 'all': the "
        "model's Microscope layers (default: the model's atlas layer)",
    )
    p.add_argument("--data", default="demo", help="image folder, text file of image paths, or 'demo'")
    p.add_argument("--units", help="N (the first N units) or a list such as 3,7,10-20 (default: every unit)")
    p.add_argument("--out", required=True, help="site folder (rerunning adds to it and reuses what is done)")
    # the lens flags' defaults are LensSettings' (atlas/microscope/lenses.py): a flag not given is not passed
    p.add_argument("--steps", type=int, help="optimisation steps (default and lucid's: 512)")
    p.add_argument("--size", type=int, help="visualisation size in px (default and lucid's: 128)")
    p.add_argument("--top-k", type=int, default=8, help="dataset examples per unit")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--photos", action="append", help="photo to caricature (repeatable; default: some from --data)")
    p.add_argument("--caricatures", type=int, default=4, help="photos from --data to caricature without --photos")
    p.add_argument(
        "--lenses",
        type=layer_list,
        help="unit lenses, of channel,neuron,diversity (default: all three; channel is the unit page's own, so always "
        "in): fewer cost less (diversity optimises 4 images per unit)",
    )
    p.add_argument("--atlas", help="run folder with this layer's atlas to link units to (default: --out)")
    p.add_argument("--store", help="that atlas's HDF5 store (default: ATLAS/store.h5)")
    p.add_argument("--batch-size", type=int, help="units optimised together (default: fit GPU memory; 16 on CPU)")
    p.add_argument("--param", choices=PARAM_CHOICES, help=PARAM_HELP)
    p.add_argument("--seed", type=int, help="seed of the starting noise (default 0)")
    p.add_argument("--workers", type=int, help="image-loading processes (default: up to 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args: argparse.Namespace) -> None:
        from atlas.microscope.lenses import LensSettings
        from pipelines.microscope import run_microscope

        summary = run_microscope(
            args.model,
            args.out,
            layers=args.layers,
            data=args.data,
            units=args.units,
            lens=LensSettings.from_config(given(args, ("size", "steps", "param", "seed"))),
            top_k=args.top_k,
            limit=args.limit,
            photos=args.photos,
            caricatures=args.caricatures,
            lenses=args.lenses,
            atlas=args.atlas,
            store=args.store,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            weights=args.weights,
        )
        reused = "" if summary["dataset_pass"] else " (reused)"
        print(
            f"{summary['model']} {', '.join(summary['layers'])}: "
            + ", ".join(f"{layer} {count} unit pages" for layer, count in summary["pages"].items())
            + f"; {summary['rendered']} units visualised and {summary['circuits']} circuits computed "
            f"({summary['units_s'] + summary['circuits_s']:.0f} s); dataset examples {summary['examples_s']:.0f} s"
            f"{reused}; DeepDream, dreams and caricatures {summary['layer_s']:.0f} s; site {summary['site_s']:.0f} s"
            f"{'; linked to the atlas of ' + ', '.join(summary['atlas']) if summary['atlas'] else ''}\n"
            f"{summary['index']}"
        )

    p.set_defaults(run=run)


def _add_patch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patch", help="adversarial patch lab: paste a picture on images and count flips to a target class"
    )
    p.add_argument("--model", help="model name (default: efficientnet-lite0; with --suggest: the store's model)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's ImageNet weights)")
    p.add_argument("--patch", help="image file, crop image@x0,y0,x1,y1, or atlas icon store.h5:layer:G:x=X,y=Y")
    p.add_argument("--data", help="image folder, text file of image paths, or 'demo'")
    p.add_argument("--target", help="class the patch should flip images to (name or index)")
    p.add_argument("--source", help="patch only images of this class (default: all labelled images, own labels)")
    p.add_argument("--out", help="report folder: report.json, report.md, thumbs/")
    p.add_argument("--size", type=float, help="patch side as a fraction of the input (default 0.4, the paper's)")
    p.add_argument("--corner", choices=["tl", "tr", "bl", "br"], help="where the patch goes (default: tl)")
    p.add_argument("--search", action="store_true", help="keep the best of 4 corners x --sizes per image")
    p.add_argument("--sizes", help="sizes tried by --search (default 0.2,0.3,0.4,0.5)")
    p.add_argument("--limit", type=int, help="use only the first N selected images")
    # the defaults of --size, --corner, --examples, --seed and --batch-size are PatchSettings' (atlas/patch.py)
    p.add_argument("--examples", type=int, help="before/after pairs in the report's strip (default 8)")
    p.add_argument("--seed", type=int, help="seed of the noise control (default 0)")
    p.add_argument("--batch-size", type=int, help="images per batch (default 32)")
    p.add_argument("--workers", type=int, help="image-loading processes (default: up to 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_patch_suggest(p)
    p.set_defaults(run=_run_patch)


def _add_patch_suggest(p: argparse.ArgumentParser) -> None:
    """`atlas run patch --suggest`'s own arguments."""
    p.add_argument("--suggest", nargs=2, metavar=("SOURCE", "TARGET"), help="rank atlas cells as patch candidates")
    p.add_argument("--store", help="with --suggest: a store with grids")
    p.add_argument("--layer", help="with --suggest: the store's layer (default: its only one)")
    p.add_argument("--grid", type=int, help="with --suggest: grid size (default: the layer's only grid)")
    p.add_argument("--top", type=int, default=10, help="with --suggest: cells to list")


def _run_patch(args: argparse.Namespace) -> None:
    from atlas import patch as lab
    from pipelines.patch import run_patch_experiment

    if args.suggest:
        _print_suggestions(args)
        return
    missing = [flag for flag in ("patch", "data", "target", "out") if not getattr(args, flag)]
    if missing:
        raise AtlasError(f"missing --{', --'.join(missing)} (or use --suggest SOURCE TARGET)")
    try:
        sizes = tuple(float(v) for v in args.sizes.split(",")) if args.sizes else lab.SEARCH_RATIOS
    except ValueError as err:
        raise AtlasError(f"--sizes {args.sizes!r} is not a comma-separated list of fractions") from err
    placed = {"ratios": sizes, "corners": tuple(lab.CORNERS)} if args.search else {}
    if not args.search:
        placed = {"ratios": (args.size,)} if args.size is not None else {}
        placed |= {"corners": (args.corner,)} if args.corner else {}
    settings = lab.PatchSettings.from_config({**placed, **given(args, ("examples", "seed", "batch_size"))})
    report, path = run_patch_experiment(
        args.patch,
        args.data,
        args.target,
        args.out,
        model_name=args.model or "efficientnet-lite0",
        weights=args.weights,
        source=args.source,
        settings=settings,
        limit=args.limit,
        workers=args.workers,
        device=args.device,
    )
    print(
        f"{report['n']} images correct before: flip to {report['target']} {report['flip_rate']:.1%} "
        f"(noise {report['noise_flip_rate']:.1%}), leave source {report['leave_rate']:.1%} "
        f"(noise {report['noise_leave_rate']:.1%}) -> {path}"
    )


def _print_suggestions(args: argparse.Namespace) -> None:
    from pipelines.patch import suggest_patches

    if not args.store:
        raise AtlasError("--suggest needs --store, a store with grids")
    cells = suggest_patches(
        args.store, *args.suggest, model_name=args.model, layer=args.layer, grid=args.grid, top=args.top
    )
    print("cell (x,y)\tcount\tscore\tpatch")
    for c in cells:
        print(f"{c['cell'][0]},{c['cell'][1]}\t{c['count']}\t{c['score']:.4g}\t{c['spec']}")
