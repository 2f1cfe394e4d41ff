"""The command line moved to `pipelines.cli` (the library does not import its orchestration): the `atlas` command
runs it, and this old name says where it went."""

import sys

MOVED = "atlas.cli moved to pipelines.cli: run `atlas ...` or `python -m pipelines.cli ...`"


def __getattr__(name: str) -> object:
    raise AttributeError(f"{MOVED} (pipelines.cli.{name})")


if __name__ == "__main__":
    sys.exit(MOVED)
