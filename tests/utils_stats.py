"""Exact laws by enumeration and the chi-square goodness-of-fit test, for every distribution test.

The distribution tests of this suite all do the same three things: enumerate every outcome of a tiny problem,
compute its exact probability under the target (after the whole logits pipeline), and compare sampled counts
with a chi-square test. The helpers live here once; tests choose their own significance level.
"""

import itertools

import torch
from scipy.stats import chisquare

__all__ = ["all_outcomes", "outcome_counts", "sequence_law", "guided_sequence_law", "chi2_pvalue"]


def all_outcomes(num_values: int, length: int) -> torch.Tensor:
    """Every sequence of ``length`` values in ``[0, num_values)``: LongTensor [num_values**length, length].

    Row ``i`` holds the base-``num_values`` digits of ``i``, most significant first, so
    :func:`outcome_counts` indexes samples the same way.
    """
    return torch.tensor(list(itertools.product(range(num_values), repeat=length)), dtype=torch.long)


def outcome_counts(samples: torch.Tensor, num_values: int) -> torch.Tensor:
    """How often each outcome of :func:`all_outcomes` was sampled.

    Args:
        samples: LongTensor [N, length], values in ``[0, num_values)``.
    Returns:
        float64 [num_values**length] counts.
    """
    length = samples.shape[1]
    weights = num_values ** torch.arange(length - 1, -1, -1)
    index = (samples.long() * weights).sum(-1)
    return torch.bincount(index, minlength=num_values**length).double()


def sequence_law(step_probs: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """Exact probability of each outcome under a chain of next-token distributions.

    Args:
        step_probs: [N, length, V]; row ``n``'s distribution at step ``t`` given outcome ``n``'s first ``t``
            values (teacher forcing on the outcome itself).
        outcomes: LongTensor [N, length].
    Returns:
        [N] probabilities (the product over steps).
    """
    return step_probs.gather(-1, outcomes.unsqueeze(-1)).squeeze(-1).prod(-1)


@torch.no_grad()
def guided_sequence_law(model, cond_ids, uncond_ids, spans, positions, token_range, scale, temperature):
    """Exact law of generated spans under classifier-free guidance ``u + s (c - u)`` and a temperature.

    Args:
        model: a causal LM (``model(ids).logits``).
        cond_ids, uncond_ids: lists of prompt token ids for the conditional and unconditional branch.
        spans: LongTensor [N, L] every possible generated span (token ids, structural tokens included).
        positions: LongTensor [n] the span positions that are sampled (the others are forced).
        token_range: ``(lo, hi)``: sampled tokens are ids ``lo .. hi - 1``; the law is over those.
        scale, temperature: guidance scale and sampling temperature.
    Returns:
        [N] probability of each span.
    """
    lo, hi = token_range
    c = model(torch.cat([torch.tensor(cond_ids).expand(len(spans), -1), spans], 1)).logits
    u = model(torch.cat([torch.tensor(uncond_ids).expand(len(spans), -1), spans], 1)).logits
    c = c[:, len(cond_ids) - 1 + positions, lo:hi]
    u = u[:, len(uncond_ids) - 1 + positions, lo:hi]
    p = ((u + scale * (c - u)) / temperature).softmax(-1)
    return sequence_law(p, spans[:, positions] - lo)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of observed counts to exact probabilities.

    A count in a cell of probability zero fails at once (assert). Zero-probability cells are then dropped and
    cells expected fewer than ``min_expected`` times are pooled into one (the usual validity rule of the
    chi-square approximation).

    Args:
        counts: [K] observed counts.
        probs: [K] exact probabilities (normalised here).
    Returns:
        the p-value.
    """
    observed = counts.double()
    probs = probs.double()
    assert float(observed[probs == 0].sum()) == 0, "sampled an outcome of probability zero"
    support = probs > 0
    observed, expected = observed[support], probs[support] / probs[support].sum() * observed.sum()
    big = expected >= min_expected
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)
