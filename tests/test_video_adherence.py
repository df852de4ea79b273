"""The video model's prompt-adherence reader (classifier on upsampled frames + motion direction) and evaluation."""

import json
import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmspec.zoo import hub  # noqa: E402
from mmspec.zoo.data import DIRECTIONS, image_to_tensor, make_moving_scene, parse_caption, scene_seed  # noqa: E402
from mmspec.zoo.recipes import video  # noqa: E402


def _clips(n, size=32, frames=8):
    clips = [make_moving_scene(scene_seed(video.ADHERENCE_SEED, i), size, frames, 1) for i in range(n)]
    return clips, torch.stack([image_to_tensor(c.frames) for c in clips])


def _directions(clips):
    return torch.tensor([list(DIRECTIONS).index(c.attributes["objects"][0]["direction"]) for c in clips])


@pytest.mark.parametrize("size, frames", [(64, 4), (32, 8)])
def test_motion_direction_reads_short_and_long_clips(size, frames):
    # 4 frames of 64 px: the object moves 4-8 pixels and mostly overlaps itself (the first reader read 46% of these)
    clips, x = _clips(32, size, frames)
    assert (video.motion_direction(x) == _directions(clips)).float().mean() >= 0.9


def test_motion_direction_reads_real_clips():
    clips, frames = _clips(24)
    got = video.motion_direction(frames)
    want = _directions(clips)
    assert got.shape == (24,) and got.dtype == torch.long
    assert (got == want).float().mean() >= 0.9
    still = frames[:, :1].expand(-1, 8, -1, -1, -1)  # nothing moves
    assert (video.motion_direction(still) == -1).all()
    # moving the clip backwards in time reverses the direction
    names = list(DIRECTIONS)
    opposite = {i: names.index(next(k for k, v in DIRECTIONS.items() if v == tuple(-u for u in DIRECTIONS[n])))
                for i, n in enumerate(names)}
    back = video.motion_direction(frames.flip(1))
    ok = got == want
    assert all(int(back[i]) == opposite[int(got[i])] for i in range(24) if ok[i])


def test_read_clips_reads_real_clips_and_their_captions():
    clips, frames = _clips(16)
    pred = video.read_clips(hub.load_classifier(), frames)
    want = video.caption_targets([c.caption for c in clips])
    assert set(pred) == set(video.VIDEO_HEADS) == set(want)
    for h in video.VIDEO_HEADS[:-1]:
        assert pred[h].shape == (16,)
        assert (pred[h] == want[h]).float().mean() >= 0.85, h
    # frame by frame: every frame of a real clip reads as its caption; the clip's label is the frames' most frequent
    per_frame = video.read_frames(hub.load_classifier(), frames)
    assert set(per_frame) == set(video.VIDEO_HEADS[:-1])
    for h, labels in per_frame.items():
        assert labels.shape == frames.shape[:2] and (labels.mode(1).values == pred[h]).all()
        assert ((labels == want[h].unsqueeze(1)).float().mean(0) >= 0.8).all(), h


def test_clips_that_name_where_they_start_are_read_there(tmp_path):
    tok = video.build_tokenizer()
    cfg = video.build_model(video.VideoRecipe(caption_positions=True), len(tok), 1024).config
    assert video.caption_positions(cfg) and not video.caption_positions(video.build_model(video.VideoRecipe(), 47, 8).config)
    clips = video.held_out_clips(cfg, 24)
    assert all(" at the " in c.caption and " moving " in c.caption for c in clips)
    plain = video.held_out_clips(video.build_model(video.VideoRecipe(), len(tok), 1024).config, 24)
    assert all(a.frames.tobytes() == b.frames.tobytes() for a, b in zip(clips, plain))  # the same clips
    want = video.caption_targets([c.caption for c in clips])
    assert tuple(want) == (*video.VIDEO_HEADS, "position")
    assert tuple(video.caption_targets([plain[0].caption])) == video.VIDEO_HEADS
    frames = torch.stack([image_to_tensor(c.frames) for c in clips])
    pred = video.read_clips(hub.load_classifier(), frames, start_position=True)
    # the classifier's cells are those of still scenes; a clip may start near a cell's edge (~80% on these clips)
    assert (pred["position"] == want["position"]).float().mean() >= 0.6
    assert "position" not in video.read_clips(hub.load_classifier(), frames[:2])
    # the training sequences carry the same caption style
    ids, target, captions, _ = video.make_batch(tok, hub.load_vq(), cfg, 0, 2, video.VIDEO_TRAIN_SEED, 1, 0.0, None, True)
    assert all(" at the " in c for c in captions) and tok.unk_token_id not in ids.tolist()


def test_adherence_on_a_tiny_model(tmp_path):
    small = video.VideoRecipe(frames=2, frame_size=16, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2)
    video.train(tmp_path / "v", minutes=60, max_steps=1, recipe=small)
    res = video.adherence(tmp_path / "v", n=3, batch_size=2)
    assert res["n_captions"] == 3 and res["decoding"] == "ar" and res["step_compression"] == pytest.approx(1.0)
    assert set(res["adherence_heads"]) == set(res["real_heads"]) == set(video.VIDEO_HEADS)
    assert all(0.0 <= v <= 1.0 for v in [*res["adherence_heads"].values(), *res["real_heads"].values()])
    assert res["adherence_mean"] == pytest.approx(sum(res["adherence_heads"].values()) / 6)
    assert set(res["frame_heads"]) == set(video.VIDEO_HEADS[:-1])  # each frame read alone: one accuracy a frame
    assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in res["frame_heads"].values())
    assert not res["caption_positions"] and "position" not in res["adherence_heads"]
    # per video: the fraction of its heads right; their mean is the adherence, the interval holds it
    assert len(res["adherence_per_video"]) == 3 and all(v * 6 == pytest.approx(round(v * 6)) for v in res["adherence_per_video"])
    assert res["adherence_mean"] == pytest.approx(sum(res["adherence_per_video"]) / 3)
    lo, hi = res["adherence_ci"]
    assert lo <= res["adherence_mean"] <= hi
    # the tokenizer's ceiling: the noise-free clips read through the model's own tokenizer
    assert set(res["recon_heads"]) == set(video.VIDEO_HEADS) and res["tokenizer"] == "vq"
    assert all(0.0 <= v <= 1.0 for v in res["recon_heads"].values())
    fast = video.adherence(tmp_path / "v", n=3, batch_size=3, decoding="jacobi", init="temporal", coupled=True, window=8)
    assert fast["step_compression"] > 1.0 and fast["init"] == "temporal" and fast["window"] == 8
    assert fast["real_heads"] == res["real_heads"]  # the same captions
    # a paired comparison of two runs over the same captions and seeds: a run against itself differs by nothing;
    # shifting one video's score by a head moves the difference by that over n
    same = video.paired_difference(res, res)
    assert same["delta"] == 0.0 and same["delta_ci"] == [0.0, 0.0] and same["p"] == 1.0
    better = {**res, "adherence_per_video": [res["adherence_per_video"][0] + 1 / 6, *res["adherence_per_video"][1:]]}
    d = video.paired_difference(better, res)
    assert d["delta"] == pytest.approx(1 / 18) and d["delta_ci"][0] >= 0.0 and d["delta_ci"][1] <= 1 / 6 + 1e-9
    with pytest.raises(ValueError, match="same captions"):
        video.paired_difference(res, {**res, "adherence_per_video": [0.5]})
    # the caption stream depends on the clip layout: runs that asked other captions are compared unpaired
    assert res["captions"] and res["frames"] == 2 and res["frame_size"] == 16
    other = {**better, "captions": ["another caption"] * 3}
    with pytest.raises(ValueError, match="same captions"):
        video.paired_difference(res, other)
    u = video.adherence_difference(better, {**res, "captions": other["captions"]})
    assert not u["paired"] and u["delta"] == pytest.approx(1 / 18) and u["n_captions"] == [3, 3]
    assert u["delta_ci"][0] <= u["delta"] <= u["delta_ci"][1]
    assert video.adherence_difference(better, res)["paired"]
    # runs whose direction heads another reader read (older files record none: reader 1) are not compared
    assert res["reader"] == video.DIRECTION_READER == 2
    unread = {k: v for k, v in res.items() if k != "reader"}
    for f in (video.adherence_difference, video.paired_difference, video.unpaired_difference):
        with pytest.raises(ValueError, match="direction readers 2 and 1"):
            f(better, unread)
    (tmp_path / "old.json").write_text(json.dumps(better))
    cli = video.main(["--out", str(tmp_path / "v"), "--adherence", "3", "--against", str(tmp_path / "old.json")])
    assert cli["against"]["delta"] == pytest.approx(-1 / 18) and cli["against"]["paired"]
    assert json.loads((tmp_path / "v" / "adherence.json").read_text())["against"]["n_captions"] == 3
    png = video.main(["--out", str(tmp_path / "v"), "--samples", str(tmp_path / "grid.png"), "--threads", "1"])
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="zoo.train video --frames 4 --frame-size 64"):  # says how to train one
        video.load_video_model(tmp_path / "absent")


def test_training_batches_weight_the_codes_near_the_moving_object():
    clips = [make_moving_scene(scene_seed(video.VIDEO_TRAIN_SEED, i), 32, 8, 1) for i in range(6)]
    w = video.code_weights(clips, 32, 2.0, 1.3)
    assert w.shape == (6, 8, 64) and set(w.unique().tolist()) == {1.0, 3.0}
    assert ((w > 1).sum(-1) >= 1).all()  # every frame weights the object's codes
    moved = 0
    cells = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).view(64, 2)
    for clip, wi in zip(clips, w):
        m = (wi > 1).float()
        centre = (m @ cells) / m.sum(-1, keepdim=True)  # [F, (row, col)]
        vx, vy = clip.attributes["objects"][0]["velocity"]
        shift = centre[-1] - centre[0]
        assert shift[1] * vx >= 0 and shift[0] * vy >= 0  # never against the motion
        moved += int(shift[1] * vx > 0 or shift[0] * vy > 0)
    assert moved >= 4
    # the first move's object codes weigh more, and only those
    extra = video.code_weights(clips, 32, 2.0, 1.3, first_move=8.0) - w
    assert torch.equal(extra[:, 1] > 0, w[:, 1] > 1) and (extra[:, 1][extra[:, 1] > 0] == 8.0).all()
    assert (extra[:, [0, *range(2, 8)]] == 0).all()
    r = video.VideoRecipe(frames=4)
    tok = video.build_tokenizer()
    cfg = video.build_model(r, len(tok), 1024).config
    ids, target, captions, weights = video.make_batch(tok, hub.load_vq(), cfg, 0, 3, video.VIDEO_TRAIN_SEED, 1, 0.0,
                                                      None, True, 2.0)
    assert weights.shape == ids.shape and (weights[~target] == 1).all() and (weights[target] > 1).any()
    spec = cfg.video_layout
    assert (weights[ids == spec["eof_token_id"]] == 1).all()
    plain = video.make_batch(tok, hub.load_vq(), cfg, 0, 3, video.VIDEO_TRAIN_SEED, 1, 0.0, None, True)[3]
    assert (plain == 1).all()


def test_input_noise_moves_codes_within_their_frame_and_keeps_everything_else():
    r = video.VideoRecipe(frames=3, frame_size=32)
    tok = video.build_tokenizer()
    cfg = video.build_model(r, len(tok), 1024).config
    spec = cfg.video_layout
    # captions of different lengths (one dropped), so the code spans start at different places in the rows
    ids, target, _, _ = video.make_batch(tok, hub.load_vq(), cfg, 0, 4, video.VIDEO_TRAIN_SEED, 2, 0.5,
                                         torch.Generator().manual_seed(1), True)
    assert len({int(t.long().argmax()) for t in target}) > 1
    out = video.corrupt_codes(ids, target, cfg, 0.3, torch.Generator().manual_seed(0), reach=1)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert torch.equal(video.corrupt_codes(ids, target, cfg, 0.0), ids)
    is_code = (ids >= spec["image_token_offset"]) & (ids < spec["image_token_offset"] + spec["codebook_size"])
    changed = out != ids
    assert (changed <= is_code).all() and changed.any()  # EOF, EOI, caption, BOI and padding are kept
    assert 0.1 < changed.sum() / is_code.sum() < 0.3  # at most the rate (a move onto an equal code is no change)
    H, W, span = spec["height"], spec["width"], spec["height"] * spec["width"] + 1
    for i in range(ids.shape[0]):
        s = int(target[i].long().argmax())
        a = ids[i, s : s + spec["frames"] * span].view(spec["frames"], span)[:, :-1].view(-1, H, W)
        b = out[i, s : s + spec["frames"] * span].view(spec["frames"], span)[:, :-1].view(-1, H, W)
        for f, y, x in (b != a).nonzero().tolist():  # every new code is a code of the same frame one cell away
            near = a[f, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
            assert (near == b[f, y, x]).any()


def test_a_run_with_input_noise_trains_on_noisy_inputs_and_true_targets(tmp_path, monkeypatch):
    small = video.VideoRecipe(frames=2, frame_size=16, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2)
    read = []
    real_logits = video._logits

    def spy(model, ids, target, inputs=None):
        read.append((ids, inputs))
        return real_logits(model, ids, target, inputs)

    monkeypatch.setattr(video, "_logits", spy)
    video.train(tmp_path / "v", minutes=60, max_steps=1, recipe=small, ckpt=tmp_path / "s.pt")
    assert read[0][1] is read[0][0]  # off by default: the model reads the true codes
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert "input_noise" not in state["recipe"] and "input_noise_reach" not in state["recipe"]  # old states resume
    read.clear()
    noisy = replace(small, input_noise=0.5)
    video.train(tmp_path / "n", minutes=60, max_steps=1, recipe=noisy, ckpt=tmp_path / "n.pt")
    ids, inputs = read[0]
    assert inputs.shape == ids.shape and (inputs != ids).any()
    assert torch.load(tmp_path / "n.pt", weights_only=False)["recipe"]["input_noise"] == 0.5
    with pytest.raises(ValueError, match="another recipe"):
        video.train(tmp_path / "v", minutes=60, max_steps=2, recipe=noisy, ckpt=tmp_path / "s.pt")


def test_carry_on_starts_from_the_true_first_frame_and_reads_every_frame(tmp_path):
    small = video.VideoRecipe(frames=3, frame_size=16, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2,
                              caption_positions=True)
    video.train(tmp_path / "v", minutes=60, max_steps=1, recipe=small)
    res = video.main(["--out", str(tmp_path / "v"), "--carry-on", "3"])
    assert json.loads((tmp_path / "v" / "carry_on.json").read_text())["frame_heads"] == res["frame_heads"]
    assert set(res["frame_heads"]) == set(video.VIDEO_HEADS[:-1]) and 0.0 <= res["direction"] <= 1.0
    assert all(len(v) == 3 for v in res["frame_heads"].values())
    # frame 0 is the clip's own: read as the reader reads the real noise-free first frames
    cfg = video.load_video_pipeline(tmp_path / "v").model.config
    clips = video.held_out_clips(cfg, 3, clean=True)
    real = torch.stack([image_to_tensor(c.clean) for c in clips])
    vq = hub.load_vq_for(cfg)
    grid = (16 // video.VQ_DOWNSAMPLE,) * 2
    first = hub.decode_tokens(vq, hub.encode_images(vq, real[:, 0]), grid).float().unsqueeze(1)
    want = video.caption_targets([c.caption for c in clips])
    for h, labels in video.read_frames(hub.load_classifier(), first).items():  # decoded in other batches: the last
        # bit of a conv may differ, so one clip on a classifier's borderline may read otherwise
        assert abs(res["frame_heads"][h][0] - float((labels[:, 0] == want[h]).float().mean())) <= 1 / 3 + 1e-6
    # the same clips in batches of another size (left padded to the longest caption); the seed decides the samples
    again = video.carry_on(tmp_path / "v", n=3, batch_size=2)
    assert again["captions"] == res["captions"] and again["frame_heads"].keys() == res["frame_heads"].keys()
    assert abs(again["frame_heads"]["background"][0] - res["frame_heads"]["background"][0]) <= 1 / 3 + 1e-6
    assert video.carry_on(tmp_path / "v", n=2, batch_size=2) == video.carry_on(tmp_path / "v", n=2, batch_size=2)


def test_video_model_starts_from_a_text_to_image_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from mmspec.zoo.recipes import t2i

    t2i.train(tmp_path / "img", role="draft", minutes=60, max_steps=1, threads=1)
    small = video.VideoRecipe(frames=2, frame_size=16, batch_size=2, eval_n=2)
    m = video.train(tmp_path / "v", minutes=60, max_steps=1, recipe=small, init_from=tmp_path / "img", lr=1e-12)
    img = AutoModelForCausalLM.from_pretrained(tmp_path / "img")
    vid = AutoModelForCausalLM.from_pretrained(tmp_path / "v")
    assert m["init_from"] == "img" and vid.config.hidden_size == img.config.hidden_size == 96
    assert vid.config.num_hidden_layers == img.config.num_hidden_layers
    # the video model generates the codes of the image model's tokenizer, and says so in its config
    assert vid.config.zoo_vq == img.config.zoo_vq and "codebook" in vid.config.zoo_vq
    assert vid.config.video_layout["codebook_size"] == img.config.image_layout["codebook_size"]
    keep, eoi = vid.config.boi_token_id + 1, img.config.image_layout["eoi_token_id"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        a, b = img.state_dict()[name], vid.state_dict()[name]
        torch.testing.assert_close(b[:keep], a[:keep], atol=1e-3, rtol=0)
        for i in (vid.config.video_layout["eof_token_id"], vid.config.video_layout["eoi_token_id"]):
            torch.testing.assert_close(b[i], a[eoi], atol=1e-3, rtol=0)
    torch.testing.assert_close(vid.model.layers[0].mlp.up_proj.weight, img.model.layers[0].mlp.up_proj.weight,
                               atol=1e-3, rtol=0)
    other = video.build_model(video.VideoRecipe(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=256), 47, 512)
    with pytest.raises(ValueError, match="other caption words or codes"):
        video.transfer_from_image_model(other, img)


def test_a_model_of_cell_motion_is_asked_its_own_clips_and_old_states_still_resume(tmp_path):
    tok = video.build_tokenizer()
    cfg = video.build_model(video.VideoRecipe(cell_motion=4), len(tok), 1024).config
    assert video.cell_motion(cfg) == 4 and video.cell_motion(video.build_model(video.VideoRecipe(), 47, 8).config) == 0
    clips, plain = video.held_out_clips(cfg, 8), video.held_out_clips(video.build_model(video.VideoRecipe(), 47, 8).config, 8)
    assert [c.caption for c in clips] == [c.caption for c in plain]
    for c in clips:
        ux, uy = DIRECTIONS[c.attributes["objects"][0]["direction"]]
        assert c.attributes["objects"][0]["velocity"] == [4.0 * ux, 4.0 * uy]
    # they move 12 pixels in 4 frames, beyond the generator's usual reach: the reader looks as far as the model moves
    real = torch.stack([image_to_tensor(c.frames) for c in clips + video.held_out_clips(cfg, 32)[8:]])
    want = _directions(clips + video.held_out_clips(cfg, 32)[8:])
    assert video.reader_speed(cfg) > 0.045 == video.reader_speed(video.build_model(video.VideoRecipe(), 47, 8).config)
    assert (video.motion_direction(real, max_speed=video.reader_speed(cfg)) == want).float().mean() >= 0.95
    # the identity of a state saved before the field existed (no "cell_motion") still matches at the default
    small = video.VideoRecipe(frames=2, frame_size=16, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2)
    video.train(tmp_path / "v", minutes=60, max_steps=1, recipe=small, ckpt=tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert "cell_motion" not in state["recipe"]
    video.train(tmp_path / "v", minutes=60, max_steps=2, recipe=small, ckpt=tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=False)["step"] == 2
    with pytest.raises(ValueError, match="another recipe"):
        video.train(tmp_path / "v", minutes=60, max_steps=3, recipe=replace(small, cell_motion=4), ckpt=tmp_path / "s.pt")
    video.train(tmp_path / "c", minutes=60, max_steps=1, recipe=replace(small, cell_motion=4), ckpt=tmp_path / "c.pt")
    assert video.cell_motion(video.load_video_pipeline(tmp_path / "c").model.config) == 4


def test_a_model_of_captions_naming_start_cells_is_asked_and_read_so(tmp_path, capsys):
    small = video.VideoRecipe(frames=2, frame_size=16, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2,
                              caption_positions=True)
    video.train(tmp_path / "v", minutes=60, max_steps=1, recipe=small, ckpt=tmp_path / "s.pt")
    res = video.adherence(tmp_path / "v", n=3, batch_size=3)
    assert res["caption_positions"] and all(" at the " in c for c in res["captions"])
    assert tuple(res["adherence_heads"]) == (*video.VIDEO_HEADS, "position") and "position" in res["real_heads"]
    # the mean and the per-video scores stay over the six heads every caption names: comparable across models
    six = sum(res["adherence_heads"][h] for h in video.VIDEO_HEADS) / 6
    assert res["adherence_mean"] == pytest.approx(six) == pytest.approx(sum(res["adherence_per_video"]) / 3)
    assert all(v * 6 == pytest.approx(round(v * 6)) for v in res["adherence_per_video"])
    # word use: the NLL of the object's codes with the true caption and with its direction / start cell swapped
    use = video.main(["--out", str(tmp_path / "v"), "--word-use", "3"])
    assert set(use) == {"n_clips", "direction", "position"} and use["n_clips"] == 3
    for word in ("direction", "position"):
        true, swapped, gap = (use[word][k] for k in ("true", "swapped", "gap"))
        assert len(true) == len(swapped) == 2 and all(t > 0 for t in true)
        assert gap == pytest.approx([b - a for a, b in zip(true, swapped)])
    assert json.loads((tmp_path / "v" / "word_use.json").read_text())["n_clips"] == 3
    clip = video.held_out_clips(video.load_video_pipeline(tmp_path / "v").model.config, 1)[0]
    for word in ("direction", "position"):
        other = video.swap_word(clip, word)
        got, was = parse_caption(other)["objects"][0], parse_caption(clip.caption)["objects"][0]
        assert got[word] != was[word] and {k: v for k, v in got.items() if k != word} == {
            k: v for k, v in was.items() if k != word}
    with pytest.raises(ValueError, match="direction' or 'position"):
        video.swap_word(clip, "colour")
    # it can be continued in the other caption style (the new model is saved with the style it learns)
    video.train(tmp_path / "w", minutes=60, max_steps=1, recipe=replace(small, caption_positions=False),
                init_from=tmp_path / "v")
    assert "start; these do not" in capsys.readouterr().out
    assert not video.caption_positions(video.load_video_pipeline(tmp_path / "w").model.config)
    # a training state is read in place of the saved weights (a run's progress), its adherence written beside it
    state = torch.load(tmp_path / "s.pt", weights_only=False)["model"]
    pipe = video.load_video_pipeline(tmp_path / "v", state=tmp_path / "s.pt")
    assert all(torch.equal(pipe.model.state_dict()[k], v) for k, v in state.items())
    got = video.main(["--out", str(tmp_path / "v"), "--adherence", "2", "--state", str(tmp_path / "s.pt")])
    assert got["state"] == str(tmp_path / "s.pt") and got["caption_positions"]
    assert json.loads((tmp_path / "s.pt.adherence.json").read_text())["n_captions"] == 2
    bigger = video.VideoRecipe(frames=2, frame_size=16, hidden=48, intermediate=64, layers=1, batch_size=2, eval_n=2)
    video.train(tmp_path / "b", minutes=60, max_steps=1, recipe=bigger, ckpt=tmp_path / "b.pt")
    with pytest.raises(ValueError, match="is not of a model like"):
        video.load_video_pipeline(tmp_path / "v", state=tmp_path / "b.pt")
