"""Drafter: EAGLE-3 training (offline warm-up and online on idle rollout workers)."""
