"""The closed error catalogue: every kind renders, maps to a real HTTP status and gRPC code, and nothing else exists."""

from __future__ import annotations

import http

import pytest
from kawhi.errors import CATALOGUE, TYPE_BASE, KawhiError, grpc_code, http_status

# The gRPC status codes (grpc/grpc doc/statuscodes.md), by name.
GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}


@pytest.mark.parametrize("slug", sorted(CATALOGUE))
def test_every_kind_renders_and_maps(slug: str) -> None:
    kind = CATALOGUE[slug]
    assert grpc_code(slug) in GRPC_CODES - {"OK"}
    assert http_status(slug) == 499 or http.HTTPStatus(http_status(slug))  # 499: nginx's client-closed
    err = KawhiError(slug, "why", "/groups/1", sha256="ab")
    placed = err.placed("/x")
    assert placed.pointer == "/x/groups/1" and placed.slug == slug
    problem = err.to_problem()
    assert problem == {"type": TYPE_BASE + slug, "title": kind.title, "status": kind.http, "detail": "why",
                       "pointer": "/groups/1", "sha256": "ab"}
    assert (kind.http >= 500) == (slug in {"internal", "loading", "draining", "unavailable", "timeout"})


def test_the_catalogue_is_closed() -> None:
    with pytest.raises(ValueError):
        KawhiError("teapot", "no such kind")


def test_only_internal_is_a_500() -> None:
    assert [s for s, k in CATALOGUE.items() if k.http == 500] == ["internal"]


def test_an_image_url_is_path_not_allowed_as_docs_server_md_promises() -> None:
    from kawhi.engine.errors import GroupError
    from kawhi.pipeline.parse import parse_group

    group = {"image": {"url": "https://example.com/a.png"}, "prompt": "p", "responses": [{"text": "a", "reward": 1.0}]}
    with pytest.raises(GroupError) as info:
        parse_group(group)
    assert info.value.slug == "path-not-allowed" and info.value.pointer == "/image/url"
