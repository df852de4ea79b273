"""Batch-1 wall clock of layer-skip self-drafting (calibrated) against plain AR and the separate draft model on the
bundled text pair: 8 held-out prompts of 64 tokens, 64 new tokens each, one after another; 5 rounds, the methods
interleaved in each round, speed as the median over rounds of the paired ratio (``mmspec.bench.common.paired_ratio``).
Every output is checked against plain greedy decoding. Run on a quiet core:

    taskset -c 1 python docs/bench/layer_skip_text.py
"""

import time

import torch

import mmspec
from mmspec.bench.common import paired_ratio
from mmspec.drafting.layer_skip import calibrate_skip
from mmspec.zoo.models import load_text_pair, text_prompts


def run(target, prompts, **kw):
    """Decode each prompt alone; returns (seconds, target forwards, outputs)."""
    seconds, forwards, outs = 0.0, 0, []
    for i in range(prompts.shape[0]):
        t0 = time.perf_counter()
        out = mmspec.generate(target, prompts[i : i + 1], max_new_tokens=64, eos_token_id=[], pad_token_id=0, **kw)
        seconds += time.perf_counter() - t0
        forwards += out.stats.target_forwards
        outs.append(out.sequences)
    return seconds, forwards, outs


def main(n_prompts: int = 8, rounds: int = 5) -> None:
    torch.set_num_threads(1)
    target, draft, tokenizer = load_text_pair()
    prompts = text_prompts(tokenizer, n_prompts, 64)
    cal = calibrate_skip(target, prompts[:4], cache=False)
    print(f"calibration: skip {list(cal.skip)}, {cal.num_drafts} drafts, agreement {cal.alpha:.3f}, "
          f"expected {cal.speedup:.2f}x")
    methods = {"ar": dict(method="ar"),
               "self (calibrated)": dict(method="self", skip=list(cal.skip), window=cal.num_drafts + 1),
               "draft (w5)": dict(method="draft", draft_model=draft, window=5)}
    for kw in methods.values():
        run(target, prompts, **kw)  # warm-up
    times = {name: [] for name in methods}
    reference = None
    for r in range(rounds):
        for name, kw in methods.items():
            seconds, forwards, outs = run(target, prompts, **kw)
            times[name].append(seconds)
            reference = reference or outs
            assert all(torch.equal(a, b) for a, b in zip(reference, outs)), f"{name} differs from greedy"
            if r == 0:
                print(f"{name}: {forwards} target forwards, step compression {n_prompts * 64 / forwards:.2f}")
    for name in methods:
        ratios = [a / b for a, b in zip(times["ar"], times[name])]
        speed = paired_ratio(times["ar"], times[name])
        print(f"{name}: median {sorted(times[name])[rounds // 2]:.3f} s, speed vs ar {speed:.3f} "
              f"(per round {[round(x, 2) for x in ratios]})")


if __name__ == "__main__":
    main()
