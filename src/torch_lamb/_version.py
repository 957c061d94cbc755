"""The version, in a module that imports nothing: ``torch-lamb --version`` reads it without importing torch,
and pyproject.toml reads it (statically) as the package's version."""

__version__ = "0.1.0"
