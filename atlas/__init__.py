"""activation-atlas: activation atlases for PyTorch image classifiers.

Stages, one module each, talking only through the HDF5 store (see `atlas.store`):
collect -> project -> grid -> render -> compose.
"""

__version__ = "0.1.0"


class AtlasError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""
