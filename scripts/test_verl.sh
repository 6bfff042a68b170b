#!/usr/bin/env bash
# Run the verl integration tests against verl's real code (0.9.1) on CPU: the v1 trainer
# path (test_integration_verl_v1.py) and the legacy one (test_integration_verl*.py).
#
# verl 0.9.1 pins transformers<5.11 and would replace torch, so it lives in a side venv
# that sees the project's environment -- the Python that runs this script, a system
# install or a virtualenv -- and adds verl without its pins
# (examples/verl/install_cpu_test_env.sh). The main suite skips these tests when
# verl is absent; this script is how they run, here and in CI.
#
#   bash scripts/test_verl.sh            # venv in .venv-verl (reused when present)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${KAWHI_VERL_VENV:-.venv-verl}"
if ! "$VENV/bin/python" -c "import verl, ray, transfer_queue, torch, kawhi_client" >/dev/null 2>&1; then
    rm -rf "$VENV"
    bash examples/verl/install_cpu_test_env.sh "$VENV"
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/integrations/test_integration_verl_v1.py \
    tests/integrations/test_integration_verl.py tests/integrations/test_integration_verl_ref.py \
    tests/integrations/test_integration_examples.py
