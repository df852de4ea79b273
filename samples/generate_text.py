"""Continue many prompts (one per line of a file) with speculative decoding, data-parallel and resumable.

    python samples/generate_text.py --model zoo --prompt-file prompts.txt --out outputs/text
    torchrun --nproc_per_node 4 samples/generate_text.py --model PATH --draft DRAFT_PATH --method draft \\
        --prompt-file prompts.txt --out outputs/text --max-new-tokens 256

``--model`` is a local transformers causal LM folder (with its tokenizer) or ``zoo`` for the bundled text LM
(whose draft is used with ``--method draft`` unless ``--draft`` names another). Prompt ``i`` is written to
``text_{i:06d}.txt`` (prompt + continuation) with seed ``--seed + i`` when sampling, so the files do not depend
on the number of processes; reruns skip finished prompts; a failing prompt is recorded, not fatal; rank 0
writes the merged ``stats.json`` (see :mod:`mmspec.distributed`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="causal LM folder or 'zoo'")
    p.add_argument("--draft", default=None, help="draft LM folder for --method draft (default with zoo: its draft)")
    p.add_argument("--prompt-file", required=True, help="one prompt per line ('#' starts a comment)")
    p.add_argument("--method", choices=["draft", "lookup", "jacobi", "ar"], default="lookup")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batched decode")
    p.add_argument("--sample", action="store_true", help="sample exactly from the target instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--out", default="outputs/text")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores free now, at most 4; see `mmspec image --help`)")
    return p


def _load(args, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "zoo":
        from mmspec.zoo.models import load_text_pair

        target, zoo_draft, tok = load_text_pair()
    else:
        target = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tok, zoo_draft = AutoTokenizer.from_pretrained(args.model), None
    draft = None
    if args.method == "draft":
        draft = AutoModelForCausalLM.from_pretrained(args.draft).eval() if args.draft else zoo_draft
        if draft is None:
            raise SystemExit("--method draft needs --draft")
        draft.to(device)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return target.to(device), draft, tok


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from mmspec.bench.common import default_threads

    torch.set_num_threads(args.threads or default_threads())
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--batch-size and --max-new-tokens must be >= 1")
    import torch

    import mmspec
    from mmspec.distributed import init_distributed, read_prompt_file, run_sharded

    prompts = read_prompt_file(args.prompt_file)
    ctx = init_distributed()
    try:
        target, draft, tok = _load(args, ctx.device)
        folder = Path(args.out)
        kw = dict(method=args.method, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                  temperature=args.temperature, top_p=args.top_p, pad_token_id=tok.pad_token_id)
        if args.window:
            kw["window"] = args.window
        if draft is not None:
            kw["draft_model"] = draft

        def process(indices, batch):
            enc = tok(list(batch), return_tensors="pt", padding=True)
            gens = [torch.Generator().manual_seed(args.seed + i) for i in indices]
            out = mmspec.generate(target, enc.input_ids, attention_mask=enc.attention_mask, generator=gens, **kw)
            T = enc.input_ids.shape[1]
            records = []
            for row, (i, prompt) in enumerate(zip(indices, batch)):
                new = out.sequences[row, T:]
                new = new[: out.stats.new_tokens_per_row[row]]
                name = f"text_{i:06d}.txt"
                (folder / name).write_text(prompt + tok.decode(new, skip_special_tokens=True), encoding="utf-8")
                stats = {"new_tokens": out.stats.new_tokens_per_row[row], "row_forwards": out.stats.row_forwards[row]}
                records.append({"prompt": prompt, "file": name, "stats": stats, "tokens": new.tolist()})
            return records

        summary = run_sharded(prompts, process, folder, ctx, batch_size=args.batch_size)
    finally:
        ctx.close()
    if summary is not None:
        print(f"{summary['ok']}/{summary['items']} prompts ok, {len(summary['failed'])} failed, "
              f"step compression {summary.get('step_compression', float('nan')):.2f}x; wrote {folder / 'stats.json'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
