"""``benchmarks/rollout_peers.py`` with vLLM arms on a tiny workload: vLLM without SD is the baseline and the
schedule arm gets a schedule derived from the TLT arm's bandit (the full comparison is the benchmark's)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("vllm")

from tests.integration.test_benchmark_rollout_peers import run_benchmark, table_row


def test_vllm_arms_against_the_vllm_baseline(demo_model_dir, demo_drafter_dir):
    out = run_benchmark("--arms", "tlt-adaptive,vllm,vllm-schedule", "--k", "2")
    result = out.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT baseline=vllm rounds=1 speedup_tlt_adaptive=\d+\.\d\d speedup_vllm_schedule=\d+\.\d\d "
                        r"accept_len_tlt_adaptive=\d+\.\d\d accept_len_vllm_schedule=\d+\.\d\d", result), result
    schedule = re.search(r"vllm-schedule: K=(\d), \(first, last, K\) = (.*)", out)
    assert schedule and int(schedule[1]) <= 2, out  # K capped at --k
    ranges = json.loads(schedule[2])
    assert ranges[0][0] == 1 and ranges[-1][1] == 4 and all(0 <= k <= 2 for _, _, k in ranges)
    vllm, sched = table_row(out, "vllm"), table_row(out, "vllm-schedule")
    assert "per step s" in out  # one round: the spread column splits each arm's wall time by step
    for row in (table_row(out, "tlt-adaptive"), vllm, sched):
        wall, steps = float(row[1]), row[2].split("/")
        assert wall > 0 and len(steps) == 2 and abs(sum(map(float, steps)) - wall) < 0.15
    assert vllm[3] == "1.00x" and vllm[4] == "-" and vllm[7] == "-" and float(sched[7]) >= 1.0
    assert "vllm_layout=one-process" in out  # the default: vLLM's front end, scheduler and model in one process
    one_process_peak = float(vllm[8])
    assert one_process_peak > 300

    out = run_benchmark("--arms", "vllm", "--vllm-layout", "multiprocess")
    assert "vllm_layout=multiprocess" in out
    # vLLM's own layout: the peak sums the front end, the engine core and the worker, each with torch loaded
    assert float(table_row(out, "vllm")[8]) > one_process_peak + 300, (one_process_peak, out)
