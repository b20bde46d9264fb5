"""qatlm's version, read from the installed package's metadata (pyproject.toml is its one source)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qatlm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
