"""The package's version, from its one source (pyproject.toml, through the installed metadata)."""

from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version


@lru_cache(maxsize=1)
def version() -> str:
    try:
        return _metadata_version("fastkd")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
