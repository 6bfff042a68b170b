"""The RL experiment: GRPO against GRPO + KAWHI through a live service (``python -m bench.rl``)."""
