"""KawhiGRPOTrainer overrides a private TRL method: outside the tested TRL range its import
fails in one line (or warns, when asked), and the range is the one the dev extra installs."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

pytest.importorskip("trl")
tomllib = pytest.importorskip("tomllib")

from server_fixtures import ROOT, subprocess_env  # noqa: E402


def test_the_installed_trl_is_in_range_and_the_range_is_the_dev_pin() -> None:
    from kawhi_client.integrations import trl as integration

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert integration.TESTED_TRL_TEXT in [r.replace(" ", "") for r in dev]
    integration.check_trl_version("1.16.0")
    integration.check_trl_version("1.16.9.dev0")


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "2.0.0", "unknown"])
def test_outside_the_range_is_one_line_or_a_warning_when_allowed(version: str) -> None:
    from kawhi_client.integrations.trl import check_trl_version

    with pytest.raises(ImportError, match=rf"tested with trl>=1\.16,<1\.17 .*trl {version} is installed"):
        check_trl_version(version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_trl_version(version, allow_untested=True)
    assert len(caught) == 1 and "KAWHI_ALLOW_UNTESTED_TRL" in str(caught[0].message)


def test_importing_the_integration_checks_the_real_trl_version() -> None:
    """The real trl, its reported version changed (installing a second TRL release here is not
    possible offline; this is the one fault the test makes up)."""
    code = "import trl; trl.__version__ = '1.99.0'\nimport kawhi_client.integrations.trl\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         cwd=ROOT, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("ImportError: KawhiGRPOTrainer is tested with trl>=1.16,<1.17")
