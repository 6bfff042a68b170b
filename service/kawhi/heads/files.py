"""Heads files, and the one rule that decides which heads a loaded model uses.

A heads file is JSON; ``kawhi heads discover`` writes one, and only two keys matter
to the server::

    {"format": "kawhi-heads/1",
     "model": {"model_type": "qwen2_5_vl", "num_hidden_layers": 28, "hidden_size": 3584,
               "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
     "heads": [0, 1, 3, 22],
     ...}                      # the discovery report, ignored when loading

Precedence (first that exists wins):

1. a heads file given explicitly (``--heads-file``, ``KAWHI_HEADS_FILE``,
   ``Engine.load(heads_file=...)``);
2. ``kawhi_heads.json`` in the model folder;
3. the published set for the model's identity (:mod:`kawhi.heads.presets`);
4. all heads.

A heads file made for another model (its ``model`` differs from the loaded model's
identity in any shape field) is refused with one line; it is never silently ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kawhi.heads.identity import IdentityError, ModelIdentity
from kawhi.heads.presets import published_heads

FORMAT = "kawhi-heads/1"
FOLDER_HEADS_FILE = "kawhi_heads.json"
ALL_HEADS_SOURCE = "all (no set known)"


class HeadsFileError(ValueError):
    """A heads file that cannot be used for the loaded model; the message is one line."""


@dataclass(frozen=True)
class HeadSet:
    """The heads alpha averages over under ``heads="preset"``, and where they came from.

    heads: sorted query-head indices, or None for all heads. source:
    ``published:<name>``, ``file:<path>`` or ``all (no set known)``.
    """

    heads: tuple[int, ...] | None
    source: str


def read_heads_file(path: str | Path) -> tuple[ModelIdentity, tuple[int, ...]]:
    """(model identity, heads) of a heads file. Raises HeadsFileError (one line)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeadsFileError(f"heads file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadsFileError(f"cannot read heads file {path}: {exc}") from None
    except ValueError as exc:
        raise HeadsFileError(f"heads file {path} is not JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise HeadsFileError(f"heads file {path} must hold a JSON object")
    try:
        identity = ModelIdentity.from_dict(raw.get("model"), where=f"heads file {path}: model")
    except IdentityError as exc:
        raise HeadsFileError(str(exc)) from None
    heads = raw.get("heads")
    if not isinstance(heads, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads):
        raise HeadsFileError(f"heads file {path}: heads must be a list of non-negative head indices")
    if not heads:
        raise HeadsFileError(f"heads file {path} lists no heads (discovery found none on its data); "
                             "use heads=all, or rerun discovery on data that needs the image")
    return identity, tuple(sorted(set(heads)))


def write_heads_file(path: str | Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` (must hold ``model`` and ``heads``) atomically: a reader never sees half a file."""
    path = Path(path)
    body = {"format": FORMAT, **report}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(body, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_heads_file(path: str | Path, identity: ModelIdentity) -> tuple[int, ...]:
    """The heads of ``path`` if it was made for a model of ``identity``; else HeadsFileError."""
    made_for, heads = read_heads_file(path)
    differing = identity.mismatches(made_for)
    if differing:
        raise HeadsFileError(
            f"heads file {path} was made for another model ({made_for.describe()}), not the loaded one "
            f"({identity.describe()}; differs in {', '.join(differing)}): run `kawhi heads discover` for this model")
    bad = [h for h in heads if h >= identity.num_attention_heads]
    if bad:
        raise HeadsFileError(f"heads file {path} lists head indices {bad}, but the model has "
                             f"{identity.num_attention_heads} heads")
    return heads


def resolve_head_set(identity: ModelIdentity, *, heads_file: str | Path | None = None,
                     model_dir: str | Path | None = None) -> HeadSet:
    """The head set a model of ``identity`` (loaded from ``model_dir``, if a folder) uses; see module doc."""
    if heads_file is not None and str(heads_file).strip():
        return HeadSet(check_heads_file(heads_file, identity), f"file:{heads_file}")
    if model_dir is not None:
        folder_file = Path(model_dir) / FOLDER_HEADS_FILE
        if folder_file.is_file():
            return HeadSet(check_heads_file(folder_file, identity), f"file:{_shown_path(folder_file)}")
    preset = published_heads(identity)
    if preset is not None:
        return HeadSet(preset.heads, f"published:{preset.name}")
    return HeadSet(None, ALL_HEADS_SOURCE)


def _shown_path(path: Path) -> str:
    """A heads file shipped inside the kawhi package as ``kawhi/models/...`` (the same on every
    install, no machine's folders in /v1/info or a picture); any other file as given."""
    package = Path(__file__).resolve().parents[1]
    try:
        return str(Path("kawhi") / path.resolve().relative_to(package))
    except ValueError:
        return str(path)


def check_model_folder_heads(model_dir: str | Path, heads_file: str | Path | None = None) -> HeadSet:
    """Resolve the head set of a model folder from its config.json alone (no weights): lets a
    server refuse a mismatching heads file before it loads anything. Raises HeadsFileError."""
    try:
        identity = ModelIdentity.from_folder(model_dir)
    except IdentityError as exc:
        raise HeadsFileError(str(exc)) from None
    return resolve_head_set(identity, heads_file=heads_file, model_dir=model_dir)
