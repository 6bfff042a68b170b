"""Step 2, admit: the checks that need no model -- counts, sizes, image bytes and headers.

A group that passes holds its image bytes (inline, or read from a path where the
front end allows paths) or the hash to look them up by. Nothing here tokenises or
decodes pixels; the image header (format, size, aspect ratio) is read, so a
decompression bomb or an image the model cannot tile is refused before it queues.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kawhi_client.schema import RolloutGroup

from kawhi.engine.errors import GroupError
from kawhi.engine.images import ImageLimits, decode_base64, probe_image, sha256_hex
from kawhi.errors import KawhiError

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Limits:
    """What one request may hold; larger is ``too-large`` (413) at admission."""

    max_groups: int = 256
    max_responses: int = 64
    max_response_tokens: int = 8192
    max_group_tokens: int = 131072  # prefix + responses of one group (one forward holds it)
    max_request_tokens: int = 1_048_576
    image: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class Admitted:
    """One group past admission. ``data`` is None when the image is referenced by hash."""

    index: int
    group: RolloutGroup
    sha256: str
    data: bytes | None
    image_pointer: str  # "/image/data" | "/image/sha256" | "/image/path"


def check_request_size(n_groups: int, limits: Limits, queue_capacity: int | None = None) -> None:
    if n_groups > limits.max_groups:
        raise KawhiError("too-large", f"{n_groups} groups; the limit is {limits.max_groups}", "/groups")
    if queue_capacity is not None and n_groups > queue_capacity:
        raise KawhiError("too-large", f"{n_groups} groups can never fit the queue ({queue_capacity}); "
                         "split the request", "/groups")


def admit_group(index: int, group: RolloutGroup, limits: Limits, *, base_dir: Path | None = None,
                allow_paths: bool = False, data: bytes | None = None) -> Admitted:
    """Checks without the model; GroupError relative to the group.

    data: the image bytes when the front end received them as bytes (the group's image
    then names their sha256); checked as inline data.
    """
    n = len(group.responses)
    if n > limits.max_responses:
        raise GroupError("/responses", f"{n} responses; the limit is {limits.max_responses}", kind="too-large")
    for j, response in enumerate(group.responses):
        ids = response.token_ids
        if ids is not None and len(ids) > limits.max_response_tokens:
            raise GroupError(f"/responses/{j}/token_ids", f"{len(ids)} tokens; the limit is "
                             f"{limits.max_response_tokens}", kind="too-large")
        if ids and min(ids) < 0:
            k = next(k for k, token in enumerate(ids) if token < 0)
            raise GroupError(f"/responses/{j}/token_ids/{k}", f"token id {ids[k]} is negative")
        if len(response.text) > limits.max_response_tokens * 64:  # characters bound tokens from above
            raise GroupError(f"/responses/{j}/text", f"{len(response.text)} characters is far beyond "
                             f"{limits.max_response_tokens} tokens", kind="too-large")
    if group.advantages is not None and len(group.advantages) != n:
        raise GroupError("/advantages", f"{len(group.advantages)} advantages for {n} responses")
    if data is not None:
        if len(data) > limits.image.max_bytes:
            raise GroupError("/image/data", f"image is ~{len(data)} bytes; the limit is {limits.image.max_bytes}",
                             kind="too-large")
        probe_image(data, limits.image, "/image/data")
        return Admitted(index, group, sha256_hex(data), data, "/image/data")
    return _admit_image(index, group, limits, base_dir, allow_paths)


def _admit_image(index: int, group: RolloutGroup, limits: Limits, base_dir: Path | None,
                 allow_paths: bool) -> Admitted:
    ref = group.image
    max_bytes = limits.image.max_bytes
    if ref.path is not None:
        if not allow_paths:
            raise GroupError("/image/path", "this front end never reads a path or URL; send 'data' or 'sha256'",
                             kind="path-not-allowed")
        path = Path(ref.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            if path.stat().st_size > max_bytes:
                raise GroupError("/image/path", f"image file is over {max_bytes} bytes", kind="too-large")
            data = path.read_bytes()
        except OSError as exc:
            raise GroupError("/image/path", f"cannot read {ref.path}: {exc.strerror or 'unreadable'}",
                             kind="image-not-found") from None
        probe_image(data, limits.image, "/image/path")
        return Admitted(index, group, sha256_hex(data), data, "/image/path")
    if ref.data is not None:
        approx = len(ref.data) * 3 // 4
        if approx > max_bytes + 3:
            raise GroupError("/image/data", f"image is ~{approx} bytes; the limit is {max_bytes}", kind="too-large")
        data = decode_base64(ref.data)
        probe_image(data, limits.image, "/image/data")
        return Admitted(index, group, sha256_hex(data), data, "/image/data")
    sha = ref.sha256 or ""
    if not _SHA256.match(sha):
        raise GroupError("/image/sha256", "sha256 must be 64 hex digits", kind="validation")
    return Admitted(index, group, sha.lower(), None, "/image/sha256")
