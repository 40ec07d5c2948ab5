"""VSD (with PG-SB), f-distill, SiD and DisBack on the tiny teacher: what each step must compute."""

import dataclasses
import json

import pytest
import torch

from conftest import changed, state_of, tiny_config
from onestep.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from onestep.errors import ConfigError
from onestep.trainers import make_trainer
from onestep.weights import load_trainable, save_trainable
from onestep.trainers.fdistill import F_WEIGHTS, RatioNormaliser, density_ratio, f_weight, normalise_batch_mean
from onestep.trainers.sid import sid_loss
from onestep.trainers.vsd import ClampedClipLoss, vsd_gradient

GAN = dict(gan_weight_generator=5e-3, gan_weight_discriminator=1e-2, gan_head_channels=8)


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("vsd", dict(lora_rank=4)),
        ("vsd", dict(fake_score="copy", guidance_range=[1.0, 3.0], guidance_per="sample")),
        ("fdistill", dict(divergence="js", **GAN)),
        ("sid", {}),
        ("disback-dmd2", dict(disback_nodes=1, disback_record_steps=1, disback_interval=1)),
    ],
    ids=["vsd-lora", "vsd-copy-pgsb", "fdistill-js", "sid", "disback-dmd2"],
)
def test_steps_train_generator_and_fake_not_teacher(tmp_path, tiny_teacher_dir, method, overrides):
    tr = make_trainer(tiny_config(method, tmp_path, tiny_teacher_dir, export=False, **overrides))
    teacher0 = {k: v.clone() for k, v in tr.triad.teacher_parameters().items()}
    gen0 = state_of(tr.generator)
    fake0 = [p.detach().clone() for p in tr.triad.trainable_fake_parameters()]
    for _ in range(4):
        logs = tr.train_step()
        assert all(torch.isfinite(torch.tensor(float(v))) for v in logs.values()), logs
    assert changed(gen0, tr.generator) > 0
    assert any(not torch.equal(a, b) for a, b in zip(fake0, tr.triad.trainable_fake_parameters()))
    for k, v in tr.triad.teacher_parameters().items():
        assert torch.equal(v, teacher0[k]), k


# ------------------------------------------------------------------ VSD


def test_vsd_gradient_is_the_s2_weighted_eps_difference(tiny_teacher):
    sched = tiny_teacher.schedule
    x_t = torch.randn(3, 1, 4, 4)
    t = torch.tensor([20, 500, 950])
    x0_teacher, x0_fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    a, s = sched.alpha_sigma(t)
    eps_t, eps_f = sched.eps_from_x0(x0_teacher, x_t, t), sched.eps_from_x0(x0_fake, x_t, t)
    expected = (s**2).view(-1, 1, 1, 1) * (eps_t - eps_f)
    torch.testing.assert_close(vsd_gradient(x_t, t, x0_teacher, x0_fake, sched), expected, rtol=1e-4, atol=1e-5)
    # Descending it moves x toward the teacher's estimate: the direction of DMD's gradient.
    g = vsd_gradient(x_t, t, x0_teacher, x0_fake, sched)
    assert ((g * (x0_fake - x0_teacher)) >= 0).all()


@pytest.mark.parametrize("per", ["batch", "sample"])
def test_pgsb_draws_one_scale_for_teacher_and_fake_inside_the_range(tmp_path, tiny_teacher_dir, per):
    cfg = tiny_config("vsd", tmp_path, tiny_teacher_dir, lora_rank=4, guidance_range=[0.5, 4.0], guidance_per=per, export=False)
    tr = make_trainer(cfg)
    draws = [tr.guidance_scales(4) for _ in range(50)]
    if per == "batch":
        assert all(isinstance(k, float) and 0.5 <= k <= 4.0 for k in draws)
        assert len(set(draws)) == 50
    else:
        k = torch.stack(draws)
        assert k.shape == (50, 4) and k.min() >= 0.5 and k.max() <= 4.0
        assert (k.std(dim=1) > 0).all()  # a different scale for each sample of a batch
        assert 0.5 < k.min() + 0.2 and k.max() - 0.2 < 4.0  # the whole range is used
    # Teacher and LoRA teacher get the same scale in the generator step.
    seen = {}
    for name, net in (("teacher", tr.teacher), ("fake", tr.fake)):
        orig = net.guided

        def record(*args, _orig=orig, _name=name):
            seen[_name] = args[4]
            return _orig(*args)

        net.guided = record
    tr.generator_loss(tr.make_batch())
    if per == "batch":
        assert seen["teacher"] == seen["fake"] and 0.5 <= seen["teacher"] <= 4.0
    else:
        assert torch.equal(seen["teacher"], seen["fake"]) and seen["teacher"].shape == (4,)


def test_vsd_fake_loss_is_abar_weighted_eps_mse(tmp_path, tiny_teacher_dir):
    tr = make_trainer(tiny_config("vsd", tmp_path, tiny_teacher_dir, lora_rank=4, fake_cond_drop=0.0, export=False))
    batch = tr.make_batch()
    tr.state.reseed()
    batch["x_gen"] = torch.randn(4, 1, 16, 16)
    loss, _ = tr.fake_score_loss(batch)
    # Redo it by hand from the same random stream.
    tr.state.reseed()
    cond = batch["cond"]
    x_t, t, noise = tr.noised(batch["x_gen"])
    abar = tr.schedule.alpha_sigma(t)[0] ** 2
    with torch.no_grad():
        eps = tr.fake.eps(x_t, t, cond)
    expected = (abar.view(-1, 1, 1, 1) * (eps - noise) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)


def _tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip", safe_serialization=True)
    return tmp_path / "clip"


def test_clamped_clip_loss_matches_its_formula_and_reaches_the_images(tmp_path):
    from transformers import CLIPModel

    path = _tiny_clip(tmp_path)
    loss_fn = ClampedClipLoss.from_pretrained(str(path), tau=0.35)
    model = CLIPModel.from_pretrained(path)
    images = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    ids = torch.randint(0, 99, (3, 6))
    # The CLIP image processor's steps for a folder without preprocessor_config.json (OpenAI CLIP's, at the
    # model's image_size 32): pixels (x + 1) * 127.5; shorter side 16 -> 32 as PIL resizes a uint8 image:
    # bicubic (torch's antialiased bicubic is PIL's filter, Keys a = -0.5) along the width, then along the
    # height, each pass clamped to 0..255; centre crop 32x32 (a no-op here); rescale by 1/255; normalise
    # with OpenAI's mean and std.
    bicubic = dict(mode="bicubic", antialias=True, align_corners=False)
    x = torch.nn.functional.interpolate((images.detach() + 1) * 127.5, size=(16, 32), **bicubic).clamp(0, 255)
    x = torch.nn.functional.interpolate(x, size=(32, 32), **bicubic).clamp(0, 255) / 255
    x = (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=x)
        txt = model.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(loss_fn.cosine(images, ids).detach(), cos, rtol=1e-4, atol=1e-5)
    loss = loss_fn(images, ids)
    torch.testing.assert_close(loss.detach(), (0.35 - cos).clamp(min=0).mean(), rtol=1e-4, atol=1e-5)
    ClampedClipLoss(model, tau=1.5)(images, ids).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert ClampedClipLoss(model, tau=-1.5)(images, ids).item() == 0.0  # clamped: cos >= -1 > tau


def test_vsd_clip_loss_refused_without_text_teacher(tmp_path, tiny_teacher_dir):
    path = _tiny_clip(tmp_path)
    with pytest.raises(ConfigError, match="text-to-image"):
        make_trainer(tiny_config("vsd", tmp_path, tiny_teacher_dir, lora_rank=4, clip_model=str(path), export=False))


# ------------------------------------------------------------- f-distill


def test_f_weights_match_the_table():
    r = torch.tensor([0.25, 1.0, 2.0, 9.0])
    table = {
        "reverse_kl": torch.ones(4),
        "softened_reverse_kl": 1 / (r + 1),
        "js": r / (r + 1),
        "squared_hellinger": torch.tensor([0.5, 1.0, 2**0.5, 3.0]) / 4,
        "forward_kl": r,
        "jeffreys": r + 1,
        "neyman_chi2": torch.tensor([4.0, 1.0, 0.5, 1 / 9]),
    }
    assert set(table) == set(F_WEIGHTS)
    for name, expected in table.items():
        torch.testing.assert_close(f_weight(name, r), expected, msg=name)


def test_ratio_is_clamped_and_normalised():
    logits = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0])
    r = density_ratio(logits, logit_clamp=10, r_min=0.1, r_max=20)
    torch.testing.assert_close(r, torch.tensor([0.1, torch.e**-1, 1.0, torch.e**2, 20.0]))
    h = normalise_batch_mean(f_weight("forward_kl", r))
    torch.testing.assert_close(h.mean(), torch.tensor(1.0))
    # Time bins: each r divided by the running mean of its bin (first update: the batch mean).
    norm = RatioNormaliser(num_bins=10, num_timesteps=1000, momentum=0.5)
    t = torch.tensor([5, 50, 950, 990])
    norm.update(torch.tensor([1.0, 3.0, 4.0, 8.0]), t)
    torch.testing.assert_close(norm.mean[[0, 9]], torch.tensor([2.0, 6.0]))
    assert norm.mean[1:9].eq(1).all() and norm.seen.tolist() == [True] + [False] * 8 + [True]
    torch.testing.assert_close(norm.normalise(torch.tensor([1.0, 3.0, 4.0, 8.0]), t), torch.tensor([0.5, 1.5, 4 / 6, 8 / 6]))
    norm.update(torch.tensor([4.0]), torch.tensor([0]))
    torch.testing.assert_close(norm.mean[0], torch.tensor(3.0))  # 0.5 * 2 + 0.5 * 4


def test_reverse_kl_f_distill_is_dmd2(tmp_path, tiny_teacher_dir):
    def run(method, sub, **kw):
        tr = make_trainer(tiny_config(method, tmp_path / sub, tiny_teacher_dir, export=False, **GAN, **kw))
        for _ in range(3):
            tr.train_step()
        return state_of(tr.generator), state_of(tr.fake)

    g_dmd, f_dmd = run("dmd2", "a")
    g_rkl, f_rkl = run("fdistill", "b", divergence="reverse_kl")
    g_js, _ = run("fdistill", "c", divergence="js")
    for k in g_dmd:
        torch.testing.assert_close(g_rkl[k], g_dmd[k], rtol=0, atol=0, msg=k)
    for k in f_dmd:
        torch.testing.assert_close(f_rkl[k], f_dmd[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(g_js[k], g_dmd[k]) for k in g_dmd)  # and another divergence differs


def test_fdistill_needs_the_gan_term(tmp_path, tiny_teacher_dir):
    with pytest.raises(ConfigError, match="GAN"):
        tiny_config("fdistill", tmp_path, tiny_teacher_dir, gan_weight_generator=0.0)


# ------------------------------------------------------------------ SiD


def test_sid_loss_hand_case_and_gradients_through_both_scores(tmp_path, tiny_teacher_dir):
    x_g = torch.tensor([[1.0, 2.0]])
    f_p, f_q = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    # norm = mean|x_g - f_p| = 1; per element (f_p - f_q)((f_p - x_g) - 1.2 (f_p - f_q)) = [-1 * (-1 + 1.2), 0]
    torch.testing.assert_close(sid_loss(x_g, f_p, f_q, 1.2), torch.tensor(-0.2 / 2))

    tr = make_trainer(tiny_config("sid", tmp_path, tiny_teacher_dir, export=False))
    batch = tr.make_batch()
    tr.state.reseed()
    loss, _ = tr.generator_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.generator.named_parameters() if p.grad is not None}
    assert grads and all(p.grad is None for p in tr.fake.parameters())  # the fake score's weights stay out
    # Detaching the scores (DMD-style) gives a different gradient: SiD differentiates through them.
    tr.generator.zero_grad(set_to_none=True)
    tr.state.reseed()
    batch = tr.make_batch()
    orig_teacher, orig_fake = tr.teacher.guided, tr.fake.forward
    tr.teacher.guided = lambda *a: orig_teacher(*a).detach()
    tr.fake.forward = lambda *a, **k: orig_fake(*a, **k).detach()
    tr.generator_loss(batch)[0].backward()
    assert any(not torch.allclose(grads[n], p.grad) for n, p in tr.generator.named_parameters() if p.grad is not None)


# --------------------------------------------------------------- DisBack

DISBACK = dict(disback_nodes=3, disback_record_steps=6, disback_interval=2, fake_updates_per_generator=2, export=False)


def _targets(tr, upto):
    seen = []
    while tr.state.step < upto:
        step = tr.state.step
        gen0 = state_of(tr.generator)
        tr.train_step()
        if tr.is_generator_step(step) and tr.stage(step) == "backtrack":
            seen.append((step, tr.current_target))
        if tr.stage(step) == "record":
            assert changed(gen0, tr.generator) == 0  # G0 stays frozen while the path is recorded
    return seen


def test_disback_records_nodes_then_backtracks_to_the_teacher(tmp_path, tiny_teacher_dir):
    tr = make_trainer(tiny_config("disback-dmd2", tmp_path, tiny_teacher_dir, max_steps=18, **DISBACK))
    teacher_weights = {n: p.detach().clone() for n, p in tr.teacher.backbone.named_parameters()}
    seen = _targets(tr, 18)
    nodes = sorted(p.name for p in (tr.output_dir / "disback").glob("node-*.safetensors"))
    assert nodes == ["node-00.safetensors", "node-01.safetensors", "node-02.safetensors", "node-03.safetensors"]
    # Node 0 is the fake score before any update: the teacher's weights.
    from safetensors.torch import load_file

    node0 = load_file(str(tr.output_dir / "disback" / "node-00.safetensors"))
    assert all(torch.equal(node0[n], teacher_weights[n]) for n in node0)
    # Generator steps 6, 8, ... : targets N-1 = 2 twice, 1 twice, then the teacher.
    assert seen == [(6, 2), (8, 2), (10, 1), (12, 1), (14, 0), (16, 0)]
    assert tr.teacher is tr.real_teacher
    state = json.loads((tr.output_dir / "disback" / "state.json").read_text())
    assert state["target"] == "teacher" and state["stage"] == "backtrack" and len(state["nodes"]) == 4


def test_disback_with_lora_fake_score_targets_each_node_s_adapters(tmp_path, tiny_teacher_dir):
    from safetensors.torch import load_file

    tr = make_trainer(tiny_config("disback-dmd2", tmp_path, tiny_teacher_dir, max_steps=11, fake_score="lora", lora_rank=2, **DISBACK))
    _targets(tr, 11)  # records nodes 0-3, then targets node 2 (steps 6, 8) and node 1 (step 10)
    assert tr.current_target == 1 and tr.teacher is tr.extras["node_target"]
    node1 = load_file(str(tr.output_dir / "disback" / "node-01.safetensors"))
    assert node1 and all("lora_" in k for k in node1)  # a LoRA node holds the adapters only
    target = dict(tr.extras["node_target"].backbone.named_parameters())
    assert all(torch.equal(target[k], v) for k, v in node1.items())
    assert tr.extras["node_target"].use_adapters  # the target runs the node's adapters on the teacher's weights
    # ... the teacher's own tensors, not a copy of them; its adapters are its own (the fake score trains on)
    fake = dict(tr.fake.backbone.named_parameters())
    assert all(p is fake[k] for k, p in target.items() if "lora_" not in k)
    assert all(p is not fake[k] for k, p in target.items() if "lora_" in k)


def test_disback_resumed_run_continues_with_same_target_and_weights(tmp_path, tiny_teacher_dir):
    full = make_trainer(tiny_config("disback-dmd2", tmp_path / "a", tiny_teacher_dir, max_steps=14, **DISBACK))
    full.train()
    cfg = tiny_config("disback-dmd2", tmp_path / "b", tiny_teacher_dir, max_steps=14, checkpoint_every=9, **DISBACK)
    killed = make_trainer(cfg)
    step = killed.train_step

    def dies_at_10():
        if killed.state.step == 10:
            raise KeyboardInterrupt
        return step()

    killed.train_step = dies_at_10
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    # Step 9 ran last: two generator steps (6, 8) since stage 2 began, so the target is node 1.
    assert killed.current_target == 1
    assert json.loads((tmp_path / "b" / "run" / "disback" / "state.json").read_text())["target"] == "node-01"
    resumed = make_trainer(dataclasses.replace(cfg, resume="latest"))
    resumed.load_checkpoint("latest")
    assert resumed.state.step == 9 and resumed.current_target is None
    resumed.train_step()
    assert resumed.current_target == 1  # loaded from disk, as the killed run had it
    resumed.train()
    a, b = state_of(full.generator), state_of(resumed.generator)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_nodes_and_init_weights_load_strictly(tmp_path, tiny_teacher_dir):
    from safetensors.torch import save_file

    tr = make_trainer(tiny_config("disback-dmd2", tmp_path, tiny_teacher_dir, max_steps=2, **DISBACK))
    net = tr.fake.backbone
    good = {n: p.detach().clone() for n, p in net.named_parameters()}
    save_file({**good, "extra.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="unexpected"):
        load_trainable(net, tmp_path / "bad.safetensors")
    save_file({k: v for k, v in list(good.items())[1:]}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        load_trainable(net, tmp_path / "short.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        load_trainable(net, tmp_path / "absent.safetensors")
    # init_generator / init_fake_score start a run from saved weights, exactly.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    save_trainable(net, tmp_path / "fake.safetensors")
    again = make_trainer(tiny_config("dmd2", tmp_path / "b", tiny_teacher_dir, init_fake_score=str(tmp_path / "fake.safetensors"), init_generator=str(tmp_path / "fake.safetensors")))
    for n, p in again.fake.backbone.named_parameters():
        assert torch.equal(p, good[n] + 0.01), n
    for n, p in again.generator.backbone.named_parameters():
        assert torch.equal(p, good[n] + 0.01), n
    with pytest.raises(ConfigError, match="pickles"):
        make_trainer(tiny_config("dmd2", tmp_path / "c", tiny_teacher_dir, init_generator=str(tmp_path / "x.pt")))


def test_swiftbrush_v2_clip_weight_decays_over_the_run_by_default():
    from onestep.trainers import VSDConfig

    assert VSDConfig(max_steps=1000, fake_updates_per_generator=1).clip_decay_steps == 1000
    assert VSDConfig(max_steps=1001, fake_updates_per_generator=2).clip_decay_steps == 501  # generator steps, rounded up
    assert VSDConfig(max_steps=1000, clip_decay_steps=0).clip_decay_steps == 0  # 0 still means a constant weight


def test_export_average_with_another_student_is_the_weighted_mean(tmp_path, tiny_teacher_dir):
    from safetensors.torch import load_file, save_file

    other = make_trainer(tiny_config("dmd2", tmp_path / "other", tiny_teacher_dir, max_steps=2, seed=1))
    other_student = other.train()
    theirs = load_file(str(other_student / "generator" / "diffusion_pytorch_model.safetensors"))
    tr = make_trainer(tiny_config("dmd2", tmp_path / "a", tiny_teacher_dir, max_steps=2, export_average_with=str(other_student),
                                  export_average_weight=0.25, checkpoint_every=0))
    student = tr.train()
    ours = {k: v.detach().cpu() for k, v in tr.generator.backbone.state_dict().items()}
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)  # two different students
    exported = load_file(str(student / "generator" / "diffusion_pytorch_model.safetensors"))
    for k, v in exported.items():
        torch.testing.assert_close(v, 0.75 * ours[k] + 0.25 * theirs[k])
    # the checkpoint's export weights (what `onestep eval run` scores) are the average too
    in_checkpoint = load_file(str(tmp_path / "a" / "run" / "checkpoint-2" / "generator_export.safetensors"))
    assert all(torch.equal(in_checkpoint[k], exported[k]) for k in exported)
    # a file that is not this generator is refused by name, before any training
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="export_average_with: .* is not this network"):
        make_trainer(tiny_config("dmd2", tmp_path / "b", tiny_teacher_dir, export_average_with=str(bad)))
    with pytest.raises(ConfigError, match="no such weights file"):
        tiny_config("dmd2", tmp_path / "c", tiny_teacher_dir, export_average_with=str(tmp_path / "missing.safetensors"))
