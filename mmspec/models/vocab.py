"""Prompt words a model does not know.

Word-level tokenizers (the zoo models') map every out-of-vocabulary word to one unknown token: "a photo of a
cat" becomes ``<unk> <unk> ...`` and the model silently ignores what was asked. Pipelines warn with those words
(and, for a small vocabulary, the words the model knows); subword tokenizers without an unknown token never do.
"""

from __future__ import annotations

import warnings

__all__ = ["unknown_words", "known_words", "warn_unknown_words"]


def unknown_words(tokenizer, text: str) -> list[str]:
    """The whitespace-separated words of ``text`` that ``tokenizer`` encodes with its unknown token, in order,
    without repeats ([] when the tokenizer has no unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    out = []
    for word in text.split():
        if word in special or word in out:
            continue
        if unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
            out.append(word)
    return out


def known_words(tokenizer, limit: int = 300) -> list[str] | None:
    """The tokenizer's ordinary words, sorted, when there are at most ``limit`` of them (else None)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    words = sorted(w for w in vocab if w not in special and not (w.startswith("<") and w.endswith(">")))
    return words if 0 < len(words) <= limit else None


def warn_unknown_words(tokenizer, texts, what: str = "prompt") -> list[str]:
    """``warnings.warn`` once per call naming the words of ``texts`` the model does not know; returns them."""
    unknown = []
    for text in texts:
        for word in unknown_words(tokenizer, text or ""):
            if word not in unknown:
                unknown.append(word)
    if unknown:
        unk = getattr(tokenizer, "unk_token", None) or "the unknown token"
        msg = (f"{what} words not in the model's vocabulary are encoded as {unk} and carry no meaning: "
               f"{', '.join(repr(w) for w in unknown)}.")
        known = known_words(tokenizer)
        if known:
            msg += f" The model knows: {' '.join(known)}."
        warnings.warn(msg, UserWarning, stacklevel=3)
    return unknown
