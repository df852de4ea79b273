"""The zoo's text-to-image token models: recipe smoke run, and (when bundled) the shipped weights."""

import os

import pytest
import torch

from mmspec.zoo import hub

HAS_VQ = (hub.WEIGHTS_DIR / "vq" / "config.json").is_file()
HAS_T2I = all((hub.WEIGHTS_DIR / n / "config.json").is_file() for n in ("t2i_target", "t2i_draft"))


@pytest.mark.skipif(not HAS_VQ, reason="bundled VQ tokenizer not present")
def test_t2i_recipe_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmspec.pipelines import SpeculativeImagePipeline
    from mmspec.zoo.recipes import t2i

    metrics = t2i.train(tmp_path, role="draft", minutes=5, max_steps=1, threads=1)
    assert metrics["steps"] == 1 and metrics["mean_token_entropy_nats"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("a red circle")["input_ids"][0] == 1  # <bos> first
    pipe = SpeculativeImagePipeline(model=model, vq=hub.load_vq(), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small red circle at the center on a plain blue background", window=8, output_type="pil",
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64) and out.tokens.shape == (1, 256)


@pytest.mark.skipif(not HAS_T2I, reason="bundled text-to-image models not present")
def test_bundled_t2i_models_are_exact_and_load_offline():
    from mmspec.zoo.models import load_image_pipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe, draft = load_image_pipeline(dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a large green square at the top right on a striped gray background",
               "a small red circle at the bottom left on a plain white background"]
    kw = dict(do_sample=False, output_type="latent", guidance_scale=3.0)
    ar = pipe(prompts, decoding="ar", **kw)
    jac = pipe(prompts, decoding="jacobi", init="vertical", window=16, **kw)
    dr = pipe(prompts, decoding="draft", draft_model=draft, window=5, **kw)
    assert torch.equal(ar.tokens, jac.tokens) and torch.equal(ar.tokens, dr.tokens)
    assert jac.stats.target_forwards < ar.stats.target_forwards


@pytest.mark.skipif(not HAS_VQ, reason="bundled VQ tokenizer not present")
def test_t2i_draft_distillation(tmp_path):
    """The draft recipe's distillation: unconditional rows hold the same codes without the caption, the loss is
    zero for a copy of the teacher and falls with training, and the saved metrics report the agreement."""
    from transformers import AutoModelForCausalLM

    from mmspec.zoo.recipes import t2i
    from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

    tok, vq = t2i.build_tokenizer(), hub.load_vq()
    torch.manual_seed(123)  # not the student train() starts from (seed 0)
    t2i.build_model(t2i.PRESETS["draft"], len(tok), int(hub.codebook(vq).shape[0])).save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32).eval()
    ids, target, captions = t2i.make_batch(tok, vq, teacher.config, 0, 4, HELDOUT_SCENE_SEED, 2, 0.0, None,
                                           noise_free=True)
    ids_u, target_u = t2i._uncond_rows(ids, target, teacher.config.boi_token_id)
    for i in range(4):
        cond = ids[i][target[i]]
        assert torch.equal(ids_u[i][target_u[i]], cond) and cond.numel() == 257  # 256 codes + EOI
        assert ids_u[i, :2].tolist() == [1, teacher.config.boi_token_id]  # <bos> BOI: the empty caption
    assert ids_u.shape[1] < ids.shape[1]

    copy = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32).eval()
    with torch.no_grad():
        for divergence in ("kl", "tv"):
            assert float(t2i.distill_loss(copy, teacher, ids, target, divergence=divergence)) < 1e-6
        with pytest.raises(ValueError, match="divergence must be one of"):
            t2i.distill_loss(copy, teacher, ids, target, divergence="js")
    same = t2i.agreement(copy, teacher, tok, vq, n=4)
    assert same["mean_tv_guided"] < 1e-5 and same["expected_acceptance"] > 1 - 1e-5

    for divergence in ("kl", "tv"):
        torch.manual_seed(1)
        student = t2i.build_model(t2i.PRESETS["draft"], len(tok), teacher.config.image_layout["codebook_size"])
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            loss = t2i.distill_loss(student, teacher, ids, target, guidance=3.0, divergence=divergence)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.8 * losses[0], (divergence, losses)
    assert not any(p.grad is not None for p in teacher.parameters())

    metrics = t2i.train(tmp_path / "kd", role="draft", minutes=5, max_steps=1, threads=1,
                        distill_from=tmp_path / "teacher", guidance=2.0, on_policy=0.5)
    d = metrics["distill"]
    assert d["from"] == "teacher" and d["guidance"] == 2.0 and d["on_policy"] == 0.5
    for a in (d["agreement_before"], d["agreement"]):
        assert a["on_policy"]["on_policy"] and "on_policy" not in a["data"]
        for b in a.values():
            assert b["n_scenes"] == 128 and 0 < b["expected_acceptance"] <= 1 and b["mean_kl_guided"] >= 0
            assert b["expected_acceptance"] == pytest.approx(1 - b["mean_tv_guided"])
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="on_policy must be a share"):
            t2i.train(tmp_path / "bad", role="draft", max_steps=1, threads=1, distill_from=tmp_path / "teacher",
                      on_policy=share)
    with pytest.raises(ValueError, match="on_policy needs distill_from"):
        t2i.train(tmp_path / "bad", role="draft", max_steps=1, threads=1, on_policy=1.0)


def test_t2i_teacher_codes_on_policy(tmp_path):
    """On-policy distillation data: the first rows' codes become the teacher's own guided samples (the image
    pipeline's, same generator -> same codes), dropped captions are sampled from the empty prompt, and everything
    outside the code span is left as it was."""
    from transformers import AutoModelForCausalLM

    from mmspec.pipelines import SpeculativeImagePipeline
    from mmspec.zoo.recipes import t2i
    from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

    tok, vq = t2i.build_tokenizer(), hub.load_vq()
    torch.manual_seed(0)
    t2i.build_model(t2i.PRESETS["draft"], len(tok), int(hub.codebook(vq).shape[0])).save_pretrained(tmp_path / "t")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t", dtype=torch.float32).eval()
    ids, target, captions = t2i.make_batch(tok, vq, teacher.config, 0, 4, HELDOUT_SCENE_SEED, 2, 0.5,
                                           torch.Generator().manual_seed(2), noise_free=True)
    boi = teacher.config.boi_token_id
    starts = (ids == boi).long().argmax(1)
    dropped = (starts == 1).tolist()
    assert any(dropped[:3]) and not all(dropped[:3])  # this seed drops some of the first three captions
    new = t2i.teacher_codes(ids, captions, teacher, tok, vq, 3, 2.0, torch.Generator().manual_seed(7))
    assert new.shape == ids.shape and torch.equal(new[3], ids[3])
    offset = teacher.config.image_layout["image_token_offset"]
    span = torch.zeros_like(target)
    for i in range(4):
        span[i, starts[i] + 1 : starts[i] + 257] = True
    assert torch.equal(new[~span], ids[~span])  # prompts, BOI, EOI, padding
    assert not torch.equal(new[:3][span[:3]], ids[:3][span[:3]])
    pipe = SpeculativeImagePipeline(model=teacher, vq=vq, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    texts = ["" if d else c for c, d in zip(captions[:3], dropped[:3])]
    ref = pipe(texts, guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(7),
               decoding="ar").images.reshape(3, -1)
    assert torch.equal(new[:3][span[:3]].view(3, -1), ref + offset)
    assert torch.equal(t2i.teacher_codes(ids, captions, teacher, tok, vq, 0, 2.0, None), ids)


def test_t2i_recipe_identity_resumes_states_from_before_tied_embeddings():
    """A training state records its recipe; fields added later (``tie_embeddings``) are left out at their earlier
    behaviour, so an untied target's state saved before the field existed still resumes, while the tied draft's
    state says so."""
    from dataclasses import asdict

    from mmspec.zoo.recipes import t2i

    target, draft = t2i._identity(t2i.PRESETS["target"]), t2i._identity(t2i.PRESETS["draft"])
    assert "tie_embeddings" not in target and target == {k: v for k, v in asdict(t2i.PRESETS["target"]).items()
                                                         if k != "tie_embeddings"}
    assert draft["tie_embeddings"] is True
