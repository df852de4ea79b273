"""Speculative text generation with mmspec on any transformers causal LM.

    python samples/compare_text.py                   # a random-weight Llama built locally (no download)
    python samples/compare_text.py --model PATH      # a local checkpoint (from_pretrained), with its tokenizer

Runs plain greedy decoding and each speculative method on the same prompts, checks that every method gives
exactly the greedy tokens, and prints target forwards, step compression and wall time: after a warm-up, the
median of --repeats runs interleaved with AR, and the spread of the per-run speedups (as ``mmspec text
--compare``). For batch generation from a prompt file see ``generate_text.py``.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mmspec  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local path of a causal LM (default: a random tiny Llama)")
    p.add_argument("--draft", help="local path of a draft LM sharing the tokenizer (default: a random tiny Llama)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; needs --model for a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method (interleaved with AR)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores free now, at most 4; see `mmspec image --help`)")
    args = p.parse_args()
    from mmspec.bench.common import default_threads, interleaved_times, speedup_summary

    torch.set_num_threads(args.threads or default_threads())

    tokenizer = None
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        draft = AutoModelForCausalLM.from_pretrained(args.draft).eval() if args.draft else None
        prompts = args.prompt or ["def fibonacci(n):\n    ", "The quick brown fox"]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        ids, mask = enc.input_ids, enc.attention_mask
    else:
        from mmspec.bench.text import random_pair

        target, draft = random_pair(vocab_size=4096, hidden=128, layers=4, draft_hidden=64, draft_layers=1)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 4096, (3, 12), generator=g)
        ids[:, 6:] = ids[:, :6]  # repeated text gives prompt lookup something to find
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # a shorter, left-padded prompt

    greedy = target.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=0)

    def run(method):
        out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, method=method,
                              draft_model=draft if method == "draft" else None, pad_token_id=0)
        return out, out.stats.wall_time

    print(f"{'method':8s} {'= greedy':>9s}  stats")
    for method in ["ar", "lookup", "jacobi"] + (["draft"] if draft is not None else []):
        if method == "ar":
            out, _ = run("ar")
            timing = ""
        else:
            runs = {"AR": lambda: run("ar"), method: lambda m=method: run(m)}
            results, times = interleaved_times(runs, args.repeats)
            out, timing = results[method], "\n" + " " * 20 + speedup_summary(times, "AR", method)
        same = torch.equal(out.sequences, greedy)
        print(f"{method:8s} {str(same):>9s}  {out.stats}{timing}")
        if not same:
            raise SystemExit(f"{method} differs from greedy decoding")
    if tokenizer is not None:
        for text in tokenizer.batch_decode(out.sequences, skip_special_tokens=True):
            print("---\n" + text)


if __name__ == "__main__":
    main()
