"""Tokens per target forward of draft / lookup / Jacobi chains and token trees on the bundled text pair (the
BENCHMARKS.md tree table). Usage: PYTHONPATH=. python docs/bench/tree_text.py ["name;name;..."]. Prompts: 8 six-line
snippets of json.decoder and textwrap, greedy, 64 new tokens each, batch 1. Prints tokens per target forward (step
compression), tree nodes per step (of the last prompt), draft forwards per step and wall clock per token."""

import inspect
import sys
import time

import torch

import mmspec
from mmspec.zoo.models import load_text_pair

torch.set_num_threads(1)
target, draft, tok = load_text_pair()
src = inspect.getsource(__import__("json").decoder) + inspect.getsource(__import__("textwrap"))
lines = [line for line in src.split("\n") if len(line.strip()) > 20][:400]
prompts = ["\n".join(lines[i:i+6]) + "\n" for i in range(0, 8 * 40, 40)]
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token


def run(**kw):
    toks = fw = dfw = steps = 0
    t0 = time.perf_counter()
    for p in prompts:
        enc = tok([p], return_tensors="pt")
        out = mmspec.generate(target, enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=64, eos_token_id=[], **kw)
        toks += out.stats.new_tokens
        fw += sum(out.stats.row_forwards)
        dfw += out.stats.draft_forwards
        steps += sum(out.stats.accepted_histogram)
    return toks / fw, out.stats.tree_nodes_per_step, dfw / max(steps, 1), (time.perf_counter() - t0) / toks


sel = sys.argv[1].split(";") if len(sys.argv) > 1 else None
for name, kw in [("draft chain w6 (depth 5)", dict(method="draft", draft_model=draft, window=6)),
                 ("draft tree(3,5) w8", dict(method="draft", draft_model=draft, window=8, tree=(3, 5))),
                 ("draft tree(3,5) w16", dict(method="draft", draft_model=draft, window=16, tree=(3, 5))),
                 ("draft tree(4,5) w16", dict(method="draft", draft_model=draft, window=16, tree=(4, 5))),
                 ("draft tree(4,5) w24", dict(method="draft", draft_model=draft, window=24, tree=(4, 5))),
                 ("draft tree(6,5) w32", dict(method="draft", draft_model=draft, window=32, tree=(6, 5))),
                 ("draft tree(6,5) w40", dict(method="draft", draft_model=draft, window=40, tree=(6, 5))),
                 ("draft tree(8,5) w64", dict(method="draft", draft_model=draft, window=64, tree=(8, 5))),
                 ("lookup chain w8", dict(method="lookup", window=8)),
                 ("lookup tree(3,7) w22", dict(method="lookup", window=22, tree=(3, 7))),
                 ("jacobi w8", dict(method="jacobi", window=8)),
                 ("jacobi tree(3,2) w20", dict(method="jacobi", window=20, tree=(3, 2))),
                 ("lookahead", dict(method="lookahead")),
                 ("lookahead tree(2,3)", dict(method="lookahead", tree=(2, 3))),
                 ("lookahead (13,4,7) tree(3,3)", dict(method="lookahead", lookahead=(13, 4, 7), tree=(3, 3))),
                 ("lookahead (13,4,7)", dict(method="lookahead", lookahead=(13, 4, 7))),
                 ("lookahead (16,4,10) tree(4,3)", dict(method="lookahead", lookahead=(16, 4, 10), tree=(4, 3))),
                 ("lookahead (16,4,10)", dict(method="lookahead", lookahead=(16, 4, 10))),
                 ("lookahead (10,4,7) tree(3,3)", dict(method="lookahead", lookahead=(10, 4, 7), tree=(3, 3))),
                 ("lookahead (10,4,7)", dict(method="lookahead", lookahead=(10, 4, 7)))]:
    if sel is not None and name not in sel:
        continue
    c, n, d, t = run(**kw)
    print(f"{name:40s} step compression {c:.2f}  tree nodes/step {n:.1f}  draft forwards/step {d:.2f}  "
          f"{1e3 * t:.1f} ms/token", flush=True)
