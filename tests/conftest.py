"""The suite's one conftest: the support modules on sys.path, the shared fixtures, and
the cost markers.

Layout: tests/engine (library), tests/server (FastAPI server, CLI), tests/client (SDK),
tests/integrations (trainers), tests/deploy (Dockerfile, chart, packaging), tests/repo
(docs links, bench scripts); helpers live in tests/support and are imported by their
module names (`from server_fixtures import ...`, `from tiny_models import ...`,
`from test_integration_helpers import ...`, `from planted_heads import ...`).

Markers by cost (registered in pyproject.toml), given per file below so a new test in a
costly file inherits its cost:
  slow     starts a `kawhi serve` subprocess, a trainer or several model loads, or
           otherwise takes more than a few seconds on two cores
  deploy   needs the deployment tools (helm, promtool, hadolint: scripts/install_deploy_tools.sh)
  browser  drives headless chromium
`python3 -m pytest -q -m "not slow"` is the fast subset; `python3 -m pytest -q` runs all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

# test_integration_helpers.py keeps its old name (other branches import it by that name)
# but holds no tests: do not collect the support folder.
collect_ignore = ["support"]

# file name -> cost markers of every test in it; tests marked in the file itself
# (`@pytest.mark.slow`) keep their own marks as well.
FILE_MARKS: dict[str, tuple[str, ...]] = {
    # engine: several tiny-model loads per architecture, or real forwards per test
    "test_heads_discover.py": ("slow",),
    # server: demo model loads, subprocess servers
    "test_server.py": ("slow",),
    "test_server_lifecycle.py": ("slow",),
    "test_server_redis.py": ("slow",),
    "test_cli.py": ("slow",),
    "test_explain_e2e.py": ("slow",),
    # client: a real `kawhi serve` subprocess
    "test_client_server.py": ("slow",),
    # integrations: real trainers and subprocess servers
    "test_integration_backends.py": ("slow",),
    "test_integration_common.py": ("slow",),
    "test_integration_examples.py": ("slow",),
    "test_integration_trl.py": ("slow",),
    "test_integration_verl.py": ("slow",),
    # deploy: helm/promtool/hadolint, one live server
    "test_deploy.py": ("deploy", "slow"),
    # repo: bench scripts on the demo model
    "test_bench_smoke.py": ("slow",),
}
# single tests whose cost differs from their file's
TEST_MARKS: dict[str, tuple[str, ...]] = {
    "test_html_renders_in_headless_chromium_to_a_non_blank_screenshot": ("browser",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks = FILE_MARKS.get(item.path.name, ()) + TEST_MARKS.get(item.originalname, ())
        for name in marks:
            item.add_marker(getattr(pytest.mark, name))


# ---------------------------------------------------------------------------- shared fixtures


@pytest.fixture
def unused_port() -> int:
    """A loopback TCP port nothing listens on (bound to port 0, then released)."""
    from server_fixtures import free_port

    return free_port()


@pytest.fixture(scope="session")
def demo_server() -> Iterator[Any]:
    """One in-process server on the demo model with default settings, shared by the session
    (a `server_fixtures.ServerThread`; `.url`, `.client()`). Tests that need other settings
    start their own ServerThread."""
    from server_fixtures import ServerThread

    with ServerThread() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Any]:
    """`tiny_model(arch, seed=0)` -> a tiny random-weight QwenVLReference of that architecture
    (see tiny_models.ARCHITECTURES), built once per (arch, seed) and session. Do not mutate it."""
    from tiny_models import tiny_reference

    built: dict[tuple[str, int], Any] = {}

    def get(arch: str, seed: int = 0) -> Any:
        if (arch, seed) not in built:
            built[arch, seed] = tiny_reference(arch, seed)
        return built[arch, seed]

    return get
