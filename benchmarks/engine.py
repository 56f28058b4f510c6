"""Decode throughput of the TLT native engine vs transformers ``generate`` with a static cache.

Same random Qwen2 model, same prompts, greedy, fixed number of new tokens (EOS ignored), bf16 on
CPU by default. Both sides are measured in this run, alternating, and the median of ``--repeats``
timings is reported. Throughput = batch * new_tokens / wall time of the whole generate call.

With ``--device cuda`` the native engine is measured twice, eager and replaying CUDA graphs of its decode
forward (``RolloutEngine(cuda_graphs=True)``), and the graphs' speedup over eager is reported too.

    python benchmarks/engine.py            # 25M model, batches 1/16/64, 64 new tokens
    python benchmarks/engine.py --quick    # 5M model, 16 new tokens, < 1 min
    python benchmarks/engine.py --device cuda   # on a GPU: + TLT with CUDA graphs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and few tokens (same comparison)")
    ap.add_argument("--preset", default=None, help="model preset from tlt.models.demo.PRESETS")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the CUDA-graph arm)")
    return ap.parse_args()


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    from transformers import Qwen2ForCausalLM

    from tlt.models import load_model
    from tlt.models.demo import build_random_model
    from tlt.models.loader import parse_dtype
    from tlt.rollout.engine import RolloutEngine
    from tlt.rollout.sampling import SamplingParams

    preset = args.preset or ("5m" if args.quick else "25m")
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    batches = [int(b) for b in args.batches.split(",")]
    dtype = parse_dtype(args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        build_random_model(tmp, preset, seed=0)
        ours = load_model(tmp, dtype=dtype, device=args.device)
        hf = Qwen2ForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
    hf.generation_config.eos_token_id = None  # both sides decode exactly new_tokens, EOS ignored
    vocab = ours.config.vocab_size
    max_len = args.prompt_len + new_tokens
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)

    graphs = args.device.startswith("cuda")
    print(f"model={preset} dtype={args.dtype} device={args.device} prompt_len={args.prompt_len} "
          f"new_tokens={new_tokens} threads={torch.get_num_threads()} repeats={repeats}")
    print(f"{'batch':>5} | {'transformers tok/s':>18} | {'tlt tok/s':>10} | {'ratio':>6} | identical sequences"
          + (f" | {'tlt+graphs tok/s':>16} | graphs vs eager | graphs identical" if graphs else ""))
    ratios: dict[int, float] = {}
    graph_ratios: dict[int, float] = {}
    for batch in batches:
        prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).to(args.device)
        engine = RolloutEngine(ours, max_running=batch, max_seq_len=max_len + 1, cuda_graphs=False)
        graphed = RolloutEngine(ours, max_running=batch, max_seq_len=max_len + 1, cuda_graphs=True) if graphs else None

        def run_ours(engine=engine, prompts=prompts):
            return engine.generate(prompts.tolist(), params)

        def run_graphed(graphed=graphed, prompts=prompts):
            return graphed.generate(prompts.tolist(), params)

        def run_hf(prompts=prompts):
            with torch.inference_mode():
                return hf.generate(
                    prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                    max_new_tokens=new_tokens, cache_implementation="static",
                    disable_compile=True, pad_token_id=0,
                )

        # Also the warm-up. bf16 rounding differs between the two forwards, so greedy paths of a random
        # (near-uniform) model may part at near-ties; report how many sequences agree exactly.
        ours_ids = [o.token_ids for o in run_ours()]
        same = sum(a == b for a, b in zip(ours_ids, run_hf()[:, args.prompt_len:].tolist())) / batch
        same_graphed = (sum(a.token_ids == b for a, b in zip(run_graphed(), ours_ids)) / batch) if graphs else 0.0
        t_ours, t_hf, t_graphed = [], [], []
        for _ in range(repeats):
            t_hf.append(time_call(run_hf))
            t_ours.append(time_call(run_ours))
            if graphs:
                t_graphed.append(time_call(run_graphed))
        tok = batch * new_tokens
        hf_rate, our_rate = tok / statistics.median(t_hf), tok / statistics.median(t_ours)
        ratios[batch] = our_rate / hf_rate
        row = f"{batch:>5} | {hf_rate:>18.1f} | {our_rate:>10.1f} | {ratios[batch]:>6.2f} | {same:.0%}"
        if graphs:
            graphed_rate = tok / statistics.median(t_graphed)
            graph_ratios[batch] = graphed_rate / our_rate
            row += f" | {graphed_rate:>16.1f} | {graph_ratios[batch]:>15.2f} | {same_graphed:.0%}"
        print(row)
    fields = " ".join(f"ratio_b{b}={r:.2f}" for b, r in ratios.items())
    fields += "".join(f" graphs_vs_eager_b{b}={r:.2f}" for b, r in graph_ratios.items())
    print(f"RESULT {fields} min_ratio={min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
