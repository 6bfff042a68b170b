"""Fixtures of the deployment tests: the tools (skipped outside CI when missing) and the chart
rendered once per session for every scenario (tests/support/deploy_support.py)."""

from deploy_support import hadolint, helm, kubernetes_validate, promtool, rendered  # noqa: F401
