"""The package version, in one place: pyproject.toml reads it from here (setuptools dynamic
version), the package exports it, and model files and checkpoints record it."""

__version__ = "0.4.0"
