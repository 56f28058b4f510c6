"""Rollout: the continuous-batching engine, sampling, and (next) speculative decoding and its tuner."""
