"""Alternative rollout engines behind the native engine's interface.

``tlt.rollout.backends.vllm``: generation on vLLM (the optional ``vllm`` extra) with our EAGLE-3
drafter, a batch-size schedule for speculative decoding and in-place policy / drafter reloads from the
artifact store. Selected by ``rollout.backend: vllm`` in the job spec.
"""
