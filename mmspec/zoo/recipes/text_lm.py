"""Recipe: the zoo's text language models (a target and a smaller draft sharing one tokenizer).

Both are transformers ``LlamaForCausalLM`` models trained on the Python standard library's source
(:func:`mmspec.zoo.data.text_corpus_splits`, nothing downloaded) with a byte-level BPE tokenizer trained
on the same text. Code is repetitive and structured, which is what makes prompt lookup, Jacobi and
draft-verify pay off on real code models; the pair exists so that the text benchmark measures acceptance
on models that were really trained rather than on random weights.

    python -m mmspec.zoo.train text_target --minutes 110 --threads 1 --out mmspec/zoo/weights/text_target --ckpt ckpt/text.pt
    python -m mmspec.zoo.train text_draft --minutes 10 --threads 1 --out mmspec/zoo/weights/text_draft

The target is deep (12 layers) and trains early exits after its first layers (``TextRecipe.exit_layers``), so
that layer-skip self-drafting (``method="self"``) pays on it; see ``cards/text.md``.

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
from .common import ResumableRun, adamw, dir_size_bytes, seed_everything, setup_threads, write_json

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
    #: early exits trained beside the last layer (LayerSkip, Elhoushi et al. 2024): after each of these many
    #: decoder layers the model's own final norm and LM head read the hidden state, and that prediction is trained
    #: too, so that the target with its later layers skipped (``method="self"``) is a good draft of itself
    exit_layers: tuple[int, ...] = ()
    #: weight of each early exit's loss (added to the last layer's cross-entropy)
    exit_weight: float = 0.0
    #: share of an exit's loss that is cross-entropy against the last layer's (detached) distribution rather than
    #: against the data: self-distillation, which trains the exit to *agree* with the model it drafts for
    exit_distill: float = 0.5


PRESETS = {
    # deep and narrow, with early exits after 1, 2 and 3 layers: the shape where layer skipping pays
    "target": TextRecipe(layers=12, lr=2e-3, exit_layers=(1, 2, 3), exit_weight=0.3),
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


def training_loss(model, x: torch.Tensor, r: TextRecipe) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch of windows ``x`` ``[B, seq_len + 1]``: next-token cross-entropy at the last layer, plus
    ``exit_weight`` x each early exit's loss (``exit_layers``; the exit reads the hidden state after that many layers
    through the model's final norm and LM head, as the layer-skip draft does). Returns ``(loss, per-part values)``."""
    labels = x[:, 1:].flatten()
    out = model(input_ids=x[:, :-1], output_hidden_states=bool(r.exit_layers))
    logits = out.logits.flatten(0, 1).float()
    loss = F.cross_entropy(logits, labels)
    parts = {"last": loss.item()}
    if r.exit_layers:
        soft = logits.detach().softmax(-1)
        norm, head = model.get_decoder().norm, model.get_output_embeddings()
        for e in r.exit_layers:
            exit_logits = head(norm(out.hidden_states[e])).flatten(0, 1).float()
            data = F.cross_entropy(exit_logits, labels)
            distill = F.cross_entropy(exit_logits, soft) if r.exit_distill else torch.zeros(())
            loss = loss + r.exit_weight * ((1 - r.exit_distill) * data + r.exit_distill * distill)
            parts[f"exit{e}"] = data.item()
    return loss, parts


@torch.no_grad()
def exit_agreement(model, ids: torch.Tensor, r: TextRecipe, batches_n: int = 4) -> dict[str, float]:
    """Share of held-out positions where each early exit's argmax equals the last layer's (the greedy acceptance rate
    of the layer-skip draft that keeps the first ``e`` layers), keyed ``"exit{e}"``."""
    if not r.exit_layers:
        return {}
    model.eval()
    it = batches(ids, r.seq_len, r.batch_size, torch.Generator().manual_seed(4321))
    hits = {e: 0.0 for e in r.exit_layers}
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    for _ in range(batches_n):
        out = model(input_ids=next(it)[:, :-1], output_hidden_states=True)
        top = out.logits.argmax(-1)
        for e in r.exit_layers:
            hits[e] += float((head(norm(out.hidden_states[e])).argmax(-1) == top).float().mean())
    model.train()
    return {f"exit{e}": hits[e] / batches_n for e in r.exit_layers}


def train(out: str | Path, role: str = "target", minutes: float = 15.0, seed: int = 0, max_steps: int | None = None,
          threads: int = 1, tokenizer_path: str | None = None, init_from: str | None = None,
          ckpt: str | Path | None = None, ckpt_every_s: float = 300.0) -> dict[str, Any]:
    """Train the ``role`` ("target" or "draft") text LM; save fp16 safetensors + tokenizer + metrics + loss curve.

    ``init_from``: continue from the weights (and tokenizer) of an earlier run's folder instead of a fresh
    initialisation (a second budget; the learning-rate schedule restarts). ``ckpt``: training-state file written
    every ``ckpt_every_s`` seconds; an existing one is resumed (same role and recipe; its time counts against
    ``minutes``)."""
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
    run = ResumableRun(f"text-{role}", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, role=role,
                       recipe=asdict(r))
    data = batches(train_ids, r.seq_len, r.batch_size, gen)
    bar = tqdm(desc=f"text-{role}", unit="step", mininterval=10, initial=run.step)
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        loss, _ = training_loss(model, next(data), r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), r.batch_size)
        bar.update(1)
    bar.close()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_seconds = run.finish(out / "loss_curve.png", f"text_{role} (loss{' + exits' if r.exit_layers else ''})")
    metrics = {"role": role, "steps": run.step, "tokens_seen": run.seen * r.seq_len, "train_seconds": round(train_seconds, 1),
               "params": n_params, "final_train_loss_ema": run.ema, "recipe": asdict(r), "seed": seed,
               "init_from": init_from}
    metrics.update(evaluate(model, val_ids, r))
    if r.exit_layers:
        metrics["heldout_exit_agreement"] = exit_agreement(model, val_ids, r)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics
