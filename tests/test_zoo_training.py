"""Zoo training machinery: resumable checkpoints, loss curves, object-weighted losses (tiny, step-limited runs)."""

import json
from dataclasses import replace

import pytest
import torch

from mmspec.zoo.recipes.common import Budget, Checkpoint, scene_batch


def _tiny_vq(**kw):
    from mmspec.zoo.recipes.vq import VQRecipe

    return VQRecipe(block_out_channels=(8, 16, 16), latent_channels=4, vq_embed_dim=4, num_codes=64, norm_num_groups=4,
                    kmeans_crops=32, eval_n=4, **kw)


def test_budget_counts_resumed_time():
    b = Budget(1.0, elapsed_s=45.0)
    assert 0.74 < b.progress(0) < 0.8 and not b.done(0)
    assert Budget(1.0, elapsed_s=61.0).done(0)


def test_checkpoint_roundtrip_and_disabled(tmp_path):
    ck = Checkpoint(tmp_path / "a" / "s.pt", every_s=0.0)
    assert ck.load() is None and ck.due()
    ck.save({"step": 3, "w": torch.arange(4)})
    got = ck.load()
    assert got["step"] == 3 and torch.equal(got["w"], torch.arange(4))
    assert not (tmp_path / "a" / "s.pt.tmp").exists()
    off = Checkpoint(None)
    off.save({"x": 1})
    assert off.load() is None and not off.due()


def test_object_weights_cover_objects_only():
    from mmspec.zoo.recipes.vq import object_weights

    x, scenes = scene_batch(0, 3, 0, 2)
    w = object_weights(scenes, 64, 4.0, 1.3)
    assert w.shape == (3, 1, 64, 64) and set(w.unique().tolist()) <= {1.0, 5.0}
    for i, sc in enumerate(scenes):
        for o in sc.attributes["objects"]:
            cx, cy = o["center"]
            assert w[i, 0, int(cy), int(cx)] == 5.0  # the centre pixel of every object is up-weighted
        assert 0.0 < float((w[i] > 1).float().mean()) < 0.5  # and most of the background is not
    assert torch.equal(object_weights(scenes, 64, 0.0, 1.3), torch.ones(3, 1, 64, 64))


def test_vq_run_resumes_from_checkpoint(tmp_path):
    from mmspec.zoo.recipes import vq

    ck = tmp_path / "vq.pt"
    first = vq.train(tmp_path / "a", minutes=60, max_steps=2, recipe=_tiny_vq(), threads=1, ckpt=ck)
    assert first["steps"] == 2 and ck.is_file() and (tmp_path / "a" / "loss_curve.png").is_file()
    # a longer budget with the same checkpoint continues at step 2 (images already seen are counted)
    second = vq.train(tmp_path / "b", minutes=60, max_steps=4, recipe=_tiny_vq(), threads=1, ckpt=ck)
    assert second["steps"] == 4 and second["images_seen"] > first["images_seen"]
    assert "classifier_on_reconstructions" in second["heldout"]
    assert set(second["heldout"]["classifier_on_reconstructions"]) == {
        f"{n}_{t}" for n in ("one_object", "two_object") for t in ("original", "reconstruction")}
    with pytest.raises(ValueError, match="another recipe"):
        vq.train(tmp_path / "c", minutes=60, max_steps=5, recipe=_tiny_vq(object_weight=1.0), threads=1, ckpt=ck)


def test_vq_decoder_only_keeps_every_code(tmp_path):
    from mmspec.zoo import hub
    from mmspec.zoo.recipes import vq
    from mmspec.zoo.recipes.common import scene_batch

    vq.train(tmp_path / "a", minutes=60, max_steps=2, recipe=_tiny_vq(), threads=1)
    with pytest.raises(ValueError, match="pass init_from"):
        vq.train(tmp_path / "x", minutes=60, max_steps=1, recipe=_tiny_vq(), threads=1, decoder_only=True)
    m = vq.train(tmp_path / "b", minutes=60, max_steps=3, recipe=_tiny_vq(), threads=1, decoder_only=True,
                 init_from=tmp_path / "a")
    assert m["recipe"]["decoder_only"] and m["steps"] == 3
    a, b = hub.load_vq(tmp_path / "a"), hub.load_vq(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    upstream = [k for k in sa if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert upstream and all(torch.equal(sa[k], sb[k]) for k in upstream)  # bit for bit
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))  # the decoder trained
    x, _ = scene_batch(0, 4, 12345, 2)
    codes = hub.encode_images(a, x)
    assert torch.equal(codes, hub.encode_images(b, x))
    assert not torch.equal(hub.decode_tokens(a, codes), hub.decode_tokens(b, codes))


def test_vq_perceptual_loss_and_its_guard(tmp_path):
    from mmspec.zoo import hub
    from mmspec.zoo.recipes import vq

    aux = hub.SceneClassifier(channels=(8, 8, 16), head_channels=8, cell_dim=8, global_dim=8).eval()
    aux.save_pretrained(tmp_path / "aux")
    clf = vq.perceptual_net(tmp_path / "aux")
    assert not any(p.requires_grad for p in clf.parameters())
    with pytest.raises(ValueError, match="evaluation classifier"):
        vq.perceptual_net(hub.weights_path("classifier"))
    x, _ = scene_batch(0, 2, 0, 2)
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = vq.perceptual_loss(clf, y, x)
    assert float(vq.perceptual_loss(clf, x, x)) < 1e-10 < float(d.detach())
    d.backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0  # differentiable in the reconstruction
    # a decoder-only run with it: the loss is logged on its (whole-image) steps, every code stays
    vq.train(tmp_path / "a", minutes=60, max_steps=1, recipe=_tiny_vq(), threads=1)
    with pytest.raises(ValueError, match="perceptual_from"):
        vq.train(tmp_path / "x", minutes=60, max_steps=1, recipe=_tiny_vq(perceptual_weight=1.0), threads=1)
    r = _tiny_vq(perceptual_weight=1.0, perceptual_from=str(tmp_path / "aux"), full_phase=1.0)
    m = vq.train(tmp_path / "b", minutes=60, max_steps=2, recipe=r, threads=1, decoder_only=True, init_from=tmp_path / "a")
    assert m["final_train_losses_ema"]["perceptual"] > 0 and m["recipe"]["perceptual_from"] == str(tmp_path / "aux")


def test_vq_denoise_stream_targets_the_noise_free_render():
    from mmspec.zoo.data import image_to_tensor
    from mmspec.zoo.recipes.vq import _Stream

    for denoise in (True, False):
        b = _Stream(_tiny_vq(denoise=denoise, scene_fraction=0.75)).batch(4)  # 3 scenes, 1 natural crop
        assert b.shape == (4, 7, 64, 64)
        x, scenes = scene_batch(0, 3, 0, 3, clean=True)
        clean = torch.stack([image_to_tensor(s.clean) for s in scenes])
        # the input is the noisy image, or with denoise (every other scene) the noise-free render: the t2i models' codes
        assert torch.equal(b[:3, :3], torch.stack([clean[0], x[1], clean[2]]) if denoise else x)
        assert torch.equal(b[:3, 3:6], clean if denoise else x)
        assert torch.equal(b[3, 3:6], b[3, :3])  # natural crops are reconstructed as they are
    assert float((b[:3, 6] > 1).float().mean()) > 0  # the object weights ride along


def test_vq_init_from_a_saved_tokenizer(tmp_path):
    from mmspec.zoo import hub
    from mmspec.zoo.recipes import vq

    vq.train(tmp_path / "a", minutes=60, max_steps=1, recipe=_tiny_vq(), threads=1, seed=1)  # another initialisation
    start = hub.load_vq(tmp_path / "a")
    m = vq.train(tmp_path / "b", minutes=60, max_steps=1, recipe=_tiny_vq(lr=1e-12, warmup_steps=1), threads=1,
                 init_from=tmp_path / "a")
    assert m["init_from"] == "a" and m["steps"] == 1
    after = hub.load_vq(tmp_path / "b")
    # a vanishing learning rate keeps the encoder; the codebook moves only by its EMA update
    torch.testing.assert_close(after.encoder.conv_in.weight, start.encoder.conv_in.weight, atol=1e-3, rtol=0)
    vq.train(tmp_path / "n", minutes=60, max_steps=1, recipe=_tiny_vq(lr=1e-12, warmup_steps=1), threads=1)
    fresh = hub.load_vq(tmp_path / "n")  # the same run without init_from
    assert not torch.allclose(fresh.encoder.conv_in.weight, start.encoder.conv_in.weight, atol=1e-3)
    with pytest.raises(ValueError, match="architecture"):
        vq.train(tmp_path / "c", minutes=60, max_steps=1, recipe=replace(_tiny_vq(), num_codes=32), threads=1,
                 init_from=tmp_path / "a")


def test_t2i_object_weighted_batch_and_loss():
    from mmspec.zoo import hub
    from mmspec.zoo.recipes import t2i

    tok = t2i.build_tokenizer()
    vqm = hub.load_vq()
    model = t2i.build_model(t2i.PRESETS["draft"], len(tok), 1024)
    ids, target, caps, w = t2i.make_batch(tok, vqm, model.config, 0, 3, 0, 2, 0.0, None, object_weight=2.0)
    assert w.shape == ids.shape and set(w.unique().tolist()) == {1.0, 3.0}
    assert bool((w[~target] == 1).all())  # prompt tokens are never weighted (they are not targets)
    heavy = (w == 3.0).sum(1)
    assert bool((heavy > 0).all()) and bool((heavy < 128).all())
    with torch.no_grad():
        plain = t2i._loss(model, ids, target)
        assert torch.allclose(t2i._loss(model, ids, target, torch.ones_like(w)), plain, atol=1e-5)
        # the weighted loss is the w-weighted mean of the per-token cross-entropies
        logits = model(input_ids=ids, attention_mask=(ids != 0) | target).logits[:, :-1]
        tgt = target[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[tgt].float(), ids[:, 1:][tgt], reduction="none")
        ww = w[:, 1:][tgt]
        assert torch.allclose(t2i._loss(model, ids, target, w), (ce * ww).sum() / ww.sum(), atol=1e-5)
        one = torch.zeros_like(w)
        one[0, int(target[0].nonzero()[5])] = 1.0  # all weight on one token: its own cross-entropy
        assert torch.allclose(t2i._loss(model, ids, target, one), ce[5], atol=1e-5)


def test_t2i_cli_checkpoint_resume(tmp_path):
    from mmspec.zoo.train import main

    ck = str(tmp_path / "t2i.pt")
    args = ["t2i_draft", "--minutes", "60", "--threads", "1", "--out", str(tmp_path / "d"), "--ckpt", ck]
    assert main(args + ["--max-steps", "1"])["steps"] == 1
    again = main(args + ["--max-steps", "2"])
    assert again["steps"] == 2 and again["images_seen"] == 2 * 32
    saved = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert saved["steps"] == 2 and (tmp_path / "d" / "loss_curve.png").is_file()


def test_c2i_cli_checkpoint_resume(tmp_path):
    from mmspec.zoo.train import main

    ck = str(tmp_path / "c2i.pt")
    args = ["c2i", "--minutes", "60", "--threads", "1", "--out", str(tmp_path / "c"), "--ckpt", ck, "--eval-n", "8"]
    assert main(args + ["--max-steps", "1"])["steps"] == 1
    again = main(args + ["--max-steps", "2"])
    assert again["steps"] == 2 and again["images_seen"] == 2 * 32
    assert (tmp_path / "c" / "loss_curve.png").is_file()
    from mmspec.zoo import hub

    other = hub.load_vq(hub.weights_path(hub.DEFAULT_VQ))
    with torch.no_grad():
        other.quantize.embedding.weight.add_(0.5)
    other.save_pretrained(tmp_path / "other_vq")
    with pytest.raises(ValueError, match="another"):  # a state saved for another codebook is not resumed
        main(args + ["--max-steps", "3", "--vq", str(tmp_path / "other_vq")])


def test_video_cli_checkpoint_resume(tmp_path):
    from mmspec.zoo.train import main

    args = ["video", "--minutes", "60", "--threads", "1", "--out", str(tmp_path / "v"), "--ckpt",
            str(tmp_path / "v.pt")]
    assert main(args + ["--max-steps", "1"])["steps"] == 1
    again = main(args + ["--max-steps", "2"])
    assert again["steps"] == 2 and again["clips_seen"] == 2 * 4
    assert (tmp_path / "v" / "loss_curve.png").is_file()


def test_video_cli_init_from_a_saved_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from mmspec.zoo.recipes.video import VideoRecipe, train
    from mmspec.zoo.train import main

    small = VideoRecipe(frames=2, frame_size=8, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2)
    train(tmp_path / "a", minutes=60, seed=1, max_steps=1, recipe=small)
    m = train(tmp_path / "b", minutes=60, seed=2, max_steps=1, recipe=small, init_from=tmp_path / "a", lr=1e-12)
    assert m["init_from"] == "a" and m["recipe"]["lr"] == 1e-12
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in ("a", "b"))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-3, rtol=0, msg=name)  # a vanishing lr keeps the weights
    with pytest.raises(ValueError, match="not a video model"):  # the default recipe is another architecture
        main(["video", "--minutes", "60", "--max-steps", "1", "--threads", "1", "--out", str(tmp_path / "c"),
              "--init-from", str(tmp_path / "a"), "--lr", "1e-4"])


def test_t2i_init_from_a_saved_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from mmspec.zoo.recipes import t2i

    t2i.train(tmp_path / "a", role="draft", minutes=60, max_steps=1, threads=1, seed=1)  # another initialisation
    m = t2i.train(tmp_path / "b", role="draft", minutes=60, max_steps=1, threads=1, init_from=tmp_path / "a", lr=1e-12)
    assert m["init_from"] == "a" and m["recipe"]["lr"] == 1e-12
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in ("a", "b"))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-3, rtol=0, msg=name)  # a vanishing lr keeps the weights
    t2i.train(tmp_path / "c", role="draft", minutes=60, max_steps=1, threads=1)  # b without init_from
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "c").lm_head.weight, a.lm_head.weight)
    with pytest.raises(ValueError, match="not a target model"):
        t2i.train(tmp_path / "d", role="target", minutes=60, max_steps=1, threads=1, init_from=tmp_path / "a")


def test_t2i_noise_free_batch_codes_the_clean_render():
    from mmspec.zoo import hub
    from mmspec.zoo.data import image_to_tensor
    from mmspec.zoo.recipes import t2i

    tok = t2i.build_tokenizer()
    vqm = hub.load_vq()
    cfg = t2i.build_model(t2i.PRESETS["draft"], len(tok), 1024).config
    noisy, target, caps = t2i.make_batch(tok, vqm, cfg, 0, 2, 0, 2, 0.0, None)
    clean, target2, caps2 = t2i.make_batch(tok, vqm, cfg, 0, 2, 0, 2, 0.0, None, noise_free=True)
    assert caps == caps2 and torch.equal(target, target2)
    _, scenes = scene_batch(0, 2, 0, 2, clean=True)
    codes = hub.encode_images(vqm, torch.stack([image_to_tensor(s.clean) for s in scenes]))
    offset = cfg.image_layout["image_token_offset"]
    for i in range(2):
        span = clean[i][target[i]][:-1] - offset  # the 256 codes (EOI last)
        assert torch.equal(span, codes[i])
    # the sensor noise changes many codes of the same scene
    assert 0.2 < float((noisy[target] != clean[target]).float().mean()) < 0.95


def test_captioner_checkpoint_resume(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from mmspec.zoo.recipes import captioner

    monkeypatch.setattr(captioner, "evaluate", lambda *a, **k: {})  # the held-out evaluation is tested below
    ck = tmp_path / "cap.pt"
    captioner.train(tmp_path / "a", role="draft", minutes=60, max_steps=2, ckpt=ck)
    state = torch.load(ck, weights_only=False)
    assert state["step"] == 2 and all(v["step"] == 2 for v in state["opt"]["state"].values())
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "a")
    for name, p in saved.named_parameters():  # the checkpoint holds the trained weights (fp16 on disk)
        torch.testing.assert_close(p.float(), state["model"][name].float(), atol=1e-3, rtol=1e-3, msg=name)
    resumed = captioner.train(tmp_path / "b", role="draft", minutes=60, max_steps=3, ckpt=ck)
    state = torch.load(ck, weights_only=False)  # the optimiser went on from step 2, the pool was rebuilt
    assert resumed["steps"] == 3 and all(v["step"] == 3 for v in state["opt"]["state"].values())
    assert resumed["distinct_training_scenes"] == 1024 + 3 * 6
    assert [h["step"] for h in state["history"]][-1] == 3 and (tmp_path / "b" / "loss_curve.png").is_file()
    with pytest.raises(ValueError, match="another role or recipe"):
        captioner.train(tmp_path / "d", role="target", minutes=60, max_steps=4, ckpt=ck)


def test_captioner_evaluation_reads_the_first_object():
    from mmspec.zoo.recipes import captioner
    from mmspec.zoo.recipes.captioner import load_caption_pipeline

    pipe = load_caption_pipeline(with_draft=False)
    metrics = captioner.evaluate(pipe.model, pipe.processor, n=8, batch_size=8)
    for k in captioner.OBJECT_FIELDS:
        assert 0.0 <= metrics[f"object_{k}_accuracy"] <= 1.0
    assert metrics["well_formed"] > 0.5


def test_zoo_train_forwards_resume_flags_to_the_captioner(monkeypatch, capsys):
    from mmspec.zoo import train
    from mmspec.zoo.recipes import captioner

    real_main, seen = captioner.main, []
    monkeypatch.setattr(captioner, "main", lambda argv: seen.append(argv))
    train.main(["captioner", "--ckpt", "c.pt", "--init-from", "old", "--lr", "0.001", "--minutes", "5"])
    argv = seen[0]
    assert argv[0] == "target" and argv[argv.index("--ckpt") + 1] == "c.pt"
    assert argv[argv.index("--init-from") + 1] == "old" and float(argv[argv.index("--lr") + 1]) == 0.001
    argv[argv.index("--minutes") + 1] = "0"
    with pytest.raises(SystemExit):  # the recipe's own parser takes every flag (then refuses the budget)
        real_main(argv)
    assert "--minutes must be > 0" in capsys.readouterr().err


def test_zoo_train_forwards_the_frame_layout_to_the_video_recipe(monkeypatch, capsys):
    from mmspec.zoo import train
    from mmspec.zoo.recipes import video

    real_main, seen = video.main, []
    monkeypatch.setattr(video, "main", lambda argv: seen.append(argv))
    train.main(["video", "--frames", "4", "--frame-size", "64", "--vq", "tok", "--minutes", "5", "--device", "cuda",
                "--workers", "2", "--batch-size", "32", "--caption-positions", "--cell-motion", "4",
                "--first-move-weight", "8", "--input-noise", "0.1"])
    argv = seen[0]
    assert float(argv[argv.index("--input-noise") + 1]) == 0.1
    assert argv.count("--caption-positions") == 1 and argv[argv.index("--cell-motion") + 1] == "4"
    assert float(argv[argv.index("--first-move-weight") + 1]) == 8.0
    assert argv[argv.index("--frames") + 1] == "4" and argv[argv.index("--frame-size") + 1] == "64"
    assert [argv[argv.index(f) + 1] for f in ("--device", "--workers", "--batch-size")] == ["cuda", "2", "32"]
    assert argv[argv.index("--vq") + 1] == "tok"
    argv[argv.index("--frames") + 1] = "1"
    with pytest.raises(SystemExit):  # the recipe's own parser takes the flags (then refuses one frame)
        real_main(argv)
    assert "--frames must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["c2i", "--frames", "4"])
    assert "apply to video only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["t2i_target", "--caption-positions"])
    assert "apply to video only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["t2i_target", "--cell-motion", "4"])
    assert "apply to video only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["c2i", "--first-move-weight", "4"])
    assert "apply to video only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["t2i_target", "--input-noise", "0.1"])
    assert "apply to video only" in capsys.readouterr().err


def test_text_early_exit_training_resumes_and_reports_agreement(tmp_path, monkeypatch):
    """The text recipe trains early exits (LayerSkip), resumes from its checkpoint and reports exit agreement."""
    from mmspec.zoo.models import TEXT_TARGET, _folder
    from mmspec.zoo.recipes import text_lm
    from mmspec.zoo.train import main

    tiny = text_lm.TextRecipe(hidden=32, layers=3, heads=2, kv_heads=1, intermediate=64, seq_len=16, batch_size=2,
                              corpus_chars=40_000, eval_batches=1, exit_layers=(1, 2), exit_weight=0.3)
    monkeypatch.setitem(text_lm.PRESETS, "target", tiny)
    model = text_lm.build_model(tiny, __import__("transformers").AutoTokenizer.from_pretrained(_folder(TEXT_TARGET)))
    x = torch.randint(0, 4000, (2, 17))
    loss, parts = text_lm.training_loss(model, x, tiny)
    plain, _ = text_lm.training_loss(model, x, replace(tiny, exit_layers=()))
    assert set(parts) == {"last", "exit1", "exit2"} and loss.item() > plain.item() == pytest.approx(parts["last"])
    loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0

    ck = str(tmp_path / "text.pt")
    args = ["text_target", "--minutes", "60", "--threads", "1", "--out", str(tmp_path / "t"), "--ckpt", ck,
            "--tokenizer", str(_folder(TEXT_TARGET))]
    assert main(args + ["--max-steps", "1"])["steps"] == 1
    again = main(args + ["--max-steps", "2"])
    assert again["steps"] == 2 and again["tokens_seen"] == 2 * 2 * 16
    assert set(again["heldout_exit_agreement"]) == {"exit1", "exit2"}
    assert all(0.0 <= a <= 1.0 for a in again["heldout_exit_agreement"].values())
    assert (tmp_path / "t" / "loss_curve.png").is_file() and (tmp_path / "t" / "tokenizer.json").is_file()


def test_mar_vae_and_target_resume_from_checkpoints(tmp_path, monkeypatch):
    """The continuous-token recipes are resumable (--ckpt) and draw a loss curve, through `zoo.train`."""
    from mmspec.zoo.recipes import mar
    from mmspec.zoo.train import main

    default = mar.VAERecipe()
    monkeypatch.setattr(mar, "VAERecipe", lambda: replace(default, batch_size=2, eval_n=4))
    vae_args = ["mar_vae", "--minutes", "60", "--threads", "1", "--out", str(tmp_path / "vae"), "--ckpt",
                str(tmp_path / "vae.pt")]
    assert main(vae_args + ["--max-steps", "1"])["steps"] == 1
    again = main(vae_args + ["--max-steps", "2"])
    assert again["steps"] == 2 and again["images_seen"] == 4 and (tmp_path / "vae" / "loss_curve.png").is_file()

    monkeypatch.setitem(mar.PRESETS, "draft", replace(mar.PRESETS["draft"], train_images=6, batch_size=4, eval_n=4))
    args = ["draft", "--minutes", "60", "--threads", "1", "--out", str(tmp_path / "d"), "--ckpt", str(tmp_path / "d.pt"),
            "--vae", str(tmp_path / "vae")]
    assert mar.main(args + ["--max-steps", "1"])["steps"] == 1
    again = mar.main(args + ["--max-steps", "3"])  # 12 images: the second epoch starts inside a batch
    assert again["steps"] == 3 and again["epochs"] == pytest.approx(10 / 6)
    assert (tmp_path / "d" / "loss_curve.png").is_file()


def _tiny_mar(seed, **kw):
    from mmspec.models.mar import ContinuousARModel

    torch.manual_seed(seed)
    cfg = dict(token_dim=4, grid_size=2, num_classes=3, hidden_size=16, num_layers=1, num_heads=2, head_width=16,
               head_depth=1)
    model = ContinuousARModel(**{**cfg, **kw}).eval()
    for p in model.head.parameters():  # the adaLN-zero head starts as zero: give it something to predict
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_mar_distillation_loss_and_expected_acceptance():
    """A copy of the teacher has zero distillation loss and acceptance 1; another model has neither, and only the
    student gets gradients."""
    from mmspec.zoo.recipes.mar import distill_loss, expected_acceptance

    teacher, other = _tiny_mar(0), _tiny_mar(1)
    copy = _tiny_mar(7)
    copy.load_state_dict(teacher.state_dict())
    tokens, labels = torch.randn(5, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    g = torch.Generator().manual_seed(0)
    assert distill_loss(copy, teacher, tokens, labels, g).item() < 1e-10
    loss = distill_loss(other, teacher, tokens, labels, torch.Generator().manual_seed(0))
    assert loss.item() > 1e-3
    loss.backward()
    assert other.head.out.weight.grad.abs().sum() > 0 and other.blocks[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert expected_acceptance(copy, teacher, tokens, labels, steps=4) == pytest.approx(1.0)
    acc = expected_acceptance(other, teacher, tokens, labels, steps=4)
    assert 0.0 <= acc < 0.99
    # a closer draft (the teacher with slightly perturbed head) is accepted more often
    near = _tiny_mar(7)
    near.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        near.head.out.bias.add_(0.02)
    assert acc < expected_acceptance(near, teacher, tokens, labels, steps=4) < 1.0


def test_mar_draft_distillation_run(tmp_path, monkeypatch):
    """`mar_draft --distill-from T --on-policy N --init-from D` runs through `zoo.train`, samples the teacher and
    reports the expected acceptance before and after; a bad combination is refused."""
    from mmspec.zoo.recipes import mar
    from mmspec.zoo.train import main

    default = mar.VAERecipe()
    monkeypatch.setattr(mar, "VAERecipe", lambda: replace(default, batch_size=2, eval_n=4))
    vae = str(tmp_path / "vae")
    mar.main(["vae", "--max-steps", "1", "--out", vae])
    monkeypatch.setitem(mar.PRESETS, "draft", replace(mar.PRESETS["draft"], train_images=6, batch_size=4, eval_n=4))
    monkeypatch.setitem(mar.PRESETS, "target", replace(mar.PRESETS["target"], hidden=32, layers=1, heads=2,
                                                       head_width=32, head_depth=1, train_images=6, batch_size=4,
                                                       eval_n=4))
    mar.main(["target", "--max-steps", "1", "--out", str(tmp_path / "t"), "--vae", vae])
    mar.main(["draft", "--max-steps", "1", "--out", str(tmp_path / "d"), "--vae", vae])
    _tiny_mar(0, grid_size=3).save_pretrained(tmp_path / "big")  # 9 tokens: not this autoencoder's 8x8 grid
    monkeypatch.setattr(mar, "teacher_samples", _fake_samples(mar.teacher_samples))
    monkeypatch.setattr(mar, "_acceptances", lambda *a: {"data_steps10": 0.5})
    with pytest.raises(SystemExit):
        mar.main(["target", "--max-steps", "1", "--out", str(tmp_path / "x"), "--distill-from", str(tmp_path / "t")])
    with pytest.raises(SystemExit):  # samples of which target?
        mar.main(["draft", "--max-steps", "1", "--out", str(tmp_path / "x"), "--on-policy", "4"])
    with pytest.raises(SystemExit):  # a share is t2i_draft's meaning; mar_draft counts samples
        main(["mar_draft", "--out", str(tmp_path / "x"), "--distill-from", str(tmp_path / "t"), "--on-policy", "0.5"])
    with pytest.raises(ValueError, match="takes"):  # a model over another token grid
        mar.main(["target", "--max-steps", "1", "--out", str(tmp_path / "x"), "--vae", vae, "--init-from",
                  str(tmp_path / "big")])
    # zoo.train forwards to the recipe, whose --vae default is the bundled one: point the recipe at the tiny one
    monkeypatch.setattr(mar, "train_mar", _with_vae(mar.train_mar, vae))
    got = main(["mar_draft", "--max-steps", "2", "--out", str(tmp_path / "kd"), "--init-from", str(tmp_path / "d"),
                "--distill-from", str(tmp_path / "t"), "--on-policy", "3", "--lr", "1e-3"])
    assert got["steps"] == 2 and got["distill"]["on_policy"] == 3 and got["recipe"]["lr"] == 1e-3
    assert got["distill"]["expected_acceptance"] == {"data_steps10": 0.5} and got["init_from"] == str(tmp_path / "d")
    assert (tmp_path / "kd" / "loss_curve.png").is_file()


def _fake_samples(real):
    def sample(teacher, vae, n, guidance=3.0, steps=25, seed=0, batch_size=128):
        return real(teacher, vae, n, guidance, 2, seed, batch_size)  # 2 head steps: fast, same code path
    return sample


def _with_vae(train_mar, vae):
    def wrapped(out, role, minutes, seed, max_steps, threads, vae_path=None, **kw):
        return train_mar(out, role, minutes, seed, max_steps, threads, vae, **kw)
    return wrapped


def test_vq_cli_codebook_size_and_code_dim(tmp_path):
    import json

    from mmspec.zoo import hub
    from mmspec.zoo.train import main

    main(["vq", "--minutes", "60", "--max-steps", "2", "--threads", "1", "--eval-n", "2", "--num-codes", "2048",
          "--code-dim", "4", "--out", str(tmp_path / "q")])
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert m["recipe"]["num_codes"] == 2048 and m["recipe"]["vq_embed_dim"] == 4 and m["recipe"]["kmeans_crops"] == 512
    assert tuple(hub.codebook(hub.load_vq(tmp_path / "q")).shape) == (2048, 4)


def test_vq_loader_workers_serve_the_same_stream():
    """Batches rendered ahead by loader processes are the images the training process would render itself, in
    order, across a change of batch size (the whole-image phase); a one-off batch (the k-means fit) does not move
    the stream."""
    from mmspec.zoo.recipes.vq import _Stream

    r = _tiny_vq(scene_fraction=0.75)
    plain, ahead = _Stream(r), _Stream(r, workers=2)
    fit = ahead.batch(8, ahead=False)
    assert (ahead.i_scene, ahead.i_crop) == (0, 0) and torch.equal(fit, _Stream(r).batch(8))
    for n in (4, 4, 8, 4):
        assert torch.equal(ahead.batch(n), plain.batch(n))
    assert (ahead.i_scene, ahead.i_crop) == (plain.i_scene, plain.i_crop) == (15, 5)


def _assert_same_weights(a, b):
    """Two saved causal LMs hold bit-identical parameters (the same batches, in the same order, by construction)."""
    from transformers import AutoModelForCausalLM

    ma, mb = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b))
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), name


def test_vq_cli_device_workers_batch_size(tmp_path):
    from mmspec.zoo.train import main

    main(["vq", "--minutes", "60", "--max-steps", "3", "--threads", "1", "--eval-n", "2", "--workers", "1",
          "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "q")])
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert (m["recipe"]["batch_size"], m["recipe"]["full_batch_size"], m["workers"], m["device"]) == (4, 2, 1, "cpu")
    with pytest.raises(SystemExit):  # the other recipes train on the CPU, in-process
        main(["c2i", "--minutes", "1", "--workers", "2", "--out", str(tmp_path / "t")])


@pytest.mark.slow
def test_t2i_loader_workers_train_the_same_model(tmp_path):
    """Scenes rendered ahead by a loader process (the GPU path) train the very model the in-process path does: same
    batches, same caption dropout, same steps."""

    from mmspec.zoo.recipes import t2i

    kw = dict(role="draft", minutes=60, max_steps=2, threads=1, seed=3, batch_size=4)
    a = t2i.train(tmp_path / "a", **kw)
    b = t2i.train(tmp_path / "b", workers=1, device="cpu", **kw)
    assert (a["images_seen"], b["images_seen"], b["workers"], b["device"], b["recipe"]["batch_size"]) == (8, 8, 1, "cpu", 4)
    _assert_same_weights(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match="CPU only"):
        t2i.train(tmp_path / "c", device="meta", distill_from=tmp_path / "a", **kw)


def test_video_loader_workers_train_the_same_model(tmp_path):
    """The video recipe's GPU path: clips rendered ahead by a loader process train the very model the in-process
    path does; ``--batch-size`` sets the clips per step; the metrics say where it trained."""

    from mmspec.zoo.recipes import video

    small = video.VideoRecipe(frames=2, frame_size=16, hidden=32, intermediate=64, layers=1, batch_size=2, eval_n=2)
    kw = dict(minutes=60, max_steps=2, threads=1, seed=3, recipe=small, batch_size=3)
    a = video.train(tmp_path / "a", **kw)
    b = video.train(tmp_path / "b", workers=1, device="cpu", **kw)
    assert (a["clips_seen"], b["clips_seen"], b["workers"], b["device"], b["recipe"]["batch_size"]) == (6, 6, 1, "cpu", 3)
    _assert_same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_t2i_transfer_to_new_codes(tmp_path):
    """A target over one tokenizer's codes starts another over a new tokenizer's: with the identity mapping it is
    the same model (a tied one takes the LM head's rows); code_map of a tokenizer onto itself is the identity on the
    codes it sees; through train(), --init-from over another codebook maps the codes of the tokenizer its config
    names (or --init-vq, which must be the one it was trained on), and the result names its own tokenizer."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from mmspec.zoo import hub
    from mmspec.zoo.recipes import t2i

    vqm = hub.load_vq()
    tok = t2i.build_tokenizer()
    untied = replace(t2i.PRESETS["draft"], tie_embeddings=False)
    old = t2i.build_model(untied, len(tok), 1024).eval()
    hub.tag_vq(old.config, vqm, None)
    old.save_pretrained(tmp_path / "old")
    new = t2i.build_model(untied, len(tok), 1024).eval()
    t2i.transfer_to_new_codes(new, old, torch.eye(1024))
    ids = torch.randint(0, old.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=ids).logits, old(input_ids=ids).logits)
    tied = t2i.build_model(t2i.PRESETS["draft"], len(tok), 1024)
    assert tied.config.tie_word_embeddings
    t2i.transfer_to_new_codes(tied, old, torch.eye(1024))
    assert torch.equal(tied.model.embed_tokens.weight, old.lm_head.weight)
    assert torch.equal(tied.lm_head.weight, old.lm_head.weight)
    p = t2i.code_map(vqm, vqm, n=64)
    assert p.shape == (1024, 1024) and torch.allclose(p.sum(1), torch.ones(1024))
    seen = p.diagonal() > 0.5
    assert int(seen.sum()) > 100 and bool((p.argmax(1)[seen] == torch.arange(1024)[seen]).all())
    with pytest.raises(ValueError, match="mapping"):
        t2i.transfer_to_new_codes(new, old, torch.eye(4096))
    # the 4,096-code tokenizer: the old draft's codes (its config names the 1,024-code tokenizer) are mapped onto it
    m = t2i.train(tmp_path / "d", role="draft", minutes=60, max_steps=1, threads=1, batch_size=2,
                  vq_path=str(hub.weights_path("vq4096")), init_from=tmp_path / "old")
    assert m["init_from"] == "old"
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "d").config
    assert cfg.image_layout["codebook_size"] == 4096 and cfg.tie_word_embeddings
    assert cfg.zoo_vq["name"] == "vq4096" and hub.codebook(hub.load_vq_for(cfg)).shape[0] == 4096
    with pytest.raises(ValueError, match="not trained on"):
        t2i.train(tmp_path / "e", role="draft", minutes=60, max_steps=1, threads=1, batch_size=2,
                  vq_path=str(hub.weights_path("vq4096")), init_from=tmp_path / "old",
                  init_vq=str(hub.weights_path("vq4096")))


def test_c2i_transfer_to_new_codes(tmp_path):
    """A c2i model over one tokenizer's codes starts one over another's: with the identity mapping it is the same
    model; code_map of a tokenizer onto itself is the identity on the codes the crops use; through train(),
    --init-from over another codebook maps the codes of the tokenizer the start's folder names, and the result's
    folder names its own (``zoo_vq.json``)."""
    from mmspec.zoo import hub
    from mmspec.zoo.recipes import c2i

    vqm = hub.load_vq()
    r = c2i.C2IRecipe(dim=64, n_layer=1, n_head=2, n_kv_head=1)
    old = c2i.build_model(r, 1024).eval()
    new = c2i.build_model(r, 1024).eval()
    c2i.transfer_to_new_codes(new, old, torch.eye(1024))
    codes, labels = torch.randint(0, 1024, (2, 9)), torch.tensor([0, 3])
    drop = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(c2i._logits(new, codes, labels, drop), c2i._logits(old, codes, labels, drop))
    with pytest.raises(ValueError, match="mapping"):
        c2i.transfer_to_new_codes(new, old, torch.eye(4096))
    p = c2i.code_map(vqm, vqm, n=32)
    assert p.shape == (1024, 1024) and torch.allclose(p.sum(1), torch.ones(1024))
    seen = p.diagonal() > 0.5
    assert int(seen.sum()) > 50 and bool((p.argmax(1)[seen] == torch.arange(1024)[seen]).all())
    # the recipe's own shape over the default tokenizer, one step, then onto the 4,096-code tokenizer
    c2i.train(tmp_path / "a", max_steps=1, threads=1, eval_n=4)
    assert hub.vq_tag(tmp_path / "a")["name"] == hub.DEFAULT_VQ
    c2i.train(tmp_path / "b", max_steps=1, threads=1, eval_n=4, vq_path=str(hub.weights_path("vq4096")),
              init_from=str(tmp_path / "a"))
    assert hub.vq_tag(tmp_path / "b")["name"] == "vq4096"
    assert hub.codebook(hub.load_vq_for(tmp_path / "b")).shape[0] == 4096
    m = c2i.train(tmp_path / "c", max_steps=1, threads=1, eval_n=4, init_from=str(tmp_path / "b"))
    assert hub.vq_tag(tmp_path / "c")["name"] == "vq4096" and m["init_from"] == str(tmp_path / "b")


def test_video_transfer_to_new_codes(tmp_path):
    """A video model over one tokenizer's codes starts one over another's (words, BOI, EOF and EOI keep their
    rows; with the identity mapping it is the same model), and train() does it when --init-from names another
    tokenizer than --vq; the saved config names the new one."""
    from transformers import AutoModelForCausalLM

    from mmspec.zoo import hub
    from mmspec.zoo.recipes import video
    from mmspec.zoo.recipes.t2i import build_tokenizer

    r = video.VideoRecipe(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    n_text = len(build_tokenizer())
    old, new = video.build_model(r, n_text, 1024).eval(), video.build_model(r, n_text, 1024).eval()
    video.transfer_to_new_codes(new, old, torch.eye(1024))
    ids = torch.randint(0, old.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=ids).logits, old(input_ids=ids).logits)
    with pytest.raises(ValueError, match="mapping"):
        video.transfer_to_new_codes(new, old, torch.eye(4096))
    bigger = video.build_model(r, n_text, 4096)
    mapping = torch.zeros(4096, 1024)
    mapping[torch.arange(4096), torch.arange(4096) % 1024] = 1.0
    video.transfer_to_new_codes(bigger, old, mapping)
    e_old, e_new, off = old.model.embed_tokens.weight, bigger.model.embed_tokens.weight, n_text
    assert torch.equal(e_new[:off], e_old[:off]) and torch.equal(e_new[-3:], e_old[-3:])  # words; BOI, EOF, EOI
    torch.testing.assert_close(e_new[off + 1024 + 5], e_old[off + 5])  # one-hot mapping through a matmul
    hub.tag_vq(old.config, hub.load_vq(), None)
    old.save_pretrained(tmp_path / "old")
    video.train(tmp_path / "v", max_steps=1, threads=1, vq_path=str(hub.weights_path("vq4096")),
                init_from=tmp_path / "old", recipe=replace(r, eval_n=2))
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "v").config
    assert cfg.video_layout["codebook_size"] == 4096 and cfg.zoo_vq["name"] == "vq4096"
    assert cfg.hidden_size == 32


def test_classifier_training_writes_metrics_and_loss_curve(tmp_path):
    from mmspec.zoo.recipes import classifier

    m = classifier.train(tmp_path / "clf", minutes=60, max_steps=20, eval_n=16, threads=1)
    assert m["steps"] == 20 and m["images_seen"] == 20 * classifier.ClassifierRecipe().batch_size
    assert (tmp_path / "clf" / "loss_curve.png").is_file() and (tmp_path / "clf" / "metrics.json").is_file()
    assert set(m["heldout"]["one_object"]["accuracy"]) == set(classifier.ACCURACY_BARS)
