"""Recipe: the zoo's text language models (a target and a smaller draft sharing one tokenizer).

Both are transformers ``LlamaForCausalLM`` models trained on the Python standard library's source
(:func:`mmspec.zoo.data.text_corpus_splits`, nothing downloaded) with a byte-level BPE tokenizer trained
on the same text. Code is repetitive and structured, which is what makes prompt lookup, Jacobi and
draft-verify pay off on real code models; the pair exists so that the text benchmark measures acceptance
on models that were really trained rather than on random weights.

    python -m mmspec.zoo.train text_target --minutes 15 --threads 1 --out mmspec/zoo/weights/text_target
    python -m mmspec.zoo.train text_draft --minutes 10 --threads 1 --out mmspec/zoo/weights/text_draft

The draft loads the target's tokenizer (``--tokenizer``) so the two share ids exactly; when none is given
the tokenizer is trained afresh (deterministic for a given Python installation).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import text_corpus_splits
from .common import Budget, adamw, cosine_lr, dir_size_bytes, seed_everything, setup_threads, write_json

SPECIALS = ["<|endoftext|>", "<|pad|>"]


@dataclass
class TextRecipe:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704
    vocab_size: int = 4096
    seq_len: int = 192
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    corpus_chars: int = 6_000_000
    tokenizer_chars: int = 2_000_000
    eval_batches: int = 16


PRESETS = {
    "target": TextRecipe(),
    "draft": TextRecipe(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=352, lr=4e-3),
}


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE over ``text`` -> a ``PreTrainedTokenizerFast`` (left padding, eos = pad-free EOT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], padding_side="left", model_max_length=2048)


def build_model(r: TextRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=r.hidden, intermediate_size=r.intermediate, num_hidden_layers=r.layers,
        num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg)


def encode_corpus(tokenizer, text: str) -> torch.Tensor:
    """The text as one LongTensor of ids (files joined by blank lines, as in the corpus)."""
    chunks = [text[i : i + 200_000] for i in range(0, len(text), 200_000)]
    limit, tokenizer.model_max_length = tokenizer.model_max_length, int(1e12)  # no "too long" warning
    try:
        ids = [t for c in chunks for t in tokenizer(c, add_special_tokens=False)["input_ids"]]
    finally:
        tokenizer.model_max_length = limit
    return torch.tensor(ids, dtype=torch.long)


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator):
    """Endless random windows ``[batch_size, seq_len + 1]`` of the token stream."""
    n = ids.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, r: TextRecipe) -> dict[str, float]:
    """Held-out loss (nats/token) and mean predictive entropy on fixed windows of the validation split."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = batches(ids, r.seq_len, r.batch_size, gen)
    loss = ent = 0.0
    for _ in range(r.eval_batches):
        x = next(it)
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))
        logp = logits.log_softmax(-1)
        ent += float(-(logp.exp() * logp).sum(-1).mean())
    model.train()
    return {"heldout_loss": loss / r.eval_batches, "mean_token_entropy_nats": ent / r.eval_batches}


def train(out: str | Path, role: str = "target", minutes: float = 15.0, seed: int = 0, max_steps: int | None = None,
          threads: int = 1, tokenizer_path: str | None = None, init_from: str | None = None) -> dict[str, Any]:
    """Train the ``role`` ("target" or "draft") text LM; save fp16 safetensors + tokenizer + metrics.

    ``init_from``: continue from the weights (and tokenizer) of an earlier run's folder instead of a fresh
    initialisation (a second budget; the learning-rate schedule restarts)."""
    from transformers import AutoTokenizer

    r = PRESETS[role]
    setup_threads(threads)
    gen = seed_everything(seed)
    t_start = time.perf_counter()
    train_text, val_text = text_corpus_splits(r.corpus_chars)
    if tokenizer_path or init_from:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or init_from)
    else:
        tokenizer = train_tokenizer(train_text[: r.tokenizer_chars], r.vocab_size)
    train_ids, val_ids = encode_corpus(tokenizer, train_text), encode_corpus(tokenizer, val_text)
    print(f"[text-{role}] corpus {len(train_text):,} chars -> {train_ids.numel():,} tokens "
          f"(val {val_ids.numel():,}) in {time.perf_counter() - t_start:.0f}s", flush=True)
    if init_from:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    else:
        model = build_model(r, tokenizer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = adamw(model, r.lr, r.weight_decay)
    budget = Budget(minutes, max_steps)
    data = batches(train_ids, r.seq_len, r.batch_size, gen)
    step, ema, t0 = 0, None, time.perf_counter()
    bar = tqdm(desc=f"text-{role}", unit="step", mininterval=10)
    while not budget.done(step):
        lr = cosine_lr(r.lr, budget.progress(step), step, r.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(data)
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        if step % 50 == 0:
            print(f"[text-{role}] step {step} t={budget.elapsed():.0f}s loss={ema:.4f} lr={lr:.2e}", flush=True)
    bar.close()
    metrics = {"role": role, "steps": step, "tokens_seen": step * r.batch_size * r.seq_len,
               "train_seconds": time.perf_counter() - t0, "params": n_params, "final_train_loss_ema": ema,
               "recipe": asdict(r), "seed": seed, "init_from": init_from}
    metrics.update(evaluate(model, val_ids, r))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics
