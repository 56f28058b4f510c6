"""TLT: lossless long-tail acceleration of GRPO-style RL training of reasoning LLMs."""

__version__ = "0.1.0"
