"""The video pipeline: speculative video-token decoding equals AR decoding; the temporal init is exact; files."""

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from mmspec.drafting.jacobi import INIT_STRATEGIES, JacobiProposer
from mmspec.models.image_tokens import AFTER, EOF, EOI, EOL, IMAGE, ImageLayout, VideoLayout
from mmspec.pipelines.video import SpeculativeVideoPipeline, export_video, video_family_for

from image_fixtures import WORDS, tiny_tokenizer, tiny_vq
from utils_stats import all_outcomes, chi2_pvalue, guided_sequence_law, outcome_counts

PROMPTS = ["a red circle", "a blue square on green background", "green"]


def tiny_video_lm(seed=0, frames=3, height=2, width=3, codes=16, eol=False, eof=True, eoi=True, hidden=32,
                  layers=2, dtype=torch.float64, sharpen=3.0):
    """A random joint-vocabulary Llama with ``config.video_layout`` (ids: words, codes, BOI, [EOF], [EOI], [EOL])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    offset = len(WORDS)
    ids = iter(range(offset + codes, offset + codes + 4))
    boi = next(ids)
    eof_id = next(ids) if eof else None
    eoi_id = next(ids) if eoi else None
    eol_id = next(ids) if eol else None
    vocab = max(i for i in (boi, eof_id, eoi_id, eol_id) if i is not None) + 1
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.video_layout = dict(frames=frames, height=height, width=width, image_token_offset=offset,
                            codebook_size=codes, eof_token_id=eof_id, eoi_token_id=eoi_id, eol_token_id=eol_id)
    cfg.boi_token_id = boi
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def tiny_video_pipeline(**kw):
    pipe = SpeculativeVideoPipeline(model=tiny_video_lm(**kw), vq=tiny_vq(codes=kw.get("codes", 16)),
                                    tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def naive_guided_greedy(model, family, prompts, scale):
    """Reference: recompute the whole sequence every step (no cache), guide, force structure, argmax."""
    inputs = family.prefill_inputs(prompts)
    layout = family.layout()
    allowed = layout.allowed(model.config.vocab_size)
    rows = []
    for b in range(len(prompts)):
        cond = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        uncond = inputs["uncond_input_ids"][b][inputs["uncond_attention_mask"][b].bool()].tolist()
        new = []
        for t in range(layout.num_tokens):
            with torch.no_grad():
                c = model(torch.tensor([cond + new])).logits[0, -1]
                u = model(torch.tensor([uncond + new])).logits[0, -1]
            g = (u + scale * (c - u)).masked_fill(~allowed[layout.kind(torch.tensor(t))], float("-inf"))
            new.append(int(g.argmax()))
        rows.append(new)
    return layout.to_frames(torch.tensor(rows))


# frame_stride: 7 (2x3 grid + EOF) and 9 (2x(3 + EOL) + EOF)
@pytest.fixture(scope="module", params=[dict(), dict(eol=True, eoi=False)], ids=["eof+eoi", "eol+eof"])
def pipe(request):
    return tiny_video_pipeline(**request.param)


def test_ar_path_equals_naive_reference(pipe):
    ref = naive_guided_greedy(pipe.model, pipe.family, PROMPTS, 3.0)
    out = pipe(PROMPTS, do_sample=False, decoding="ar", guidance_scale=3.0, output_type="latent")
    assert torch.equal(out.tokens, ref)
    layout = pipe.family.layout()
    assert out.frames.shape == (3, layout.frames, layout.height, layout.width)


@pytest.mark.parametrize("kwargs", [
    dict(decoding="jacobi", init="random", window=6),
    dict(decoding="jacobi", init="horizontal", window=16),
    dict(decoding="jacobi", init="vertical", window=9),
    dict(decoding="jacobi", init="temporal", window=12),  # spans frame borders; sources inside the window
    dict(decoding="jacobi", init="temporal", window=25),  # longer than two frames
    dict(decoding="jacobi", init="temporal", window=4, coupled=True),
    dict(decoding="jacobi", init="sample_horizon", window=5),
    dict(decoding="draft", window=4, draft="other"),
    dict(decoding="draft", window=10, draft="self"),
])
def test_greedy_speculative_equals_ar(pipe, kwargs):
    kwargs = dict(kwargs)
    draft = kwargs.pop("draft", None)
    layout = pipe.family.layout()
    if draft == "other":
        kwargs["draft_model"] = tiny_video_lm(seed=5, eol=layout.eol_token_id is not None,
                                              eoi=layout.eoi_token_id is not None)
    elif draft == "self":
        kwargs["draft_model"] = pipe.model
    ref = pipe(PROMPTS, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="latent")
    out = pipe(PROMPTS, do_sample=False, guidance_scale=2.5, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.stats.new_tokens == 3 * layout.num_tokens
    if draft == "self":
        assert out.stats.target_forwards < ref.stats.target_forwards / 3


def test_temporal_init_copies_previous_frame():
    """Slots copy the token one frame earlier, committed or an earlier (itself copied) window slot; first-frame
    slots fall back to the vertical init."""
    layout = VideoLayout(frames=3, height=2, width=2, image_token_offset=10, codebook_size=5, eof_token_id=30,
                         eoi_token_id=31)
    assert layout.frame_stride == 5 and layout.num_tokens == 16
    T, K = 2, 9
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 15, (3, T + layout.num_tokens), generator=gen)
    committed = torch.tensor([6, 0, 3])
    state = SimpleNamespace(num_new=committed, prompt_length=T, tokens=tokens)
    drafts = torch.randint(10, 15, (3, K), generator=gen)
    fill = torch.rand(3, K, generator=gen) < 0.6
    fill[1] = True
    window = torch.cat([tokens.gather(1, (T + committed - 1).clamp_min(0).unsqueeze(1)), drafts], dim=1)
    proposer = JacobiProposer(K + 1, init="temporal", layout=layout)
    out = INIT_STRATEGIES["temporal"](state, proposer, window, fill)
    vertical = INIT_STRATEGIES["vertical"](state, proposer, window, fill)
    for b in range(3):
        c = int(committed[b])
        value = {i: int(tokens[b, T + i]) for i in range(c)}  # new index -> token, committed or drafted
        for j in range(K):
            i = c + j
            if not fill[b, j]:
                expected = int(drafts[b, j])
            elif i >= layout.frame_stride:
                expected = value[i - layout.frame_stride]
            else:
                expected = int(vertical[b, j])
            value[i] = expected
            assert int(out[b, j]) == expected, (b, j)
    # a single image has no previous frame: temporal is the vertical init there
    image = ImageLayout(height=2, width=2, image_token_offset=10, codebook_size=5)
    still = JacobiProposer(K + 1, init="temporal", layout=image)
    assert torch.equal(INIT_STRATEGIES["temporal"](state, still, window, fill),
                       INIT_STRATEGIES["vertical"](state, still, window, fill))
    with pytest.raises(ValueError, match="temporal"):
        INIT_STRATEGIES["temporal"](state, JacobiProposer(K + 1, init="temporal"), window, fill)


def test_temporal_init_drafts_a_static_video_in_few_steps():
    """A model whose guided greedy output repeats: with the temporal init later frames are accepted in blocks."""
    pipe = tiny_video_pipeline(frames=4, height=2, width=2, codes=4, sharpen=0.0)  # uniform logits: ties -> code 0
    ar = pipe(PROMPTS[:2], do_sample=False, decoding="ar", output_type="latent")
    assert (ar.tokens == 0).all()
    forwards = {}
    for init in ("temporal", "random"):
        out = pipe(PROMPTS[:2], do_sample=False, decoding="jacobi", init=init, window=6, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, ar.tokens)
        forwards[init] = out.stats.target_forwards
    assert forwards["temporal"] <= 6 < forwards["random"]  # 4 frames x (4 codes + EOF) + EOI = 21 tokens
    assert ar.stats.target_forwards == pipe.family.layout().num_tokens


def test_video_layout_structure():
    layout = VideoLayout(frames=2, height=2, width=2, image_token_offset=10, codebook_size=5, eol_token_id=1,
                         eof_token_id=3, eoi_token_id=2)
    assert layout.row_stride == 3 and layout.frame_stride == 7 and layout.num_tokens == 15
    kinds = layout.kind(torch.arange(16)).tolist()
    assert kinds == [IMAGE, IMAGE, EOL, IMAGE, IMAGE, EOL, EOF] * 2 + [EOI, AFTER]
    assert layout.forced_token(layout.kind(torch.arange(15))).tolist() == [-1, -1, 1, -1, -1, 1, 3] * 2 + [2]
    allowed = layout.allowed(20)
    assert allowed.shape == (5, 20) and allowed[EOF].nonzero().flatten().tolist() == [3]
    assert allowed[IMAGE].nonzero().flatten().tolist() == list(range(10, 15))
    span = torch.tensor([[10, 11, 1, 12, 13, 1, 3, 14, 10, 1, 11, 12, 1, 3, 2]])
    assert layout.to_frames(span).tolist() == [[[0, 1, 2, 3], [4, 0, 1, 2]]]
    assert layout.to_grid(span).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    plain = VideoLayout(frames=3, height=1, width=2, image_token_offset=0, codebook_size=4)
    assert plain.frame_stride == 2 and plain.num_tokens == 6 and (plain.kind(torch.arange(6)) == IMAGE).all()
    with pytest.raises(ValueError, match="frames"):
        VideoLayout(frames=0, height=1, width=1, image_token_offset=0, codebook_size=2)
    assert EOI == 2 and EOL == 1


def exact_video_distribution(model, family, prompt, scale, temperature):
    """P(codes) over every code assignment of a tiny video (structural tokens are forced, so they carry
    probability 1); returns probs [N^cells] and the outcomes' codes [N^cells, cells]."""
    layout = family.layout()
    lo, hi = layout.token_range
    inputs = family.prefill_inputs([prompt])
    cond = inputs["input_ids"][0].tolist()
    uncond = inputs["uncond_input_ids"][0][inputs["uncond_attention_mask"][0].bool()].tolist()
    cells = layout.frames * layout.height * layout.width
    codes = all_outcomes(hi - lo, cells)
    kinds = layout.kind(torch.arange(layout.num_tokens))
    span = layout.forced_token(kinds).expand(len(codes), -1).clone()
    span[:, kinds == IMAGE] = codes + lo
    positions = (kinds == IMAGE).nonzero().flatten()
    return guided_sequence_law(model, cond, uncond, span, positions, (lo, hi), scale, temperature), codes


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(window=4), dict(window=5, coupled=True)], ids=["temporal", "temporal+coupled"])
def test_temporal_init_sampling_is_lossless(kw):
    """2 frames of 1x2 codes (+ EOF), 3 codes: 81 outcomes enumerated exactly vs 6,000 samples; chi-square
    at alpha = 0.001. Windows of 4-5 tokens span the frame border (frame stride 3)."""
    model = tiny_video_lm(frames=2, height=1, width=2, codes=3, eoi=False, sharpen=2.0, hidden=16,
                          dtype=torch.float32)
    pipe = SpeculativeVideoPipeline(model=model, vq=tiny_vq(codes=3), tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    scale, temp, N = 2.0, 0.9, 6_000
    probs, _ = exact_video_distribution(model, pipe.family, "a red circle", scale, temp)
    out = pipe("a red circle", num_videos_per_prompt=N, guidance_scale=scale, temperature=temp, decoding="jacobi",
               init="temporal", generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    assert out.stats.step_compression > 1.0
    assert chi2_pvalue(outcome_counts(out.tokens.flatten(1), 3), probs) > 1e-3


def test_outputs_and_files(tmp_path):
    pipe = tiny_video_pipeline()
    layout = pipe.family.layout()
    out = pipe(PROMPTS[:2], num_videos_per_prompt=2, generator=torch.Generator().manual_seed(1))
    assert len(out.frames) == 4 and all(len(v) == 3 for v in out.frames)
    assert all(isinstance(f, PIL.Image.Image) and f.size == (12, 8) for v in out.frames for f in v)
    assert out.tokens.shape == (4, 3, 6) and out.tokens.min() >= 0 and out.tokens.max() < 16
    again = pipe(PROMPTS[:2], num_videos_per_prompt=2, generator=torch.Generator().manual_seed(1), output_type="pt")
    assert torch.equal(out.tokens, again.tokens) and again.frames.shape == (4, 3, 3, 8, 12)
    assert np.array_equal(np.asarray(out.frames[1][2]), (again.frames[1, 2].permute(1, 2, 0).numpy() * 255).round())
    arr = pipe("a red circle", output_type="np").frames
    assert arr.shape == (1, 3, 8, 12, 3) and arr.min() >= 0 and arr.max() <= 1
    frames, tokens, stats = pipe("a red circle", output_type="pt", return_dict=False)
    assert frames.shape == (1, 3, 3, 8, 12) and stats.new_tokens == layout.num_tokens

    video = again.frames[0]  # [F, 3, H, W]
    gif = export_video(out.frames[0], tmp_path / "v.gif", fps=5, scale=2)
    mp4 = export_video(video, tmp_path / "v.mp4", fps=5, scale=4)
    with PIL.Image.open(gif) as im:
        changes = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.frames[0], out.frames[0][1:]))
        assert im.n_frames == 1 + changes  # Pillow merges identical consecutive frames
        assert im.size == (24, 16)
    decoded = _read_mp4(mp4)
    assert decoded.shape == (3, 32, 48, 3)
    distinct = [np.full((8, 10, 3), 40 * i, np.uint8) for i in range(5)]  # five different frames
    gif2 = export_video(np.stack(distinct), tmp_path / "d.gif")
    with PIL.Image.open(gif2) as im:
        assert im.n_frames == 5 and im.size == (10, 8)
        im.seek(3)
        assert np.abs(np.asarray(im.convert("RGB")).astype(int) - 120).max() <= 2
    mp42 = export_video(np.stack(distinct), tmp_path / "d.mp4", fps=2)
    assert _read_mp4(mp42).shape == (5, 8, 10, 3)


def _read_mp4(path):
    """Decode every frame with ffmpeg (imageio-ffmpeg): uint8 [F, H, W, 3]."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


@pytest.mark.parametrize("kwargs,match", [
    (dict(decoding="beam"), "unknown `decoding`"),
    (dict(window=0), "`window`"),
    (dict(init="zigzag"), "unknown Jacobi `init`"),
    (dict(output_type="gif"), "`output_type`"),
    (dict(num_videos_per_prompt=0), "`num_videos_per_prompt`"),
    (dict(decoding="draft"), "needs a `draft_model`"),
    (dict(generator=[torch.Generator()] * 5), "generators"),
])
def test_bad_arguments(kwargs, match):
    pipe = tiny_video_pipeline()
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **kwargs)


def test_bad_files_and_models(tmp_path):
    with pytest.raises(ValueError, match=".gif or .mp4"):
        export_video(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "v.avi")
    with pytest.raises(ValueError, match="even"):
        export_video(np.zeros((2, 5, 4, 3), np.uint8), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="frames"):
        export_video(np.zeros((4, 4, 3), np.uint8), tmp_path / "v.gif")
    with pytest.raises(TypeError, match="no video family"):
        video_family_for(torch.nn.Linear(1, 1))
    from mmspec.models.families import family_for

    with pytest.raises(TypeError):  # a video model is not an image model
        family_for(tiny_video_lm())
    with pytest.raises(ValueError, match="video layout"):
        tiny_video_pipeline()("a red circle", decoding="draft", draft_model=tiny_video_lm(frames=2))


def test_save_load_and_sample_script(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    pipe = SpeculativeVideoPipeline(model=tiny_video_lm(dtype=torch.float32), vq=tiny_vq(), tokenizer=tiny_tokenizer())
    pipe.save_pretrained(tmp_path / "pipe")
    again = SpeculativeVideoPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(do_sample=False, output_type="latent")
    assert torch.equal(pipe("a red circle", **kw).tokens, again("a red circle", **kw).tokens)

    path = Path(__file__).resolve().parents[1] / "samples" / "generate_video.py"
    spec = importlib.util.spec_from_file_location("generate_video", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    files = script.main(["--model", str(tmp_path / "pipe"), "--prompt", "a red circle", "--prompt", "green",
                         "--window", "9", "--scale", "2", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "video_000.gif", "video_001.gif"]
    assert files == [str(out / "video_000.gif"), str(out / "video_001.gif")]
    with PIL.Image.open(out / "video_000.gif") as im:
        assert im.size == (24, 16) and 1 <= im.n_frames <= 3
    stats = json.loads((out / "stats.json").read_text())
    assert stats["lossless"] is True and stats["new_tokens"] == 2 * pipe.family.layout().num_tokens
    assert stats["frames"] == 3 and stats["frame_size"] == [12, 8]
    with pytest.raises(SystemExit):
        script.main(["--model", str(tmp_path / "pipe"), "--out", str(out)])


def test_bench_rows_on_a_tiny_model(tmp_path):
    from mmspec.bench.common import markdown_table
    from mmspec.bench.video import COLUMNS, METHODS, run
    from mmspec.zoo import hub
    from mmspec.zoo.recipes.video import VIDEO_HEADS

    pipe = tiny_video_pipeline(frames=2, height=2, width=2)
    targets = {h: torch.tensor([0, 1]) for h in VIDEO_HEADS}
    rows = run(pipe, PROMPTS[:2], list(METHODS), window=8, do_sample=False, clf=hub.load_classifier(), targets=targets)
    assert [r["method"] for r in rows] == list(METHODS)
    # greedy: every method makes the same videos, so the same adherence
    assert all(r["adherence_heads"] == rows[0]["adherence_heads"] for r in rows)
    assert 0.0 <= rows[0]["adherence"] <= 100.0 and set(rows[0]["adherence_heads"]) == set(VIDEO_HEADS)
    assert all(r["new_tokens"] == rows[0]["new_tokens"] and r["lossless"] for r in rows)
    assert rows[0]["step_compression"] == 1.0 and rows[0]["speedup_vs_ar"] == 1.0
    assert all(r["step_compression"] >= 1.0 and 0.0 <= r["repeat_fraction"] <= 1.0 for r in rows)
    assert "SJD temporal + coupled" in markdown_table(rows, COLUMNS)
