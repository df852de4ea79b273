"""The adapter's host-side mask mirror (a growing numpy buffer) stays equal to the plain concatenation of every
block's kept validity, through growth past its capacity and rollbacks that drop columns, and in step with the KV
cache's length."""

import torch

from mmspec.models.causal_lm import CausalLM

from lm_fixtures import tiny_causal_lm


def test_mask_mirror_grows_and_rolls_back(monkeypatch):
    monkeypatch.setattr(CausalLM, "SQUEEZE_MIN_HOLES", 10**9)  # holes stay (squeezing: tests/test_squeeze_holes.py)
    model = tiny_causal_lm("llama", dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (3, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    lm = CausalLM(model)
    lm.prefill(ids, mask)
    reference = mask.bool()
    capacity = lm._mbuf.shape[1]
    for step in range(40):  # 40 blocks of 4 columns: far past the first buffer
        block = torch.randint(2, 96, (3, 4), generator=gen)
        valid = torch.rand(3, 4, generator=gen) < 0.8
        valid[:, 0] = True
        lm.checkpoint()
        lm.forward(block, valid)
        keep = torch.randint(0, 5, (3,), generator=gen)  # valid tokens kept per row
        lm.rollback(keep)
        kept = valid & (valid.long().cumsum(-1) <= keep.view(-1, 1))
        reference = torch.cat([reference, kept], 1)
        reference = reference[:, : int(reference.any(0).nonzero()[-1]) + 1]  # trailing all-hole columns dropped
        assert torch.equal(lm._mask_cpu, reference), step
        assert lm.length == reference.shape[1] == lm.cache.get_seq_length()
        assert torch.equal(lm.num_valid(), reference.sum(-1))
    assert lm._mbuf.shape[1] > capacity  # it grew


def test_mask_mirror_with_hole_free_blocks(monkeypatch):
    """Blocks without holes are not written to the mirror until it is read; mixing them with holed blocks, partial
    keeps and growth keeps it equal to the reference, whenever it is read."""
    monkeypatch.setattr(CausalLM, "SQUEEZE_MIN_HOLES", 10**9)
    model = tiny_causal_lm("llama", dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 96, (2, 4), generator=gen)
    lm = CausalLM(model)
    lm.prefill(ids, torch.ones(2, 4, dtype=torch.long))  # no padding: the dense path
    reference = torch.ones(2, 4, dtype=torch.bool)
    pending = 0
    for step in range(60):
        block = torch.randint(2, 96, (2, 3), generator=gen)
        kind = step % 3 if step < 30 else step % 5  # hole-free blocks only, then holes too
        valid = torch.ones(2, 3, dtype=torch.bool) if kind < 3 else torch.rand(2, 3, generator=gen) < 0.7
        valid[0] = True  # no block column is a hole in every row (a rollback that keeps them all keeps those too)
        lm.checkpoint()
        lm.forward(block, valid)
        keep = torch.full((2,), 3) if kind < 2 else torch.randint(0, 4, (2,), generator=gen)
        if step < 30:  # the same count in both rows: no holes yet
            keep[1] = keep[0]
        lm.rollback(keep)
        kept = valid & (valid.long().cumsum(-1) <= keep.view(-1, 1))
        reference = torch.cat([reference, kept], 1)
        reference = reference[:, : int(reference.any(0).nonzero()[-1]) + 1]
        assert lm.length == reference.shape[1] == lm.cache.get_seq_length(), step
        pending += lm._true_from is not None
        if step % 3 == 0:  # reading it writes what is pending
            assert torch.equal(lm._mask_cpu, reference), step
            assert torch.equal(lm.num_valid(), reference.sum(-1)), step
    assert torch.equal(lm._mask_cpu, reference)
    assert pending >= 10  # the lazy path ran
