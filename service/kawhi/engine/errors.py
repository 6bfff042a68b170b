"""Errors the engine raises for a caller's mistake, carrying where the mistake is."""

from __future__ import annotations


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
