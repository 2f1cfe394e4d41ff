"""`atlas` command line: one sub-command per stage, each a thin wrapper over the stage's functions.

Each sub-command is added by one `_add_<name>` function below; `main` catches AtlasError and prints
it on one line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from atlas import AtlasError, __version__


def _add_layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list a model's layers: name, channels, height, width")
    p.add_argument("model", help="zoo name (inceptionv1, efficientnet-lite0), torchvision name, or pkg.mod:factory")
    p.add_argument("--weights", help="weights file, or 'random'")

    def run(args: argparse.Namespace) -> None:
        from atlas.models import load_model

        model = load_model(args.model, weights=args.weights or "random")  # shapes do not need trained weights
        for name, channels, height, width in model.layer_shapes():
            print(f"{name}\t{channels}\t{height}\t{width}")

    p.set_defaults(run=run)


def _add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="stage 1: activations and attributions of a dataset into an HDF5 store")
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `atlas layers`)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's ImageNet weights)")
    p.add_argument("--layer", action="append", help="layer to collect (repeatable; default: the model's atlas layer)")
    p.add_argument("--data", required=True, help="image folder, text file of image paths, or 'demo'")
    p.add_argument("--out", required=True, help="HDF5 store to write")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--positions", type=int, default=1, help="random interior positions per image (paper: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="image-loading processes (default: up to 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args: argparse.Namespace) -> None:
        from atlas.collect import collect
        from atlas.images import list_images
        from atlas.models import load_model

        device = args.device or default_device()
        model = load_model(args.model, weights=args.weights, device=device)
        records = list_images(args.data, model.class_names)[: args.limit]
        out = collect(
            model,
            records,
            args.out,
            layers=args.layer,
            positions=args.positions,
            seed=args.seed,
            batch_size=args.batch_size,
            workers=args.workers,
            device=device,
            dataset=str(args.data),
        )
        print(out)

    p.set_defaults(run=run)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_patch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patch", help="adversarial patch lab: paste a picture on images and count flips to a target class"
    )
    p.add_argument("--model", help="model name (default: efficientnet-lite0; with --suggest: the store's model)")
    p.add_argument("--weights", help="weights file, or 'random' (default: the model's ImageNet weights)")
    p.add_argument("--patch", help="image file, crop image@x0,y0,x1,y1, or atlas icon store.h5:layer:G:y,x")
    p.add_argument("--data", help="image folder, text file of image paths, or 'demo'")
    p.add_argument("--target", help="class the patch should flip images to (name or index)")
    p.add_argument("--source", help="patch only images of this class (default: all labelled images, own labels)")
    p.add_argument("--out", help="report folder: report.json, report.md, thumbs/")
    p.add_argument("--size", type=float, help="patch side as a fraction of the input (default 0.4, the paper's)")
    p.add_argument("--corner", choices=["tl", "tr", "bl", "br"], default="tl")
    p.add_argument("--search", action="store_true", help="keep the best of 4 corners x --sizes per image")
    p.add_argument("--sizes", help="sizes tried by --search (default 0.2,0.3,0.4,0.5)")
    p.add_argument("--limit", type=int, help="use only the first N selected images")
    p.add_argument("--examples", type=int, default=8, help="before/after pairs in the report's strip")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise control")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="image-loading processes (default: up to 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--suggest", nargs=2, metavar=("SOURCE", "TARGET"), help="rank atlas cells as patch candidates")
    p.add_argument("--store", help="with --suggest: a store with grids")
    p.add_argument("--layer", help="with --suggest: the store's layer (default: its only one)")
    p.add_argument("--grid", type=int, help="with --suggest: grid size (default: the layer's only grid)")
    p.add_argument("--top", type=int, default=10, help="with --suggest: cells to list")

    def run(args: argparse.Namespace) -> None:
        from atlas import patch as lab
        from atlas.classes import resolve_class
        from atlas.images import list_images
        from atlas.models import load_model
        from atlas.store import open_store

        if args.suggest:
            if not args.store:
                raise AtlasError("--suggest needs --store, a store with grids")
            with open_store(args.store) as f:
                model_name = args.model or str(f.attrs.get("model", ""))
            names = load_model(model_name, weights="random").class_names  # names only: no weights needed
            source, target = (resolve_class(name, names) for name in args.suggest)
            print("cell\tcount\tscore\tpatch")
            for c in lab.suggest_cells(args.store, source, target, layer=args.layer, grid=args.grid, top=args.top):
                print(f"{c['cell'][0]},{c['cell'][1]}\t{c['count']}\t{c['score']:.4g}\t{c['spec']}")
            return
        missing = [flag for flag in ("patch", "data", "target", "out") if not getattr(args, flag)]
        if missing:
            raise AtlasError(f"missing --{', --'.join(missing)} (or use --suggest SOURCE TARGET)")
        try:
            sizes = tuple(float(v) for v in args.sizes.split(",")) if args.sizes else lab.SEARCH_RATIOS
        except ValueError as err:
            raise AtlasError(f"--sizes {args.sizes!r} is not a comma-separated list of fractions") from err
        device = args.device or default_device()
        model = load_model(args.model or "efficientnet-lite0", weights=args.weights, device=device)
        target = resolve_class(args.target, model.class_names)
        source = resolve_class(args.source, model.class_names) if args.source else None
        patch = lab.load_patch(args.patch)
        records = list_images(args.data, model.class_names)
        records = lab.select_records(records, target, source, exclude=lab.patch_file(args.patch))[: args.limit]
        report, examples = lab.measure_patch(
            model,
            patch,
            records,
            target,
            source,
            ratios=sizes if args.search else (args.size or lab.DEFAULT_RATIO,),
            corners=tuple(lab.CORNERS) if args.search else (args.corner,),
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            examples=args.examples,
            workers=args.workers,
        )
        path = lab.write_report(report, examples, patch, args.out, patch_spec=args.patch)
        print(
            f"{report['n']} images correct before: flip to {report['target']} {report['flip_rate']:.1%} "
            f"(noise {report['noise_flip_rate']:.1%}), leave source {report['leave_rate']:.1%} "
            f"(noise {report['noise_leave_rate']:.1%}) -> {path}"
        )

    p.set_defaults(run=run)


COMMANDS = [_add_layers, _add_collect, _add_patch]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas", description="Activation atlases for PyTorch image classifiers")
    parser.add_argument("--version", action="version", version=f"atlas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        args.run(args)
    except AtlasError as err:
        print(f"atlas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"atlas {args.command}: interrupted; finished work is kept, rerun the same command to go on",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
