#!/usr/bin/env bash
# GRPO + KAWHI on Qwen2.5-VL with verl 0.9.1, LEGACY trainer (trainer.use_v1=false, deprecated by
# verl). Use run_qwen2_5_vl_grpo_kawhi.sh (the v1 trainer) unless you must stay on the legacy one.
#
# Only the lines marked "KAWHI" differ from a plain verl GRPO run; take everything else
# (batch sizes, parallelism, rollout engine) from verl's own examples for your version
# and hardware. The settings below follow the paper (G = 5, lr 1e-6, KL 0.01, prompt
# <= 1024 and response <= 2048 tokens) at a small batch.
#
#   kawhi serve --model /models/Qwen2.5-VL-7B-Instruct --device cuda --host 0.0.0.0 &
#   KAWHI_URL=http://127.0.0.1:8000 bash examples/verl/run_qwen2_5_vl_grpo_kawhi_legacy.sh
#
# Data: verl's RLHFDataset parquet with a "<image>" placeholder in the prompt and one
# image per row in the "images" column (e.g. verl's examples/data_preprocess/geo3k.py).
set -euo pipefail

MODEL=${MODEL:-/models/Qwen2.5-VL-7B-Instruct}
DATA=${DATA:-$HOME/data/geo3k}
KAWHI_URL=${KAWHI_URL:-http://127.0.0.1:8000}
KAWHI_ON_ERROR=${KAWHI_ON_ERROR:-raise}     # or fallback: keep plain GRPO advantages for failed samples (counted, warned)

python3 -m verl.trainer.main_ppo \
    trainer.use_v1=false `# KAWHI: the legacy trainer hands reward extra info to the advantage stage; v1 does not` \
    algorithm.adv_estimator=grpo_kawhi `# KAWHI: verl GRPO x KAWHI token weights` \
    reward.reward_manager.source=importlib `# KAWHI` \
    reward.reward_manager.name=KawhiRewardManager `# KAWHI` \
    reward.reward_manager.module.path=pkg://kawhi_client.integrations.verl `# KAWHI: also registers grpo_kawhi` \
    +reward.kawhi.url="$KAWHI_URL" `# KAWHI: or in-process (+reward.kawhi.model=... +reward.kawhi.device=cuda)` \
    +reward.kawhi.on_error="$KAWHI_ON_ERROR" `# KAWHI` \
    +reward.kawhi.inner=naive `# KAWHI: the reward manager that computes the score (default naive)` \
    algorithm.norm_adv_by_std_in_grpo=true \
    algorithm.use_kl_in_reward=false \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.image_key=images \
    data.train_batch_size=64 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \
    actor_rollout_ref.actor.use_kl_loss=true \
    actor_rollout_ref.actor.kl_loss_coef=0.01 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=5 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.total_epochs=15 \
    trainer.logger='["console"]' \
    trainer.project_name=kawhi \
    trainer.experiment_name=qwen2_5_vl_7b_grpo_kawhi \
    "$@"
