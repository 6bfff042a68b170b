"""Errors the engine raises for a caller's mistake, carrying where the mistake is."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from kawhi.errors import KawhiError, pointer, slug_for_status


class GroupError(KawhiError):
    """One rollout group cannot be processed (a :class:`kawhi.errors.KawhiError`).

    ``pointer`` is a JSON pointer relative to the group (e.g. ``/responses/1/reward``);
    front ends prefix it with the group's place in the request (``/groups/3``).
    ``kind`` is a slug of the catalogue (kawhi/errors.py); the older ``status=`` form
    (413 size, 404 unknown image, 422 content) maps onto it.
    """

    def __init__(self, pointer: str, detail: str, *, kind: str | None = None, status: int | None = None,
                 title: str | None = None, **extra: Any) -> None:
        super().__init__(kind or slug_for_status(status or 422), detail, pointer, **extra)


class OptionsError(KawhiError, ValueError):
    """An option is invalid; ``field`` names it (e.g. ``heads``), the pointer is ``/options/<field>``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__("validation", detail, "/options" if field == "options" else pointer("options", field))
        self.field = field


# pydantic puts the name of a union member or a validator in a loc for errors inside
# unions (``literal['preset','all']``, ``list[int]``, ``function-after[...]``): those are
# not fields of the document and are left out of the pointer.
_TYPE_TAG = re.compile(r"^[a-z_-]+\[.*\]$|^(int|str|float|bool|list|dict|none)$")


_INSTANCE_OF = re.compile(r" or instance of \w+")


def loc_to_pointer(loc: Sequence[Any], prefix: Sequence[Any] = ()) -> str:
    """A pydantic error location -> a JSON pointer, after ``prefix``."""
    tokens = list(prefix)
    for part in loc:
        if isinstance(part, str) and _TYPE_TAG.match(part):
            continue
        tokens.append(part)
    return pointer(*tokens)


def validation_message(error: Mapping[str, Any]) -> str:
    """A pydantic error's message without pydantic's "Value error, " prefix."""
    msg = str(error.get("msg", "invalid value"))
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    return _INSTANCE_OF.sub("", msg)  # "a valid dictionary or instance of RolloutGroup": no class names
