"""Policy training: GRPO losses (`grpo`) and the optimizer loop with checkpoints (`policy`)."""
