"""Data for TLT: the synthetic demo reasoning task (:mod:`tlt.data.demo_task`) that the demo policy learns,
and RL prompt datasets (:mod:`tlt.data.datasets`: veRL-style JSONL/Parquet files, demo prompts, a resumable sampler).
"""
