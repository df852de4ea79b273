"""Text benchmark: mmspec methods vs plain AR, a raw forward loop, and transformers' assisted generation.

Everything runs in one process on the same target/draft pair; each row is the median of ``--repeats``
runs. Greedy outputs are checked for equality with plain greedy decoding. Without trained weights
(``--models random``), acceptance is meaningless; the numbers then measure overhead only.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .. import generate
from ..drafting.layer_skip import calibrate_skip, decoder_layers
from ..models.compat import cache_keyword
from .common import environment, markdown_table, paired_ratio, timed, write_report

__all__ = ["main", "run", "assisted_generate", "raw_greedy_loop", "random_pair"]


def random_pair(vocab_size=16384, hidden=384, layers=6, draft_hidden=128, draft_layers=2, seed=0):
    """A random-weight Llama target (~20M params by default) and a small draft sharing its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(h, n, s):
        torch.manual_seed(s)
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n,
                          num_attention_heads=max(2, h // 64), num_key_value_heads=max(1, h // 128),
                          max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()

    return build(hidden, layers, seed), build(draft_hidden, draft_layers, seed + 1)


@torch.no_grad()
def raw_greedy_loop(model, input_ids, max_new_tokens):
    """The floor for plain AR: prefill + one forward per token with a DynamicCache, argmax, nothing else."""
    from transformers import DynamicCache

    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=token, use_cache=True, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat([input_ids] + tokens, dim=1)


def assisted_generate(target, draft, input_ids, num_drafts, **kwargs):
    """transformers' assisted generation with exactly ``num_drafts`` drafts per step, like ``mmspec draft``.

    Its candidate generator reads the draft length, its schedule and the early-stop confidence threshold from
    the *assistant's* generation config (the same arguments given to ``generate`` are not used for that), whose
    defaults are 20 drafts cut short once the draft's confidence falls under 0.4. They are set there for the
    call and restored afterwards.
    """
    config = draft.generation_config
    settings = dict(num_assistant_tokens=num_drafts, num_assistant_tokens_schedule="constant",
                    assistant_confidence_threshold=0.0)
    saved = {k: getattr(config, k, None) for k in settings}
    try:
        for k, v in settings.items():
            setattr(config, k, v)
        return target.generate(input_ids, assistant_model=draft, **kwargs)
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


def run(target, draft, input_ids, max_new_tokens=64, repeats=3, window_draft=5, window_lookup=8, corpus_ids=None,
        cache_variants=False):
    """Time every method on ``input_ids`` [B, T]; returns a list of result rows. ``cache_variants`` adds AR, lookup
    and draft on the static KV cache, eager and compiled (``cache="static"``, ``compile=True``; compiled in the
    warm-up)."""
    B = input_ids.shape[0]
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=[], pad_token_id=0)
    hf_common = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    K = window_draft - 1
    cases = [
        ("raw forward loop", "peer", lambda: (raw_greedy_loop(target, input_ids, max_new_tokens), None)),
        ("transformers generate", "peer", lambda: (target.generate(input_ids, **hf_common), None)),
        ("mmspec ar", "mmspec", lambda: _mm(target, input_ids, method="ar", **common)),
        ("mmspec draft", "mmspec", lambda: _mm(target, input_ids, method="draft", draft_model=draft,
                                               window=window_draft, **common)),
        ("mmspec lookup", "mmspec", lambda: _mm(target, input_ids, method="lookup", window=window_lookup, **common)),
        # transformers' matching rule (first occurrence of the last 2-gram): the same drafts as its prompt lookup,
        # so the two rows differ only in the loop around the forwards
        ("mmspec lookup (transformers' rule)", "mmspec", lambda: _mm(
            target, input_ids, method="lookup", window=window_lookup, max_ngram=2, lookup_match="earliest",
            **common)),
        ("mmspec jacobi", "mmspec", lambda: _mm(target, input_ids, method="jacobi", window=8, **common)),
        # token trees at the chain's depth: the draft's EAGLE-2-style tree (its 6 best nodes expanded per level, the
        # 8K - 1 best nodes verified), and up to 3 n-gram continuations as sibling branches
        (f"mmspec draft tree(6,{K})", "mmspec", lambda: _mm(target, input_ids, method="draft", draft_model=draft,
                                                            window=8 * K, tree=(6, K), **common)),
        ("mmspec lookup tree(3,7)", "mmspec", lambda: _mm(target, input_ids, method="lookup",
                                                          window=3 * (window_lookup - 1) + 1, tree=(3, window_lookup - 1),
                                                          **common)),
    ]
    # Drafts for every model: layer-skip self-speculation (calibrated on these prompts, outside the timing) and
    # lookahead decoding (issue 16).
    # (measured costs: when no layer set pays on this machine the calibration says so and the row decodes plainly)
    calibration, calibration_s = timed(lambda: calibrate_skip(target, input_ids))
    self_window = calibration.num_drafts + 1
    cases += [("mmspec self (skips the calibrated set, drafts anyway)", "mmspec", lambda: _mm(
        target, input_ids, method="self", skip=list(calibration.skip), window=3, **common))] \
        if calibration.num_drafts == 0 else []
    cases += [
        # the calibrated set and length, as reported in the row (no second calibration inside generate)
        ("mmspec self (calibrated)", "mmspec", lambda: _mm(target, input_ids, method="self", window=self_window,
                                                           skip=list(calibration.skip), **common)
         if calibration.num_drafts else _mm(target, input_ids, method="ar", **common)),
        ("mmspec lookahead", "mmspec", lambda: _mm(target, input_ids, method="lookahead", **common)),
    ]
    if B == 1:  # transformers' assisted generation and prompt lookup support batch size 1 only
        cases += [
            ("transformers assisted", "peer", lambda: (assisted_generate(target, draft, input_ids, K, **hf_common),
                                                       None)),
            ("transformers prompt lookup", "peer", lambda: (target.generate(
                input_ids, prompt_lookup_num_tokens=window_lookup - 1, **hf_common), None)),
        ]
    if cache_variants:
        chains = {"ar": dict(method="ar"), "lookup": dict(method="lookup", window=window_lookup),
                  "draft": dict(method="draft", draft_model=draft, window=window_draft)}
        for name, kw in chains.items():
            cases += [(f"mmspec {name} [static]", "mmspec",
                       lambda kw=kw: _mm(target, input_ids, cache="static", **kw, **common)),
                      (f"mmspec {name} [static+compile]", "mmspec",
                       lambda kw=kw: _mm(target, input_ids, compile=True, **kw, **common))]
    # Round-robin over methods inside each repeat, so load changes on a shared machine hit every method alike.
    for _, _, fn in cases:
        fn()  # warm-up
    times = {name: [] for name, _, _ in cases}
    results = {}
    for _ in range(repeats):
        for name, _, fn in cases:
            results[name], t = timed(fn)
            times[name].append(t)
    rows, reference = [], None
    for name, kind, _ in cases:
        seqs, stats = results[name]
        if reference is None:
            reference = seqs
        row = {"method": name, "kind": kind, "batch": B, "median_s": statistics.median(times[name]),
               "times": times[name], "identical": bool(torch.equal(seqs, reference))}
        if stats is not None:
            row.update(target_forwards=stats.target_forwards, draft_forwards=stats.draft_forwards,
                       step_compression=stats.step_compression, mean_accepted=stats.mean_accepted,
                       tree_nodes=stats.tree_nodes_per_step)
        rows.append(row)
    by = {r["method"]: r["median_s"] for r in rows}
    ratio = lambda base, name: paired_ratio(times[base], times[name])  # noqa: E731 -- same rounds, see paired_ratio
    per_forward = by["mmspec ar"] / max_new_tokens  # one target forward, measured by plain AR
    for r in rows:
        if r.get("draft_forwards"):  # what one draft forward costs, in target forwards (timing residual)
            r["draft_cost"] = (r["median_s"] - r["target_forwards"] * per_forward) / r["draft_forwards"] / per_forward
        if r["method"] == "mmspec self (calibrated)":
            r.update(skip=list(calibration.skip), calibrated_alpha=calibration.alpha,
                     expected_speedup=calibration.speedup, calibration_s=calibration_s,
                     layer_cost=1 - len(calibration.skip) / len(decoder_layers(target)[1]),
                     measured_draft_cost=calibration.draft_costs[calibration.skip],
                     window_cost=list(calibration.window_cost))
    for r in rows:
        r["vs_raw"] = ratio("raw forward loop", r["method"])
        r["vs_mmspec_ar"] = ratio("mmspec ar", r["method"])
        if r["method"].endswith("]"):  # a cache variant: against the same method on the dynamic cache, eager
            r["vs_dynamic"] = ratio(r["method"].rsplit(" [", 1)[0], r["method"])
    if "transformers assisted" in by:
        rows[[r["method"] for r in rows].index("mmspec draft")]["vs_peer"] = ratio("transformers assisted", "mmspec draft")
        for name in ("mmspec lookup", "mmspec lookup (transformers' rule)"):
            rows[[r["method"] for r in rows].index(name)]["vs_peer"] = ratio("transformers prompt lookup", name)
    return rows


def _mm(target, input_ids, **kw):
    out = generate(target, input_ids, **kw)
    return out.sequences, out.stats


COLUMNS = [
    ("method", "method", ""), ("batch", "B", ""), ("identical", "= greedy", ""),
    ("target_forwards", "target fwd", ""), ("step_compression", "step compr.", ".2f"),
    ("tree_nodes", "tree nodes/step", ".1f"), ("median_s", "median s", ".3f"), ("vs_raw", "speed vs raw loop", ".2f"),
    ("vs_mmspec_ar", "speed vs mmspec ar", ".2f"), ("vs_peer", "speed vs transformers peer", ".2f"),
    ("draft_cost", "draft fwd cost", ".2f"), ("skip", "skipped layers", ""),
    ("vs_dynamic", "speed vs dynamic eager", ".2f"),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmspec bench text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=["random", "zoo"], default="random",
                   help="random: random-weight Llama pair (overhead only); zoo: the bundled trained text pair")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to run")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64, help="max new tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="outputs/bench", help="folder for text.json and text.md")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--cache-variants", action="store_true",
                   help="also AR, lookup and draft on the static KV cache, eager and torch.compile'd")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models == "zoo":
        from ..zoo.models import load_text_pair, text_prompts

        target, draft, tokenizer = load_text_pair()
        make_prompts = lambda b: text_prompts(tokenizer, b, args.prompt_len)  # noqa: E731
    else:
        if args.tiny:
            target, draft = random_pair(vocab_size=512, hidden=64, layers=2, draft_hidden=32, draft_layers=1)
        else:
            target, draft = random_pair()
        V = target.config.vocab_size

        def make_prompts(b):
            g = torch.Generator().manual_seed(b)
            return torch.randint(2, V, (b, args.prompt_len), generator=g)

    if args.tiny:
        args.new, args.repeats, args.prompt_len = 8, 1, 8
    rows = []
    for b in args.batch:
        rows += run(target, draft, make_prompts(b), max_new_tokens=args.new, repeats=args.repeats,
                    cache_variants=args.cache_variants)
    md = (f"# mmspec bench text ({args.models} weights)\n\n`mmspec bench text {' '.join(argv or sys.argv[1:])}`\n\n"
          f"{markdown_table(rows, COLUMNS)}\n\nSpeed ratios are paired: the median over repeats of the two methods' "
          "times in the same round of the interleaved run (`mmspec.bench.common.paired_ratio`).\n\n"
          f"Environment: {environment()}\n")
    js, mdp = write_report(args.out, "text", {"args": vars(args), "env": environment(), "rows": rows}, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return rows


if __name__ == "__main__":
    main()
