#!/usr/bin/env bash
# The side environment in which tests/integrations/test_integration_verl.py ran against verl 0.9.1 on CPU.
#
# verl 0.9.1 pins transformers<5.11 (this project uses 5.24) and its full dependency set
# (vllm, flash-attn ...) would replace torch, so it is NOT in the dev extra. This venv sees
# the project's environment (torch 2.13.0+cpu, transformers 5.24, kawhi) through
# --system-site-packages and adds verl without its pins; nothing in the base environment
# changes and pip there stays consistent.
#
#   bash examples/verl/install_cpu_test_env.sh /tmp/verl-venv
#   /tmp/verl-venv/bin/python -m pytest -q tests/integrations/test_integration_verl.py tests/integrations/test_integration_examples.py
set -euo pipefail
VENV=${1:-/tmp/verl-venv}
python3 -m venv --system-site-packages "$VENV"
PIP="$VENV/bin/pip"
# verl and the packages that would drag in another torch/transformers/packaging: no deps
"$PIP" install --no-deps verl==0.9.1 tensordict==0.10.0 torchdata==0.11.0 peft==0.21.2
# the light imports verl's trainer, protocol and reward loop need (none pins torch)
"$PIP" install "pyvers<0.2" importlib_metadata lazy-importer codetiming hydra-core ray cachetools aiohttp
"$VENV/bin/python" - <<'PY'
import torch, transformers, verl
print("torch", torch.__version__, "| transformers", transformers.__version__, "| verl", verl.__version__)
assert torch.__version__ == "2.13.0+cpu", "the venv must reuse the project's torch"
PY
