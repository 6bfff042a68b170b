"""A model's identity: what decides whether a head set applies to it.

Head indices only mean something for one architecture and shape, so a head set is
keyed by the model type and the decoder's shape (layers, hidden size, query and KV
heads, vocabulary). ``name_or_path`` (a config's ``_name_or_path``, where present) is
carried for provenance only: a fine-tune saved under another name has the same heads
until someone measures otherwise, and a folder can be renamed freely.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size")


class IdentityError(ValueError):
    """A config (or a heads file's ``model``) that does not describe a model identity."""


@dataclass(frozen=True)
class ModelIdentity:
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    name_or_path: str | None = None

    @classmethod
    def from_config(cls, config: Any, folder: str | Path | None = None) -> ModelIdentity:
        """From a loaded transformers config; ``folder`` (its config.json) supplies ``_name_or_path``."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        name = None
        if folder is not None:
            name = _raw_name(_read_config_json(Path(folder)))
        return cls(
            model_type=str(config.model_type),
            num_hidden_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size),
            num_attention_heads=int(text.num_attention_heads),
            num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
            vocab_size=int(text.vocab_size),
            name_or_path=name,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "model") -> ModelIdentity:
        """From a config.json's content (text fields top-level or under ``text_config``)
        or from a heads file's ``model`` object. Raises IdentityError naming the field."""
        if not isinstance(raw, Mapping):
            raise IdentityError(f"{where} must be an object with {', '.join(SHAPE_FIELDS)}")
        text = raw.get("text_config") if isinstance(raw.get("text_config"), Mapping) else {}
        values: dict[str, Any] = {}
        for name in SHAPE_FIELDS:
            value = raw.get(name) if name == "model_type" else text.get(name, raw.get(name))
            if name == "num_key_value_heads" and value is None:
                value = text.get("num_attention_heads", raw.get("num_attention_heads"))
            if value is None:
                raise IdentityError(f"{where} has no {name}")
            if name == "model_type":
                if not isinstance(value, str) or not value:
                    raise IdentityError(f"{where}.model_type must be a non-empty string")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise IdentityError(f"{where}.{name} must be a positive integer, got {value!r}")
            values[name] = value
        return cls(**values, name_or_path=_raw_name(raw))

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelIdentity:
        """From a model folder's config.json alone (no weights are read)."""
        folder = Path(folder)
        return cls.from_dict(_read_config_json(folder), where=f"{folder / 'config.json'}")

    def shape(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in SHAPE_FIELDS)

    def mismatches(self, other: ModelIdentity) -> list[str]:
        """The shape fields in which ``other`` differs from this identity."""
        return [name for name in SHAPE_FIELDS if getattr(self, name) != getattr(other, name)]

    def describe(self) -> str:
        return (f"{self.model_type}, {self.num_hidden_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_attention_heads} heads ({self.num_key_value_heads} KV), vocab {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["name_or_path"] is None:
            del out["name_or_path"]
        return out


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IdentityError(f"{folder} is not a model folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise IdentityError(f"{path} is not a JSON object")
    return raw


def _raw_name(raw: Mapping[str, Any]) -> str | None:
    name = raw.get("_name_or_path", raw.get("name_or_path"))
    return name if isinstance(name, str) and name.strip() else None
