"""The version, written once: the package, ``--version`` and pyproject.toml read it here."""

VERSION = "0.1.0"
