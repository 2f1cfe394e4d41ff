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


COMMANDS = [_add_layers]


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
