"""Policy training: GRPO math (`grpo`), the optimizer loop with checkpoints (`policy`) and data-parallel
training on Ray Train (`distributed`, imported only when used)."""
