"""The name this project installs under, and the unrelated PyPI project that shares its module name.

The distribution is ``kawhi-rl`` (``pip install kawhi-rl``); the import packages are
``kawhi`` (engine, server, CLI) and ``kawhi_client`` (the light SDK). The PyPI name
``kawhi`` belongs to an unrelated project that also installs a top-level module
``kawhi``: with both in one environment one package's files overwrite the other's, and
uninstalling either deletes files the other needs. Nothing here can repair that, so both
of our packages say so in one line at import (a warning, not an error: the environment
may still work, and the user decides what to remove).
"""

from __future__ import annotations

import importlib.metadata
import warnings

DISTRIBUTION = "kawhi-rl"
# Our own summary (pyproject.toml): an older editable install of this project under the
# name "kawhi" carries it and is not the foreign package.
OUR_SUMMARY_PREFIX = "KAWHI reward shaping"


def foreign_kawhi_message() -> str | None:
    """One line when the unrelated ``kawhi`` distribution is installed here, else None."""
    try:
        dist = importlib.metadata.distribution("kawhi")
    except importlib.metadata.PackageNotFoundError:
        return None
    summary = dist.metadata.get("Summary") or ""
    if summary.startswith(OUR_SUMMARY_PREFIX):
        return None
    return (f"the unrelated PyPI package 'kawhi' {dist.version} ({summary.strip() or 'no summary'}) is installed "
            f"and also provides the module 'kawhi'; this project is '{DISTRIBUTION}': "
            f"pip uninstall kawhi {DISTRIBUTION} && pip install {DISTRIBUTION}")


_checked = False


def warn_if_foreign_kawhi() -> None:
    """Warn once per process (``kawhi`` imports ``kawhi_client``; one line, not two)."""
    global _checked
    if _checked:
        return
    _checked = True
    message = foreign_kawhi_message()
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
