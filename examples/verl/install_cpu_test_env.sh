#!/usr/bin/env bash
# The side environment in which the verl tests run against verl 0.9.1 on CPU
# (tests/integrations/test_integration_verl*.py; scripts/test_verl.sh builds and uses it).
#
# verl 0.9.1 pins transformers<5.11 (this project uses 5.2x) and its full dependency set
# (vllm, flash-attn ...) would replace torch, so it is NOT in the dev extra. This venv sees
# the project's environment (torch 2.13.0+cpu, transformers, kawhi) and adds verl without
# its pins; nothing in the project's environment changes and pip there stays consistent.
#
# "The project's environment" is the Python that runs this script ($PYTHON, default
# python3): a plain system install, or a virtualenv over one. `venv --system-site-packages`
# alone only reaches the *base* interpreter's site-packages, so from inside a virtualenv
# (where kawhi and perhaps torch live) the side venv would miss them; a .pth file in the
# side venv adds that virtualenv's site-packages with site.addsitedir (which also runs its
# own .pth files: kawhi's editable install is one).
#
#   bash examples/verl/install_cpu_test_env.sh /tmp/verl-venv
#   /tmp/verl-venv/bin/python -m pytest -q tests/integrations/test_integration_verl*.py
set -euo pipefail
VENV=${1:-/tmp/verl-venv}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv --system-site-packages "$VENV"
# the running interpreter's own site-packages when it is a virtualenv (nothing otherwise)
"$PYTHON" - "$VENV" <<'PY'
import pathlib, sys, sysconfig
venv = pathlib.Path(sys.argv[1])
if sys.prefix == sys.base_prefix:
    sys.exit(0)
dirs = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])]
side = pathlib.Path(next(p for p in (venv / "lib").glob("python3*/site-packages")))
lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)
(side / "_kawhi_project_env.pth").write_text(lines)
print("side venv also sees", ", ".join(dirs))
PY
PIP="$VENV/bin/pip"
# verl and the packages that would drag in another torch/transformers/packaging: no deps
"$PIP" install --no-deps verl==0.9.1 tensordict==0.10.0 torchdata==0.11.0 peft==0.21.2 TransferQueue==0.1.11
# the light imports verl's trainer, protocol, reward loop and v1 TransferQueue need (none pins torch)
"$PIP" install "pyvers<0.2" importlib_metadata lazy-importer codetiming hydra-core ray cachetools aiohttp \
    pyzmq msgspec psutil "prometheus_client>=0.20.0"
"$VENV/bin/python" - <<'PY'
import torch, transformers, verl, transfer_queue, kawhi, kawhi_client
print("torch", torch.__version__, "| transformers", transformers.__version__, "| verl", verl.__version__,
      "| kawhi", kawhi_client.__file__)
assert torch.__version__ == "2.13.0+cpu", "the venv must reuse the project's torch"
PY
