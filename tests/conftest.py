"""The suite's one conftest: the shared fixtures and the cost markers (the support modules
are on sys.path through pyproject.toml's ``pythonpath``).

Layout: tests/engine (library), tests/models, tests/heads (head sets, discovery), tests/server
(FastAPI server), tests/cli, tests/client (SDK), tests/grpc, tests/pipeline,
tests/integrations (trainers), tests/ray_serve (Ray Serve, a local Ray), tests/deploy (Dockerfile, chart, packaging), tests/repo
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

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"

# test_integration_helpers.py keeps its old name (other branches import it by that name)
# but holds no tests: do not collect the support folder.
collect_ignore = ["support"]

# file name -> cost markers of every test in it; tests marked in the file itself
# (`@pytest.mark.slow`) keep their own marks as well.
FILE_MARKS: dict[str, tuple[str, ...]] = {
    # engine: several tiny-model loads per architecture, or real forwards per test
    "test_heads_discover.py": ("slow",),
    # kawhi-tiny: the shipped model's accuracy with and without the image; a 2-step training run
    "test_tiny_model.py": ("slow",),
    # the real 151,936-token vocabulary: 2 x 1,024 tokens scored, and 1.2 GB of logits in the control arm
    "test_logprobs_vocab_memory.py": ("slow",),
    # server: model loads, subprocess servers
    "test_server.py": ("slow",),
    "test_server_lifecycle.py": ("slow",),
    "test_server_redis.py": ("slow",),
    "test_cli.py": ("slow",),
    "test_explain_e2e.py": ("slow",),
    "test_cli_errors.py": ("slow",),
    "test_serve_startup.py": ("slow",),
    "test_server_disconnect_drain.py": ("slow",),
    # pipeline: the same bad groups through in-process, CLI and HTTP; bounded fuzzing over HTTP
    "test_pipeline_parity.py": ("slow",),
    "test_pipeline_fuzz.py": ("slow",),
    # client: a real `kawhi serve` subprocess
    "test_client_server.py": ("slow",),
    # integrations: real trainers and subprocess servers
    "test_integration_backends.py": ("slow",),
    "test_integration_common.py": ("slow",),
    "test_trl_version.py": ("slow",),  # importing trl alone takes ~15 s on two cores
    "test_integration_examples.py": ("slow",),
    "test_integration_trl.py": ("slow",),
    "test_integration_verl.py": ("slow",),
    "test_client_replicas.py": ("slow",),
    "test_openapi_fuzz.py": ("slow",),  # a `kawhi serve` subprocess and ~500 schemathesis cases
    "test_integration_trl_ref.py": ("slow",),
    "test_bench_rl.py": ("slow",),
    "test_integration_verl_ref.py": ("slow",),
    "test_integration_verl_v1.py": ("slow",),
    "test_wire_encoding.py": ("slow",),
    # grpc: servers on real sockets, a subprocess `kawhi serve`
    "test_grpc.py": ("slow",),
    "test_grpc_serve.py": ("slow",),
    "test_grpc_client.py": ("slow",),
    "test_grpc_replicas.py": ("slow",),  # three `kawhi serve` subprocesses, one SIGSTOPped
    # deploy: helm/promtool/hadolint, one live server, a real NGINX in front of three replicas
    "test_deploy.py": ("deploy", "slow"),
    "test_deploy_image.py": ("deploy", "slow"),
    "test_deploy_affinity.py": ("deploy", "slow"),
    "test_ingress_hash.py": ("deploy", "slow"),
    # ray_serve: a local Ray with two kawhi-tiny replicas; `kawhi ray serve` subprocesses
    "test_ray_serve.py": ("slow",),
    "test_ray_cli.py": ("slow",),
    # repo: bench scripts on the embedded model
    "test_bench_smoke.py": ("slow",),
    "test_bench_sharing_smoke.py": ("slow",),
}
# single tests (file::name, parameters left off) that cost more than their file,
# measured with --durations on two cores: each runs a subprocess, a model build or a
# long render. tests/repo/test_cost_marks.py checks that every name here exists.
TEST_MARKS: dict[str, tuple[str, ...]] = {
    "test_ref_logprobs.py::test_cli_flags": ("slow",),
    "test_verl_v1_parts.py::test_a_hanging_service_is_a_failure_after_the_deadline_not_a_hang": ("slow",),
    "test_logs_and_probes.py::test_probes_are_not_logged_at_info_and_health_is_an_alias": ("slow",),
    "test_logs_and_probes.py::test_serve_help_says_what_log_json_unset_means": ("slow",),
    "test_heads.py::test_heads_show_and_reweight_with_a_heads_file": ("slow",),
    "test_heads.py::test_serve_and_reweight_refuse_a_mismatching_file_before_starting": ("slow",),
    "test_heads.py::test_server_reports_heads_and_their_source": ("slow",),
    "test_demo_model.py::test_embedded_models_load_with_the_hub_switched_off": ("slow",),
    "test_demo_model.py::test_build_script_regenerates_the_shipped_files": ("slow",),
    "test_engine.py::test_real_qwen_token_ids_from_a_trainer_are_scored_one_to_one": ("slow",),
    "test_weights.py::test_weights_lie_in_range": ("slow",),
    "test_explain_render.py::test_long_responses_wrap_and_many_responses_paginate": ("slow",),
    "test_explain_render.py::test_page_breaks_never_orphan_a_header_or_a_label": ("slow",),
    "test_client_unit.py::test_kawhi_client_imports_without_torch": ("slow",),
    "test_client_faults.py::test_the_in_flight_cap_holds_across_retries": ("slow",),
    "test_client_faults.py::test_timeouts_grow_with_the_work_sent": ("slow",),
    "test_packaging.py::test_an_engine_command_in_a_client_only_install_names_the_extra": ("slow",),
    "test_explain_e2e.py::test_html_renders_in_headless_chromium_to_a_non_blank_screenshot": ("browser",),
}
COST_MARKERS = ("slow", "deploy", "browser")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With -m, do not even import a file none of whose tests can be selected (a file marked
    slow under -m "not slow"): importing the trainer and server test modules costs more
    than the fast subset itself. Whatever extra cost marks a test in the file carries, the
    expression must be false for it to be skipped, so nothing selectable is lost."""
    marks = FILE_MARKS.get(collection_path.name)
    markexpr = config.getoption("markexpr", "")
    if not marks or not markexpr:
        return None
    try:
        from _pytest.mark.expression import Expression

        expression = Expression.compile(markexpr)
    except Exception:  # an unknown pytest version or a bad expression: let pytest decide
        return None
    others = [m for m in COST_MARKERS if m not in marks]
    for extra in range(2 ** len(others)):
        present = set(marks) | {m for i, m in enumerate(others) if extra >> i & 1}
        if expression.evaluate(lambda name, *_, present=present, **__: name in present):
            return None
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        key = f"{item.path.name}::{item.originalname}"
        for name in FILE_MARKS.get(item.path.name, ()) + TEST_MARKS.get(key, ()):
            item.add_marker(getattr(pytest.mark, name))


# ---------------------------------------------------------------------------- shared fixtures


@pytest.fixture
def unused_port() -> int:
    """A loopback TCP port nothing listens on (bound to port 0, then released)."""
    from server_fixtures import free_port

    return free_port()


@pytest.fixture(scope="session")
def default_server() -> Iterator[Any]:
    """One in-process server on the default model (kawhi-tiny) with default settings, shared by the session
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
