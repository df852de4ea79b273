"""Tiny randomly initialised transformers causal LMs built from configs (no downloads), and prompt helpers."""

import torch

ARCHS = ("llama", "qwen3", "gpt2", "gemma")


def tiny_causal_lm(arch: str = "llama", vocab_size: int = 96, seed: int = 0, hidden: int = 32, layers: int = 2,
                   dtype=torch.float64, sharpen: float = 1.0):
    """A tiny random causal LM of a real transformers architecture, in eval mode.

    ``sharpen`` scales the output head so next-token distributions are peaked (random init is near
    uniform, which would make every drafter look perfect).
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                             use_sliding_window=False, **common)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                             **common)
        model = tf.GemmaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model = model.to(dtype).eval()
    if sharpen != 1.0:
        head = model.get_output_embeddings()
        with torch.no_grad():
            if model.config.tie_word_embeddings:
                model.config.tie_word_embeddings = False
                head.weight = torch.nn.Parameter(head.weight.detach().clone() * sharpen)
            else:
                head.weight.mul_(sharpen)
    return model


def perturbed_copy(model, scale: float = 0.3, seed: int = 1):
    """The same architecture with noisy weights: a drafter that agrees with the target only sometimes."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * (p.std() if p.numel() > 1 else 1.0))
    return draft


def ragged_prompts(batch: int, vocab_size: int, seed: int = 0, min_len: int = 3, max_len: int = 9):
    """Left-padded prompts of different lengths: (input_ids [B, T], attention_mask [B, T])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    if batch > 1:
        lengths[0], lengths[1] = min_len, max_len
    T = int(lengths.max())
    ids = torch.randint(2, vocab_size, (batch, T), generator=g)
    mask = (torch.arange(T).unsqueeze(0) >= (T - lengths).unsqueeze(1)).long()
    return ids.masked_fill(mask == 0, 0), mask
