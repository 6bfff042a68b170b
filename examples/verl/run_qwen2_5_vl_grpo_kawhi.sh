#!/usr/bin/env bash
# GRPO + KAWHI on Qwen2.5-VL with verl 0.9.1's v1 trainer (verl's default). The one command:
# verl's own main_ppo, started through kawhi's entry point (which selects the kawhi trainer
# mode and agent-loop manager and makes verl's Ray processes import them), on the complete
# config qwen2_5_vl_grpo_kawhi.yaml. Any verl override can follow.
#
#   kawhi serve --model /models/Qwen2.5-VL-7B-Instruct --device cuda --host 0.0.0.0 &
#   KAWHI_URL=http://127.0.0.1:8000 bash examples/verl/run_qwen2_5_vl_grpo_kawhi.sh \
#       actor_rollout_ref.model.path=/models/Qwen2.5-VL-7B-Instruct data.train_files=... data.val_files=...
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 -m kawhi_client.integrations.verl_v1 \
    --config-path "$HERE" --config-name qwen2_5_vl_grpo_kawhi \
    "$@"
