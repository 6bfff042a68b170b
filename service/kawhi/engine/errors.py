"""Errors the engine raises for a caller's mistake, carrying where the mistake is."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence


class GroupError(Exception):
    """One rollout group cannot be processed.

    ``pointer`` is a JSON pointer relative to the group (e.g. ``/responses/1/reward``);
    front ends prefix it with the group's place in the request (``/groups/3``).
    ``status`` is the HTTP-style status: 422 for invalid content, 413 for size limits,
    404 for an unknown image hash.
    """

    def __init__(self, pointer: str, detail: str, *, status: int = 422, title: str = "Invalid rollout group") -> None:
        super().__init__(f"{pointer}: {detail}")
        self.pointer = pointer
        self.detail = detail
        self.status = status
        self.title = title

    def to_problem(self, prefix: str = "") -> dict:
        """RFC 9457 problem details for this error, pointer prefixed with ``prefix``."""
        return {
            "type": f"https://kawhi.dev/problems/{self.title.lower().replace(' ', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "pointer": prefix + self.pointer,
        }


class OptionsError(ValueError):
    """An option is invalid; ``field`` names it (e.g. ``heads``)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def escape_token(token: Any) -> str:
    """One JSON-pointer reference token (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer(*tokens: Any) -> str:
    """pointer('groups', 3, 'image') -> '/groups/3/image'."""
    return "".join("/" + escape_token(t) for t in tokens)


# pydantic puts the name of a union member or a validator in a loc for errors inside
# unions (``literal['preset','all']``, ``list[int]``, ``function-after[...]``): those are
# not fields of the document and are left out of the pointer.
_TYPE_TAG = re.compile(r"^[a-z_-]+\[.*\]$|^(int|str|float|bool|list|dict|none)$")


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
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def group_error_from_validation(exc: Any) -> GroupError:
    """A pydantic ValidationError on one group -> GroupError at its first error's location."""
    errors = exc.errors()
    if not errors:
        return GroupError("", "invalid rollout group")
    detail = validation_message(errors[0])
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more error(s))"
    return GroupError(loc_to_pointer(errors[0].get("loc", ())), detail)
