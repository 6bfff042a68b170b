"""The OpenAPI document says what the server enforces, and a bounded schemathesis run
(``--checks all``, ~500 cases) against a real ``kawhi serve`` (kawhi-tiny, loopback,
ephemeral port) finds nothing.

One check is left out, deliberately: ``positive_data_acceptance`` (ST202, "schema-valid
request rejected"). JSON Schema cannot say that a base64 string or an upload holds a
decodable PNG/JPEG/WebP of at least ``min_image_side`` pixels a side, nor which image
hashes a server holds, so schema-valid requests with such images are refused with 422 or
404 by design (the 422 and 413 answers of ``/v1/images`` say so in the document). Every
other check runs: no 5xx, schema-invalid requests refused with 4xx, every status code and
Content-Type documented, every answer conforming to its response schema.

The gRPC front end has no OpenAPI document (its schema is the .proto); schemathesis
does not cover it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

from bench.server import Server  # noqa: E402

pytestmark = pytest.mark.slow

DELIBERATELY_UNCHECKED = "positive_data_acceptance"  # see the module doc
EXAMPLES_PER_OPERATION = 25  # with 8 operations: ~500 cases in about a minute


@pytest.fixture(scope="module")
def server():
    with Server() as srv:
        yield srv


def test_the_document_says_what_the_server_enforces(server) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]

    image = jsonschema.Draft202012Validator(schemas["ImageRef"])
    assert image.is_valid({"data": "aGk="}) and image.is_valid({"sha256": "0" * 64, "data": None})
    for both_or_none in ({}, {"data": "aGk=", "sha256": "0" * 64}, {"path": None}):
        assert not image.is_valid(both_or_none), both_or_none
    prompt_or_messages = jsonschema.Draft202012Validator({"oneOf": schemas["RolloutGroup"]["oneOf"]})
    assert prompt_or_messages.is_valid({"prompt": "q"}) and prompt_or_messages.is_valid({"messages": []})
    assert not prompt_or_messages.is_valid({"prompt": "q", "messages": []})
    assert not prompt_or_messages.is_valid({})

    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert httpx.get(server.url + "/metrics", timeout=30).headers["content-type"].startswith("text/plain")

    images = spec["paths"]["/v1/images"]["post"]["responses"]
    assert "max_image_bytes" in images["413"]["description"]
    assert "max_image_pixels" in images["413"]["description"]
    assert "min_image_side" in images["422"]["description"]
    assert "never answered" in images["415"]["description"]
    tiny = httpx.post(server.url + "/v1/images", content=b"not an image", headers={"Content-Type": "text/plain"},
                      timeout=30)
    assert tiny.status_code == 422  # the Content-Type is not trusted: sniffed, refused as an image


def test_a_bounded_schemathesis_run_finds_nothing(server, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis", reason="the dev extra installs schemathesis")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "--checks", "all", "--exclude-checks", DELIBERATELY_UNCHECKED,
           "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "26", "--request-timeout", "30",
           "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its .schemathesis/ cache
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "8 selected / 8 total" in out and " passed" in out, out[-3000:]
