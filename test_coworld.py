"""Tests for CoWorld, in the order of the paper: Eq. (1)-(12), Algorithm 1, the baselines and ablations; then the
environments and offline data, bench.py and experiments.py; then faults caused on purpose and the README's claims.
Run with `MUJOCO_GL=osmesa python -m pytest -q test_coworld.py`."""

import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import types
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import coworld as C
import envs
import experiments as X

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = pathlib.Path(__file__).resolve().parent


# ---- Helpers ----


def small_cfg(**overrides):
    values = {**C.PRESETS["small"], "device": "cpu", "precision": "float32", "beta2": 1.0, "k": 0.3,
              "alpha": 2.0, "K2": 10, "rounds": 1, "pretrain_steps": 10, "batch_size": 3, "seq_len": 6,
              "chunks": 2}
    values.update(overrides)
    return dataclasses.replace(C.Config(), **values)


def fake_batch(cfg, action_size, B=None, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = B or cfg.batch_size, T or cfg.seq_len
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    return {"image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8, generator=g),
            "action": torch.rand(B, T, action_size, generator=g) * 2 - 1,
            "reward": torch.rand(B, T, generator=g), "is_first": is_first,
            "is_terminal": torch.zeros(B, T, dtype=torch.bool)}


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


class Constant(torch.nn.Module):
    """A head (or decoder) whose output is one learnable constant, broadcast to `shape` per input row."""

    def __init__(self, value, shape=(1,)):
        super().__init__()
        self.value, self.shape = torch.nn.Parameter(torch.tensor(value)), shape

    def forward(self, feat):  # the 0 * feat keeps the input in the graph, as a real head's would be
        return self.value + 0 * feat.sum(-1).reshape(*feat.shape[:-1], *[1] * len(self.shape)).expand(
            *feat.shape[:-1], *self.shape)


def constant_critic(agent, value):
    with torch.no_grad():
        agent.critic[-1].weight.zero_(), agent.critic[-1].bias.fill_(value)


def tiny_flags(logdir, **overrides):
    flags = {"preset": "small", "device": "cpu", "batch-size": 2, "seq-len": 8, "max-episode-steps": 20,
             "prefill": 20, "train-every": 5, "eval-episodes": 1, "log-every": 1, "checkpoint-every": 1,
             "logdir": str(logdir)}
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def online_flags(run, steps=40, **overrides):
    return ["online", "--env", "dmc:cartpole_balance", "--steps", str(steps), *tiny_flags(run, **overrides)]


def offline_flags(run, **overrides):
    return ["--method", "offline-dv2", "--target", "dmc:cartpole_swingup",
            *tiny_flags(run, **{"K1": 3, "rounds": 1, "target-episodes": 2, "data-dir": run.parent / "data",
                                **overrides})]


def interrupted_run(argv, monkeypatch):
    """A run stopped in its final evaluation: its checkpoint holds the whole training."""
    evaluate = C.evaluate

    def stop(*args, **kwargs):
        raise C.Interrupted(signal.SIGTERM)
    monkeypatch.setattr(C, "evaluate", stop)
    assert C.main(argv) == 143
    monkeypatch.setattr(C, "evaluate", evaluate)


def run_script(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_coworld_cli(*args, timeout=600):
    return run_script("coworld.py", *args, timeout=timeout)


def run_envs_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "envs.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def snapshot(*folders):
    """Every file's size and time, but a run folder's .lock (it names the PID of the last run that held it)."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def write_dataset(folder, episodes):
    """Episode files as another tool would write them: no validation on the way to disk."""
    folder.mkdir(parents=True)
    for i, episode in enumerate(episodes):
        np.savez_compressed(folder / f"20260101T00000{i}-{i:032x}-{len(episode['reward'])}.npz", **episode)
    return folder


def synthetic_episode(length, action_size=4, seed=0, reward=None):
    """A valid episode in the on-disk layout (random pixels)."""
    rng = np.random.default_rng(seed)
    episode = {
        "image": rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (length, action_size)).astype(np.float32),
        "reward": rng.uniform(0, 1, length).astype(np.float32) if reward is None else reward.astype(np.float32),
        "discount": np.ones(length, np.float32),
        "is_first": np.arange(length) == 0,
        "is_last": np.arange(length) == length - 1,
        "is_terminal": np.zeros(length, bool),
    }
    episode["action"][0] = 0
    return episode


def play(env, rng=None, actions=None):
    """Reset, then act (random or the given actions) until is_last; return all observations."""
    rng = rng or np.random.default_rng(0)
    observations = [env.reset()]
    while not observations[-1]["is_last"]:
        step = len(observations) - 1
        action = actions[step] if actions is not None else rng.uniform(-1, 1, env.action_size)
        observations.append(env.step(action))
    return observations


def check_observations(env, observations, reward_range):
    """The observation contract every family shares."""
    assert len(observations) == env.max_steps + 1
    for t, obs in enumerate(observations):
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == (64, 64, 3)
        assert isinstance(obs["reward"], float) and reward_range[0] <= obs["reward"] <= reward_range[1]
        for key in ("is_first", "is_last", "is_terminal"):
            assert isinstance(obs[key], (bool, np.bool_)), key
        assert obs["is_first"] == (t == 0)
        assert obs["is_last"] == (t == env.max_steps)  # time limit...
        assert not obs["is_terminal"]  # ...is not termination
        assert ("success" in obs) == env.has_success
        if env.has_success:
            assert isinstance(obs["success"], (bool, np.bool_))
    assert observations[0]["reward"] == 0.0
    assert len({obs["image"].tobytes() for obs in observations}) > 1  # the images move


PAPER_METAWORLD = ("door-close", "button-press", "window-close", "handle-press", "drawer-close", "button-press-topdown")


DMC_VARIANTS = ("walker_uphill", "walker_downhill", "walker_nofoot", "cheetah_uphill", "cheetah_downhill",
                "cheetah_nopaw")


# ---- Eq. (1): the world model's networks; the actor's distribution (Eq. 9) ----


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_module_shapes(preset):
    cfg = dataclasses.replace(C.Config(), **C.PRESETS[preset], device="cpu", precision="float32")
    A, B, T = 5, 2, 3
    agent = C.Agent(cfg, A)
    batch = fake_batch(cfg, A, B, T)
    embed = agent.wm.encoder(batch["image"])
    assert embed.shape == (B, T, 32 * cfg.cnn_depth)
    feat, (h, z), post, _ = agent.wm.observe(batch)
    S, K = cfg.stoch, cfg.classes
    assert feat.shape == (B, T, S * K + cfg.deter) and h.shape == (B, T, cfg.deter) and z.shape == (B, T, S * K)
    assert post.shape == (B, T, S, K) and agent.wm.rssm.prior_logits(h).shape == (1, B, T, S, K)
    assert agent.wm.decoder(feat).shape == (B, T, 64, 64, 3)
    assert agent.wm.reward(feat).shape == (B, T, 1) and agent.critic(feat).shape == (B, T, 1)
    assert agent.actor(feat).rsample().shape == (B, T, A)
    feats, hs, log_prob, entropy = C.imagine(agent.wm, agent.actor, h.flatten(0, 1), z.flatten(0, 1), cfg.horizon)
    assert feats.shape == (cfg.horizon + 1, B * T, S * K + cfg.deter) and log_prob.shape == (cfg.horizon, B * T)


def test_gru_cell_is_dreamerv2s():
    cell = C.GRUCell(3, 4)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    # DreamerV2's dense layer has a bias (use_bias=norm is not None, true with LayerNorm)
    assert cell.layer.bias is not None and cell.layer.bias.shape == (12,)
    torch.nn.init.normal_(cell.layer.bias)
    parts = torch.nn.functional.layer_norm(torch.cat([x, h], -1) @ cell.layer.weight.T + cell.layer.bias, (12,),
                                           cell.norm.weight, cell.norm.bias, eps=1e-3)
    reset, cand, update = parts[:, :4].sigmoid(), parts[:, 4:8], (parts[:, 8:] - 1).sigmoid()
    expected = update * torch.tanh(reset * cand) + (1 - update) * h
    torch.testing.assert_close(cell(x, h), expected)


def test_is_first_resets_the_state():
    cfg = small_cfg()
    agent = C.Agent(cfg, 4)
    batch = fake_batch(cfg, 4, B=2, T=4)
    batch["is_first"][:] = True
    h, z, _ = agent.wm.rssm.observe(agent.wm.encoder(batch["image"]), batch["action"], batch["is_first"])
    # With every step a first step, each h comes from the zero state with a zero action, whatever the batch's
    # actions (random here): a dataset's action[0] is never read.
    h0 = agent.wm.rssm.transition(*agent.wm.rssm.initial(2, "cpu"), torch.zeros(2, 4))
    for t in range(4):
        torch.testing.assert_close(h[:, t], h0)
    # A reset in the middle of a window (the replay's seam between episodes): only that step starts anew.
    batch["is_first"][:] = torch.tensor([True, False, True, False])
    h, z, _ = agent.wm.rssm.observe(agent.wm.encoder(batch["image"]), batch["action"], batch["is_first"])
    torch.testing.assert_close(h[:, 2], h0)
    assert not torch.allclose(h[:, 1], h0) and not torch.allclose(h[:, 3], h0)


def test_straight_through_samples_are_one_hot_and_carry_gradient():
    logits = torch.randn(64, 32, 32, requires_grad=True)
    sample = C.straight_through_sample(logits)
    hard = sample.detach()
    torch.testing.assert_close(hard.sum(-1), torch.ones(64, 32))
    assert set(hard.round().unique().tolist()) <= {0.0, 1.0}
    w = torch.randn_like(sample)
    (sample * w).sum().backward()
    # sample + p - sg(p): the gradient of the probabilities, not of the logits or the one-hot sample
    reference = logits.detach().clone().requires_grad_()
    (reference.softmax(-1) * w).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_a_zero_uniform_draw_does_not_pick_an_improbable_class(monkeypatch):
    # torch.rand returns exactly 0 once in 2^24 draws; -log(-log U) then made that class win whatever its
    # probability. With every draw 0 the noise is equal for all classes, so the likelier class must win.
    logits = torch.log(torch.tensor([[4e-18, 1.0 - 4e-18], [0.3, 0.7]]))
    monkeypatch.setattr(torch, "rand_like", lambda x: torch.zeros_like(x))
    assert C.straight_through_sample(logits).argmax(-1).tolist() == [1, 1]


def test_straight_through_samples_follow_the_probabilities():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(20000, 1, 3)
    freq = C.straight_through_sample(logits).detach().mean((0, 1))
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)


def test_truncated_normal_stays_in_range_and_is_normalised():
    loc, scale = torch.tensor([[0.9], [-0.3], [0.0]]), torch.tensor([[0.5], [2.0], [0.1]])
    dist = C.TruncatedNormal(loc, scale)
    samples = torch.stack([dist.rsample() for _ in range(2000)])
    assert samples.min() >= -1 and samples.max() <= 1
    xs = torch.linspace(-1, 1, 20001)[:, None, None].expand(-1, 3, 1)
    density = dist.log_prob(xs).exp()  # (X, 3)
    mass = torch.trapezoid(density, dx=2 / 20000, dim=0)
    torch.testing.assert_close(mass, torch.ones(3), atol=1e-3, rtol=0)
    entropy = -torch.trapezoid(density * dist.log_prob(xs), dx=2 / 20000, dim=0)
    torch.testing.assert_close(dist.entropy(), entropy, atol=1e-3, rtol=0)
    # Samples follow the truncated law: compare the sample mean with the numerical mean.
    mean = torch.trapezoid(density * xs[..., 0], dx=2 / 20000, dim=0)
    torch.testing.assert_close(samples.mean(0)[:, 0], mean, atol=0.05, rtol=0)


def test_truncated_normal_reparameterised_gradient():
    loc = torch.zeros(1000, 1, requires_grad=True)
    dist = C.TruncatedNormal(loc, torch.full((1000, 1), 0.3))
    dist.rsample().sum().backward()
    assert loc.grad.abs().mean() > 0.5  # d sample / d loc is about 1 away from the bounds


def test_a_world_model_sees_only_its_environments_action_dimensions():
    """Meta-World (4-d) in the shared 5-d space: its replay stores the fifth dimension as zero, so its world
    model must ignore that dimension when acting, imagining and filtering target actions (Stage B)."""
    torch.manual_seed(0)
    cfg = small_cfg()
    source, target = C.Agent(cfg, 5, env_actions=4), C.Agent(cfg, 5, env_actions=5)
    h, z = torch.randn(3, cfg.deter), torch.randn(3, cfg.stoch * cfg.classes)
    a = torch.rand(3, 5) * 2 - 1
    b = torch.cat([a[:, :4], -a[:, 4:]], -1)  # differs in the fifth dimension only
    torch.testing.assert_close(source.wm.rssm.transition(h, z, a), source.wm.rssm.transition(h, z, b), rtol=0, atol=0)
    assert not torch.allclose(target.wm.rssm.transition(h, z, a), target.wm.rssm.transition(h, z, b))
    # The policy's fifth output then gets no gradient through the source model's imagination.
    feat = C.imagine(source.wm, source.actor, h, z, 3)[0]
    feat.sum().backward()
    assert source.wm.rssm.img_in[0].weight.grad[:, -1].abs().max() == 0
    assert source.wm.rssm.img_in[0].weight.grad[:, -2].abs().max() > 0
    # Its log-probability and entropy (Eq. 7) are those of the four dimensions it has.
    dist = source.actor(feat[0].detach())
    four = C.TruncatedNormal(dist.loc[:, :4], dist.scale[:, :4])
    action = dist.rsample()
    torch.testing.assert_close(dist.log_prob(action), four.log_prob(action[:, :4]))
    torch.testing.assert_close(dist.entropy(), four.entropy())
    full = target.actor(feat[0].detach())  # RoboDesk's actor counts all five
    assert not torch.allclose(full.entropy(), C.TruncatedNormal(full.loc[:, :4], full.scale[:, :4]).entropy())


def test_acting_filters_as_training_does():
    # Agent.act carries (h, z, a_{t-1}) from step to step; replayed with the actions it took, the same images
    # give the same h in RSSM.observe (the same random draws for z): acting and training see one model.
    cfg = small_cfg()
    agent = C.Agent(cfg, 5, env_actions=4)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    torch.manual_seed(1)
    state, actions, hs = None, [torch.zeros(5)], []
    for t in range(4):
        action, state, _ = agent.act({"image": images[t].numpy(), "is_first": t == 0}, state, explore=False)
        actions.append(torch.as_tensor(action))
        hs.append(state[0][0])
    torch.manual_seed(1)
    with torch.no_grad():
        h = agent.wm.rssm.observe(agent.wm.encoder(images[None]), torch.stack(actions[:4])[None],
                                  torch.tensor([[True, False, False, False]]))[0]
    torch.testing.assert_close(h[0], torch.stack(hs))


# ---- Eq. (2): world-model learning ----


def test_eq2_world_model_loss_by_hand():
    # Constant decoder, reward and discount heads: every term of Eq. (2) has a closed form.
    cfg = small_cfg(beta1=0.5, gamma=0.99)
    wm = C.Agent(cfg, 5).wm
    wm.decoder, wm.reward, wm.discount = Constant(0.1, (64, 64, 3)), Constant(0.25), Constant(0.4)
    batch = fake_batch(cfg, 5, B=2, T=3)
    batch["is_terminal"][1, 2] = True
    loss, terms, _, _ = C.world_model_loss(wm, batch, cfg)
    pixels = batch["image"].double() / 255 - 0.5
    image = (0.5 * (0.1 - pixels) ** 2).sum() / 6 + 0.5 * math.log(2 * math.pi) * 64 * 64 * 3  # summed over pixels
    reward = (0.5 * (batch["reward"].double() - 0.25) ** 2).mean() + 0.5 * math.log(2 * math.pi)
    soft = 0.99 * (1 - batch["is_terminal"].double())  # Bernoulli on gamma * (1 - is_terminal)
    p = 1 / (1 + math.exp(-0.4))
    discount = -(soft * math.log(p) + (1 - soft) * math.log(1 - p)).mean()
    assert float(terms["image_nll"]) == pytest.approx(float(image), rel=1e-5)
    assert float(terms["reward_nll"]) == pytest.approx(float(reward), rel=1e-5)
    assert float(terms["discount_nll"]) == pytest.approx(float(discount), rel=1e-5)
    assert loss.item() == pytest.approx(float(image + reward + discount + 0.5 * terms["kl_loss"]), rel=1e-5)


def test_kl_balancing_value_and_gradient_sides():
    torch.manual_seed(0)
    post = torch.randn(1, 4, 3, 32, 32, requires_grad=True)
    prior = torch.randn(1, 4, 3, 32, 32, requires_grad=True)
    loss, kl = C.kl_loss(post, prior, balance=0.8, free=1.0)
    q, p = post.log_softmax(-1), prior.log_softmax(-1)
    kl_ref = (q.exp() * (q - p)).sum((-2, -1)).mean()
    assert kl_ref > 1.0  # above the free nats, so both sides are active
    torch.testing.assert_close(loss, kl_ref)  # both sides have the same value
    torch.testing.assert_close(kl, kl_ref.detach())
    loss.backward()
    # Each side gets gradient only through its own KL: prior 0.8 of it, posterior 0.2 of it.
    post_ref, prior_ref = post.detach().clone().requires_grad_(), prior.detach().clone().requires_grad_()
    q, p = post_ref.log_softmax(-1), prior_ref.log_softmax(-1)
    (q.exp() * (q - p)).sum((-2, -1)).mean().backward()
    torch.testing.assert_close(prior.grad, 0.8 * prior_ref.grad)
    torch.testing.assert_close(post.grad, 0.2 * post_ref.grad)


def test_free_nats_clip_each_side():
    logits = torch.randn(1, 2, 4, 8, 8)
    post = logits.clone().requires_grad_()
    prior = (logits + 0.01 * torch.randn_like(logits)).requires_grad_()
    loss, kl = C.kl_loss(post, prior, balance=0.8, free=1.0)
    assert kl < 1.0 and loss.item() == pytest.approx(1.0)
    loss.backward()
    assert post.grad.abs().max() == 0 and prior.grad.abs().max() == 0
    # A batch mean above the free nats is kept whole, though half its samples lie below: clipping each sample
    # instead of the mean would give their mean of max(KL, 1), larger.
    prior = torch.cat([logits, 3 * torch.randn_like(logits)], 1)
    post = torch.cat([logits, logits], 1)
    per_sample = C.categorical_kl(post, prior)  # (1, 4)
    assert per_sample[0, :2].max() < 1 < per_sample.mean()
    loss, kl = C.kl_loss(post, prior, balance=0.8, free=1.0)
    torch.testing.assert_close(loss, per_sample.mean())


def test_world_model_update_leaves_actor_and_critic_alone():
    cfg = small_cfg()
    agent = C.Agent(cfg, 5).build_optimisers()
    loss, _, _, _ = C.world_model_loss(agent.wm, fake_batch(cfg, 5), cfg)
    wm, critic, actor = params_of(agent.wm), params_of(agent.critic), params_of(agent.actor)
    agent.backward("model", loss)
    agent.step()
    assert changed(wm, agent.wm) and not changed(actor, agent.actor) and not changed(critic, agent.critic)


def test_non_finite_loss_skips_the_update():
    cfg = small_cfg()
    agent = C.Agent(cfg, 5).build_optimisers()
    loss, _, _, _ = C.world_model_loss(agent.wm, fake_batch(cfg, 5), cfg)
    wm = params_of(agent.wm)
    agent.backward("model", loss * float("nan"))
    _, ok = agent.step()
    assert not ok and agent.bad_updates == 1 and not changed(wm, agent.wm) and agent.updates == 0


# ---- Eq. (3): Stage A, state alignment ----


def test_state_alignment_is_zero_for_equal_encoders_and_trains_only_the_target():
    cfg = small_cfg()
    source, target = C.Agent(cfg, 5), C.Agent(cfg, 5)
    target.wm.encoder.load_state_dict(source.wm.encoder.state_dict())
    image = fake_batch(cfg, 5)["image"]
    e_source, e_target = source.wm.encoder(image), target.wm.encoder(image)
    assert C.state_alignment(e_source, e_target).mean().item() == pytest.approx(0.0, abs=1e-6)
    other = C.Agent(dataclasses.replace(cfg, seed=1), 5)
    e_other = other.wm.encoder(image)
    loss = C.state_alignment(e_source, e_other).mean()
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in source.wm.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.wm.encoder.parameters())


def test_state_alignment_matches_a_hand_computed_kl_and_is_a_mean_over_frames():
    e_s = torch.tensor([[1.0, 0.0, 0.0]])
    e_t = torch.tensor([[0.0, 0.0, 1.0]])
    p = torch.tensor([math.e, 1, 1]) / (math.e + 2)
    q = torch.tensor([1, 1, math.e]) / (math.e + 2)
    expected = float((p * (p / q).log()).sum())
    assert C.state_alignment(e_s, e_t).item() == pytest.approx(expected, rel=1e-5)
    # Repeating frames (a longer sequence) leaves the mean unchanged.
    assert C.state_alignment(e_s.expand(50, 3), e_t.expand(50, 3)).mean().item() == pytest.approx(expected, rel=1e-5)


def test_eq3_and_eq12_terms_of_the_target_update():
    # Two sources with their own encoders: the target's model loss is Eq. (2) + beta2 * the smaller KL of Eq. (12);
    # without state alignment, Eq. (2) alone.
    cfg = small_cfg(beta1=0.5, beta2=1.5)
    target = C.Agent(cfg, 5).build_optimisers()
    sources = [C.Agent(dataclasses.replace(cfg, seed=s), 5).build_optimisers() for s in (1, 2)]
    with torch.no_grad():  # sharper source embeddings: KLs of nats, well above the float32 noise of the image NLL
        for source, scale in zip(sources, (20.0, 40.0)):
            source.wm.encoder.net[6].weight.mul_(scale)
    batch = fake_batch(cfg, 5)
    for state_alignment in (True, False):
        with torch.no_grad():
            e_target = target.wm.encoder(batch["image"])
            kls = torch.stack([C.state_alignment(s.wm.encoder(batch["image"]), e_target).mean() for s in sources])
        assert kls.min() > 0.1 and abs(kls[0] - kls[1]) > 0.1  # a choice that matters
        metrics, ok = C.target_update(target, batch, dataclasses.replace(cfg, state_alignment=state_alignment), sources)
        assert ok and metrics["omega"].tolist() == F.one_hot(kls.argmin(), 2).tolist()
        assert float(metrics["domain_kl"]) == pytest.approx(float(kls.min()), rel=1e-4)
        eq2 = metrics["image_nll"] + metrics["reward_nll"] + metrics["discount_nll"] + 0.5 * metrics["kl_loss"]
        added = float(metrics["model_loss"] - eq2)  # the alignment term alone
        assert added == pytest.approx(1.5 * float(kls.min()) if state_alignment else 0.0, rel=1e-3, abs=5e-3)


# ---- Eq. (4), (5): Stage B, reward alignment ----


def test_eq4_relabelled_reward_by_hand():
    r_source, r_target = torch.tensor([2.0, 0.0, 10.0]), torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(C.relabel_reward(r_source, r_target, 0.3), torch.tensor([1.7, 0.15, 7.0]))
    torch.testing.assert_close(C.relabel_reward(r_source, r_target, 1.0), r_target)
    r_pred = r_source.clone().requires_grad_()
    assert not C.relabel_reward(r_pred, r_target, 0.3).requires_grad  # sg() on the source prediction


def test_eq5_eta_schedule_and_mix():
    assert C.eta_schedule(0, 1000) == pytest.approx(1.0)
    assert C.eta_schedule(500, 1000) == pytest.approx(0.55)
    assert C.eta_schedule(1000, 1000) == pytest.approx(0.1)
    assert C.eta_schedule(5000, 1000) == pytest.approx(0.1)
    assert C.reward_alignment_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(3.5)


def test_source_update_uses_eta_and_relabelled_target_reward():
    cfg = small_cfg(beta1=0.5)
    source = C.Agent(cfg, 5).build_optimisers()
    target_batch = fake_batch(cfg, 5, seed=1)
    torch.manual_seed(3)  # the same latent samples for the filtering below and the update's own
    with torch.no_grad():
        r_pred = source.wm.reward(source.wm.observe(target_batch)[0]).squeeze(-1)
    r_tilde = (1 - cfg.k) * r_pred + cfg.k * target_batch["reward"]  # Eq. (4), k = 0.3
    torch.manual_seed(3)
    metrics, ok = C.source_update(source, fake_batch(cfg, 5), cfg, target_batch, eta=0.4)
    assert ok and float(metrics["eta"]) == pytest.approx(0.4)
    assert float(metrics["relabelled_reward"]) == pytest.approx(float(r_tilde.mean()), rel=1e-5)
    assert float(metrics["relabelled_nll"]) == pytest.approx(float(C.gaussian_nll(r_pred, r_tilde).mean()), rel=1e-5)
    # Beside the image and discount terms (the image NLL is ~1e4, so compare the rest on its own):
    # Eq. (5) = 0.4 * source reward NLL + 0.6 * relabelled NLL, and beta1 * KL.
    rest = float(metrics["model_loss"] - metrics["image_nll"] - metrics["discount_nll"])
    expected = 0.4 * metrics["reward_nll"] + 0.6 * metrics["relabelled_nll"] + 0.5 * metrics["kl_loss"]
    assert rest == pytest.approx(float(expected), rel=1e-3, abs=5e-3)


def test_eq5_relabelled_term_trains_the_whole_source_world_model(monkeypatch):
    # Eq. (5) is L_r(phi'): the relabelled term's gradient reaches the source reward head and, through the
    # filtering of the target sequence (h~, z~ of Eq. 4), the source encoder, GRU and posterior; not the decoder,
    # the discount head or the priors (no part of that term), and never the target agent, whose data it reads.
    cfg = small_cfg()
    source, target = C.Agent(cfg, 5).build_optimisers(), C.Agent(cfg, 5).build_optimisers()
    world_model_loss = C.world_model_loss

    def relabelled_term_only(wm, batch, cfg, reward_term=None):
        _, terms, state, embed = world_model_loss(wm, batch, cfg, reward_term)
        return reward_term(torch.zeros(())), terms, state, embed  # (1 - eta) * E_B(T)[-ln r(r~)]

    monkeypatch.setattr(C, "world_model_loss", relabelled_term_only)
    _, ok = C.source_update(source, fake_batch(cfg, 5), cfg, fake_batch(cfg, 5, seed=1), eta=0.4)
    assert ok
    reached = {name for name, p in source.wm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("reward.", "encoder.", "rssm.gru.", "rssm.posterior.", "rssm.img_in."):
        assert any(name.startswith(part) for name in reached), part
    assert not any(name.startswith(("decoder.", "discount.", "rssm.priors.")) for name in reached), reached
    assert all(p.grad is None for p in target.parameters())
    # The relabelled reward r~ itself is a stop-gradient target (Eq. 4's sg): the term's gradient with respect to
    # the prediction is k * (r_pred - r^(T)), as the hand derivation of 1/2 (r~ - r_pred)^2 gives.
    r_pred, r_target = torch.tensor([0.5, -1.0], requires_grad=True), torch.tensor([1.5, 2.0])
    C.gaussian_nll(r_pred, C.relabel_reward(r_pred, r_target, 0.3)).sum().backward()
    torch.testing.assert_close(r_pred.grad, 0.3 * (r_pred.detach() - r_target))


# ---- Eq. (6)-(11): behaviour learning with Stage C's value constraint ----


def test_eq6_gradient_of_the_min_max_constraint():
    v = torch.tensor([[3.0, -1.0], [0.5, 2.0]], requires_grad=True)
    v_source = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.5], [0.25, 0.125]])
    V = v.detach().clone()  # zero regression error isolates the constraint
    alpha = 2.0
    loss = C.critic_loss(v, V, weight, v_source, alpha, "max")
    # (2*1*3 + 2*0.5*0 + 2*0.25*1 + 2*0.125*2) / 4: the max, not a hinge max(v - v_source, 0)
    assert loss.item() == pytest.approx((6.0 + 0.0 + 0.5 + 0.5) / 4)
    loss.backward()
    above = (v > v_source).float()
    torch.testing.assert_close(v.grad, alpha * weight * above / v.numel())
    assert v_source.grad is None  # the source critic never receives gradient
    v.grad = None
    loss = C.critic_loss(v, V, weight, v_source, alpha, "linear")
    assert loss.item() == pytest.approx((6.0 - 1.0 + 0.25 + 0.5) / 4)  # "w/o Max": alpha * v
    loss.backward()
    torch.testing.assert_close(v.grad, alpha * weight / v.numel())


def test_eq6_value_regression_term():
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    V = torch.tensor([0.0, 4.0])
    loss = C.critic_loss(v, V, torch.ones(2))
    assert loss.item() == pytest.approx((0.5 * 1 + 0.5 * 4) / 2)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="max or linear"):  # a misspelt constraint is no silent Eq. (11)
        C.critic_loss(v, V, torch.ones(2), V, 1.0, "Max")


def test_target_update_never_trains_the_source_critic():
    cfg = small_cfg()
    target, source = C.Agent(cfg, 5).build_optimisers(), C.Agent(cfg, 5).build_optimisers()
    metrics, ok = C.target_update(target, fake_batch(cfg, 5), cfg, [source])
    assert ok and all(p.grad is None for p in source.parameters())
    # A source critic that values every state at +1000 (or -1000) makes the max in Eq. (6) pick it everywhere
    # (nowhere): the logged share of states where the constraint is active is 0 (1).
    for value, active in ((1e3, 0.0), (-1e3, 1.0)):
        with torch.no_grad():
            source.critic[-1].weight.zero_(), source.critic[-1].bias.fill_(value)
        metrics, ok = C.target_update(target, fake_batch(cfg, 5), cfg, [source])
        assert ok and float(metrics["source_value"]) == pytest.approx(value)
        assert float(metrics["constraint_active"]) == active


def test_eq6_alpha_and_the_chosen_source_critic_inside_the_target_update():
    cfg = small_cfg()

    def update(alpha, kind, value=1e3):  # the same target, source and random draws each time
        torch.manual_seed(0)
        target, source = C.Agent(cfg, 5).build_optimisers(), C.Agent(cfg, 5).build_optimisers()
        constant_critic(source, value)
        run_cfg = dataclasses.replace(cfg, alpha=alpha, value_constraint=kind)
        return C.target_update(target, fake_batch(cfg, 5), run_cfg, [source])[0]

    # With v_source = 1000 everywhere, max(v, v_source) = 1000 and Eq. (6) adds alpha * 1000 * mean(w).
    plain = float(update(2.0, "none")["critic_loss"])
    added = [float(update(alpha, "max")["critic_loss"]) - plain for alpha in (2.0, 4.0)]
    assert added[0] > 10 and added[1] == pytest.approx(2 * added[0], rel=1e-4)
    # Two sources valued +5 and -5: the one whose encoder matches the target's (omega) bounds the critic.
    target = C.Agent(cfg, 5).build_optimisers()
    sources = [C.Agent(cfg, 5).build_optimisers() for _ in range(2)]
    for source, value in zip(sources, (5.0, -5.0)):
        constant_critic(source, value)
    sources[1].wm.encoder.load_state_dict(target.wm.encoder.state_dict())
    metrics, ok = C.target_update(target, fake_batch(cfg, 5), cfg, sources)
    assert ok and float(metrics["source_value"]) == pytest.approx(-5.0)


def test_eq7_actor_loss_by_hand():
    # H = 3: states 0 and 1 are scored; the action at state t by V_{t+1}, its advantage against v(z_t).
    V = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    baseline = torch.tensor([[0.5], [1.0], [1.5], [2.0]], requires_grad=True)
    log_prob = torch.tensor([[-1.0], [-2.0], [-3.0]], requires_grad=True)
    entropy = torch.tensor([[0.1], [0.2], [0.3]])
    weight = torch.tensor([[1.0], [0.9], [0.81], [0.729]])
    loss = C.actor_loss(V, baseline, log_prob, entropy, weight, rho=0.5, beta=0.1)
    # t=0: 0.5 * 2 + 0.5 * (-1) * (2 - 0.5) + 0.1 * 0.1 = 0.26; t=1: 0.5 * 3 + 0.5 * (-2) * (3 - 1) + 0.02 = -0.48
    assert loss.item() == pytest.approx(-(1.0 * 0.26 + 0.9 * -0.48) / 2)
    loss.backward()
    torch.testing.assert_close(V.grad, torch.tensor([[0.0], [-0.25], [-0.225]]))  # rho term: dynamics backprop
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-0.375], [-0.45], [0.0]]))  # REINFORCE term
    assert baseline.grad is None or not baseline.grad.any()  # sg() on the advantage


def test_actor_update_leaves_world_model_and_critic_alone():
    cfg = small_cfg()
    agent = C.Agent(cfg, 5).build_optimisers()
    batch = fake_batch(cfg, 5)
    _, _, (h, z), _ = C.world_model_loss(agent.wm, batch, cfg)
    losses, _ = C.behaviour_losses(agent, h, z, batch["is_terminal"], cfg)
    wm, critic, actor = params_of(agent.wm), params_of(agent.critic), params_of(agent.actor)
    agent.backward("actor", losses["actor"])
    _, ok = agent.step()
    assert ok and changed(actor, agent.actor)
    assert not changed(wm, agent.wm) and not changed(critic, agent.critic)


def test_lambda_return_matches_a_plain_loop_of_eq8():
    torch.manual_seed(0)
    H, N, lam = 15, 4, 0.95
    reward, discount, value = torch.randn(H, N), torch.rand(H, N), torch.randn(H + 1, N)
    expected = torch.zeros(H, N)
    for n in range(N):
        V_next = value[H, n]  # V_H = v(z_H)
        for t in reversed(range(H)):
            V_next = reward[t, n] + discount[t, n] * ((1 - lam) * value[t + 1, n] + lam * V_next)
            expected[t, n] = V_next
    got = C.lambda_return(reward, value, discount, lam)
    torch.testing.assert_close(got, expected)
    # The last return bootstraps from v(z_H); a reversed-in-time result would not match the first entry.
    torch.testing.assert_close(got[-1], reward[-1] + discount[-1] * value[-1])
    assert not torch.allclose(got.flip(0), expected)


def test_lambda_return_with_lambda_zero_and_one():
    torch.manual_seed(1)
    H, N = 5, 3
    reward, discount, value = torch.randn(H, N), torch.full((H, N), 0.9), torch.randn(H + 1, N)
    torch.testing.assert_close(C.lambda_return(reward, value, discount, 0.0), reward + 0.9 * value[1:])
    monte_carlo = sum(0.9 ** t * reward[t] for t in range(H)) + 0.9 ** H * value[H]
    torch.testing.assert_close(C.lambda_return(reward, value, discount, 1.0)[0], monte_carlo)


def test_true_value_discounts_the_first_reward_once():
    # Figure 5(b)'s true value against v(z_0): with gamma = 0.5, rewards 1, 2, 4 after three actions give
    # 0.5 * 1 + 0.25 * 2 + 0.125 * 4 = 1.5; lambda = 1 returns from the same (zero) start reward agree.
    assert C.discounted_return([1.0, 2.0, 4.0], 0.5) == 1.5
    reward = torch.tensor([[0.0], [1.0], [2.0], [4.0]])  # r_0..r_3, r_0 the reward that came with o_0
    V = C.lambda_return(reward, torch.zeros(5, 1), torch.full((4, 1), 0.5), 1.0)
    assert float(V[0]) == C.discounted_return([1.0, 2.0, 4.0], 0.5)


def test_a_terminal_start_state_ends_its_imagined_rollout(monkeypatch):
    # is_terminal from the data sets the start state's discount to 0 (gamma elsewhere): its lambda-return is
    # its own reward and every later imagined state gets weight 0 in the critic and actor losses.
    cfg = small_cfg()
    agent = C.Agent(cfg, 5)
    seen, lambda_return, critic_loss = {}, C.lambda_return, C.critic_loss

    def spy_lambda_return(reward, value, discount, lambda_):
        seen.update(reward=reward, discount=discount, V=lambda_return(reward, value, discount, lambda_))
        return seen["V"]

    def spy_critic_loss(v, V, weight, *args):
        seen["weight"] = weight
        return critic_loss(v, V, weight, *args)
    monkeypatch.setattr(C, "lambda_return", spy_lambda_return)
    monkeypatch.setattr(C, "critic_loss", spy_critic_loss)
    h = torch.randn(2, cfg.deter)
    z = F.one_hot(torch.randint(cfg.classes, (2, cfg.stoch)), cfg.classes).flatten(1).float()
    C.behaviour_losses(agent, h, z, torch.tensor([True, False]), cfg)
    assert seen["discount"][0].tolist() == pytest.approx([0.0, cfg.gamma])
    assert seen["V"][0, 0].item() == pytest.approx(seen["reward"][0, 0].item())
    assert not seen["weight"][1:, 0].any() and seen["weight"][1:, 1].all()


def test_one_update_changes_what_it_should():
    cfg = small_cfg()
    target, source = C.Agent(cfg, 5).build_optimisers(), C.Agent(cfg, 5).build_optimisers()
    before = {name: params_of(m) for name, m in
              [("wm", target.wm), ("actor", target.actor), ("critic", target.critic), ("source", source)]}
    slow = params_of(target.slow_critic)
    metrics, ok = C.target_update(target, fake_batch(cfg, 5), cfg, [source])
    assert ok
    assert changed(before["wm"], target.wm) and changed(before["actor"], target.actor)
    assert changed(before["critic"], target.critic)
    assert not changed(before["source"], source)  # Stage A and C never train the source
    # DreamerV2 copies the critic into the slow critic after update 0, then every 100 updates.
    assert changed(slow, target.slow_critic)
    assert all(torch.equal(a, b) for a, b in zip(target.slow_critic.parameters(), target.critic.parameters()))
    slow = params_of(target.slow_critic)
    C.target_update(target, fake_batch(cfg, 5, seed=1), cfg, [source])
    assert not changed(slow, target.slow_critic) and changed(slow, target.critic)


# ---- Eq. (12), App. C: multi-source selection ----


def test_multi_source_selection_picks_the_closest_encoder():
    torch.manual_seed(0)
    e_target = torch.randn(10, 8)
    near = e_target + 0.01 * torch.randn(10, 8)
    far = torch.randn(10, 8) * 3
    omega, kls = C.select_source(torch.stack([far, near, -e_target]), e_target)
    assert omega.tolist() == [0.0, 1.0, 0.0]
    assert kls.argmin().item() == 1 and kls[1] < kls[0] and kls[1] < kls[2]


def test_multi_source_update_weights_the_source_with_the_same_encoder():
    cfg = small_cfg()
    target = C.Agent(cfg, 5).build_optimisers()
    sources = [C.Agent(cfg, 5).build_optimisers() for _ in range(2)]
    sources[1].wm.encoder.load_state_dict(target.wm.encoder.state_dict())  # identical encoder: KL 0
    metrics, ok = C.target_update(target, fake_batch(cfg, 5), cfg, sources)
    assert ok and metrics["omega"].tolist() == [0.0, 1.0]
    assert float(metrics["domain_kl"]) == pytest.approx(0.0, abs=1e-6)


def test_multi_source_pretrains_the_target_world_model_before_selecting(tmp_path, monkeypatch):
    # App. C step 1: with several sources the target's world model first learns B^(T) alone (Eq. 2: no source
    # encoder consulted, no behaviour learning), so the first selection compares the sources with a trained
    # target encoder, not a random one.
    calls, world_model_update, target_update = [], C.world_model_update, C.target_update

    def pretrain(agent, batch, cfg):
        actor, critic = params_of(agent.actor), params_of(agent.critic)
        result = world_model_update(agent, batch, cfg)
        assert not changed(actor, agent.actor) and not changed(critic, agent.critic)
        calls.append("pretrain")
        return result
    monkeypatch.setattr(C, "world_model_update", pretrain)
    monkeypatch.setattr(C, "target_update",
                        lambda *args, **kwargs: (calls.append("select"), target_update(*args, **kwargs))[1])
    run = tmp_path / "run"
    argv = ["--source", "dmc:cartpole_balance", "dmc:walker_walk", "--target", "dmc:cartpole_swingup",
            *tiny_flags(run, K1=2, K2=10, rounds=1, **{"pretrain-steps": 25, "target-episodes": 1, "target-pretrain": 3,
                                                      "data-dir": tmp_path / "data", "eval-every": 1})]
    assert C.main(argv) == 0
    assert calls == ["pretrain"] * 3 + ["select"] * 2
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["target"]["updates"] == 3 + 2
    # The learning curve counts the K1 updates only: no evaluation of an actor that has not learned yet.
    evals = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/return_mean" in line]
    assert evals == [1, 2]  # every update, then the final evaluation
    # By default as many updates as a source's world model gets in its pretraining: (160k - 5k prefill) / 5.
    cfg = C.parse_args(["--source", "metaworld:door-close", "metaworld:button-press", "--target", "robodesk:push_green",
                        "--preset", "paper"])[1]
    assert cfg.target_pretrain == (160_000 - 5000) // 5
    assert C.parse_args(["--source", "dmc:walker_walk", "--target", "dmc:walker_uphill", "--preset",
                         "paper"])[1].target_pretrain == (600_000 - 2500) // 5


def test_multi_source_run_counts_its_choices(tmp_path, monkeypatch):
    run = tmp_path / "run"
    argv = ["--source", "dmc:cartpole_balance", "dmc:walker_walk", "--target", "dmc:cartpole_swingup",
            *tiny_flags(run, K1=3, K2=10, rounds=2, **{"pretrain-steps": 45, "target-episodes": 1,
                                                       "data-dir": tmp_path / "data"})]
    save, steps_saved = C.Run.save, []
    monkeypatch.setattr(C.Run, "save", lambda self: (steps_saved.append(self.progress["steps"]), save(self)))
    assert C.main(argv) == 0
    counts = json.loads((run / "results.json").read_text())["source_selected"]  # Table 6
    assert list(counts) == ["dmc:cartpole_balance", "dmc:walker_walk"] and sum(counts.values()) == 6  # K1 per round
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["progress"]["env_steps"] == [55, 55]  # each source runs its own online stage, between rounds
    # Each source's pretraining checkpoints at its own episode ends (steps 1-44, then 46-89), not only at its end.
    assert any(0 < s < 45 for s in steps_saved) and any(45 < s < 90 for s in steps_saved)


# ---- The speed and memory devices, each against the plain computation beside it ----


def custom_functions(loss):
    """The custom autograd Functions (and their backward nodes) in a loss's graph."""
    seen, found, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("chunks", [1, 2])
def test_with_one_chunk_an_update_runs_the_plain_expressions(monkeypatch, chunks):
    # chunks = 1 (the default): the decoder call and image_nll, no custom autograd Function, no recomputation.
    # chunks = 2: the memory devices engage (the positive control, so the check can fail).
    cfg = small_cfg(chunks=chunks)
    target, source = C.Agent(cfg, 5).build_optimisers(), C.Agent(cfg, 5).build_optimisers()
    graphs, recomputed, backward = [], [], C.Agent.backward
    monkeypatch.setattr(C.Agent, "backward", lambda self, name, loss, **kw: (
        graphs.append(custom_functions(loss)), backward(self, name, loss, **kw))[1])
    monkeypatch.setattr(C, "checkpoint", lambda *args, **kw: (recomputed.append(1), checkpoint(*args, **kw))[1])
    from torch.utils.checkpoint import checkpoint
    for update in (C.target_update(target, fake_batch(cfg, 5), cfg, [source]),
                   C.source_update(source, fake_batch(cfg, 5), cfg, fake_batch(cfg, 5, seed=1), eta=0.5)):
        assert update[1]
    functions = set().union(*graphs)
    if chunks == 1:
        assert functions == set() and not recomputed
    else:
        assert functions == {"DecodedImageNLLBackward"} and recomputed


def test_behaviour_chunks_give_the_same_gradient(monkeypatch):
    # Deterministic sampling, so that one pass and three parts imagine the same rollouts.
    monkeypatch.setattr(C, "straight_through_sample", lambda logits: (lambda p: F.one_hot(
        p.argmax(-1), p.shape[-1]).to(p.dtype) + p - p.detach())(logits.float().softmax(-1)))
    monkeypatch.setattr(C.TruncatedNormal, "rsample", lambda self: self.loc.clamp(-0.99, 0.99))
    grads = []
    for chunks in (1, 3):
        cfg = small_cfg(chunks=chunks)
        torch.manual_seed(0)
        target, source = C.Agent(cfg, 5).build_optimisers(), C.Agent(cfg, 5).build_optimisers()
        batch = fake_batch(cfg, 5)
        _, _, (h, z), _ = C.world_model_loss(target.wm, batch, cfg)
        metrics = C.learn_behaviour(target, h, z, batch["is_terminal"], cfg, [source.critic], torch.ones(1))
        grads.append([p.grad.clone() for p in [*target.actor.parameters(), *target.critic.parameters()]]
                     + [metrics["actor_loss"], metrics["critic_loss"], metrics["lambda_return"]])
    for one, parts in zip(*grads):
        torch.testing.assert_close(parts, one, rtol=1e-4, atol=1e-6)


def test_decoder_chunks_give_the_plain_gradient():
    # The decoder's gradient is taken in the forward pass, chunk by chunk (20 frames in 3 uneven parts); the
    # backward must hand out what plain autograd gives, scaled by the weight the loss gets afterwards.
    torch.manual_seed(0)
    decoder = C.Decoder(40, 4)
    image = torch.randint(0, 256, (4, 5, 64, 64, 3), dtype=torch.uint8)
    results = []
    for chunked in (False, True):
        feat = torch.randn(4, 5, 40, generator=torch.Generator().manual_seed(1)).requires_grad_()
        decoder.zero_grad()
        nll = C.decoded_image_nll(decoder, feat, image, 3) if chunked else C.image_nll(decoder(feat), image)
        (2.5 * nll).backward()
        results.append([nll.detach(), feat.grad, *(p.grad for p in decoder.parameters())])
    for plain, chunked in zip(*results):
        torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(C.decoded_image_nll(decoder, feat, image, 3), results[0][0], rtol=1e-5, atol=0)


def test_encoder_recomputed_in_chunks_gives_the_plain_gradient():
    # The encoder's first convolutions are recomputed in the backward pass, 3 uneven chunks of 10 frames;
    # embedding and gradients must be those of one plain pass.
    torch.manual_seed(0)
    encoder = C.Encoder(4).to(memory_format=torch.channels_last)
    image = torch.randint(0, 256, (2, 5, 64, 64, 3), dtype=torch.uint8)
    weight = torch.randn(2, 5, encoder.out_dim)
    results = []
    for chunks in (1, 3):
        encoder.chunks = chunks
        encoder.zero_grad()
        embed = encoder(image)
        (weight * embed).sum().backward()
        results.append([embed.detach(), *(p.grad for p in encoder.parameters())])
    for plain, chunked in zip(*results):
        torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=1e-5)


def test_decoder_first_layer_as_a_matrix_product_is_the_transposed_convolution():
    # The speed device against the plain path beside it: the same image means and the same gradients.
    torch.manual_seed(0)
    decoder = C.Decoder(40, 4).to(memory_format=torch.channels_last)
    feat = torch.randn(3, 5, 40)
    image = torch.randint(0, 256, (3, 5, 64, 64, 3), dtype=torch.uint8)
    results = []
    for as_matmul in (False, True):
        decoder.first_as_matmul = as_matmul
        decoder.zero_grad()
        mean = decoder(feat)
        C.image_nll(mean, image).backward()
        results.append([mean.detach(), *(p.grad for p in decoder.parameters())])
    for plain, device in zip(*results):
        torch.testing.assert_close(device, plain, rtol=1e-5, atol=1e-5)


def test_acting_on_one_thread_acts_as_on_every_thread():
    cfg = small_cfg()
    agent = C.Agent(cfg, 5)
    obs = {"image": np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "is_first": True}
    actions, threads = [], torch.get_num_threads()
    for single in (False, True):
        agent.single_thread_acting = single
        torch.manual_seed(0)
        action, state, value = agent.act(obs, None, explore=False)
        actions.append((action, state[0], value))
        assert torch.get_num_threads() == threads  # the updates keep every thread
    np.testing.assert_allclose(actions[0][0], actions[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actions[0][1], actions[1][1])
    assert actions[0][2] == pytest.approx(actions[1][2], rel=1e-5, abs=1e-6)


@pytest.mark.skipif(not 2 <= torch.get_num_threads() == len(os.sched_getaffinity(0)),
                    reason="needs 2 or more cores, a torch thread on each")
def test_threads_follow_the_cores_other_processes_leave_free(monkeypatch):
    # --threads 0: beside a process that keeps a core busy the run drops to the free cores, and takes them back
    # when it ends; --threads N and OMP_NUM_THREADS are the user's choice and stay.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    most = torch.get_num_threads()
    share = C.CoreShare.for_config(small_cfg(threads=0))
    share.every_s = 0.0
    try:
        time.sleep(1.0)
        threads, others = share.free_threads()
        if others > 0.3:
            pytest.skip(f"other processes keep {others:.1f} cores busy: the test needs a quiet machine")
        assert threads == most  # a quiet machine: every core
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(2.0)
            assert share.adjust().startswith(f"threads {most} -> {most - 1}: other processes kept")
            assert torch.get_num_threads() == most - 1
        finally:
            busy.kill(), busy.wait()
        time.sleep(1.0)
        assert share.adjust().startswith(f"threads {most - 1} -> {most}") and torch.get_num_threads() == most
    finally:
        torch.set_num_threads(most)
    assert C.CoreShare.for_config(small_cfg(threads=1)) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert C.CoreShare.for_config(small_cfg(threads=0)) is None


def test_every_step_of_a_loop_lets_the_threads_follow_the_free_cores():
    # Run.steps asks the run's CoreShare after each step and writes the change it reports above the progress bar.
    changes = iter([None, "threads 2 -> 1: other processes kept 1.0 of 2 cores busy (--threads N fixes the count)"])
    asked, written = [], []
    run = types.SimpleNamespace(cursor=0, progress={"steps": 0}, saved=(0, 0), cfg=small_cfg(), stop_requested=None,
                                updates=lambda: 0, evaluate_periodically=lambda: None, save=lambda: None,
                                check_stop=lambda now=False: None,
                                core_share=types.SimpleNamespace(adjust=lambda: asked.append(1) or next(changes)))
    run.share_cores = lambda: C.Run.share_cores(run)
    for step in C.Run.steps(run, 2, "offline target"):
        run.bar.write = written.append
    assert len(asked) == 2 and written == ["  threads 2 -> 1: other processes kept 1.0 of 2 cores busy "
                                           "(--threads N fixes the count)"]


def test_compiled_steps_compute_what_the_eager_steps_do():
    # --compile on (the CUDA default) runs here under the CPU backend: the compiled per-step functions give
    # the eager h, logits, entropy and gradients for the same inputs (only their random draws differ).
    torch.manual_seed(0)
    cfg = small_cfg(compile="on", batch_size=2, seq_len=3, horizon=2, chunks=1)
    compiled = C.Agent(cfg, 5).build_optimisers()
    eager = C.Agent(dataclasses.replace(cfg, compile="off"), 5)
    eager.load_state_dict(compiled.state_dict())
    h = torch.randn(4, cfg.deter)
    z = F.one_hot(torch.randint(cfg.classes, (4, cfg.stoch)), cfg.classes).flatten(1).float()
    action, embed = torch.rand(4, 5) * 2 - 1, torch.randn(4, compiled.wm.encoder.out_dim)
    is_first = torch.tensor([True, False, False, True])
    outputs = {}
    for name, agent in (("compiled", compiled), ("eager", eager)):
        h1, z1, logits = agent.wm.rssm.obs_step(h, z, action, embed, is_first)
        torch.testing.assert_close(z1.detach().reshape(4, cfg.stoch, cfg.classes).sum(-1), torch.ones(4, cfg.stoch))
        h2, _ = agent.wm.rssm.img_step(h1, z, action)  # z, not the sampled z1: the same input for both
        _, _, entropy = agent.actor.sample(torch.cat([z, h2], -1).detach())
        (h2.square().sum() + logits.square().sum()).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in agent.wm.rssm.parameters()]
        outputs[name] = [h1, logits, h2, entropy, *grads]
    for got, want in zip(outputs["compiled"], outputs["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for _ in range(2):  # a whole update through the compiled steps
        metrics, ok = C.target_update(compiled, fake_batch(cfg, 5), cfg, [eager.build_optimisers()])
        assert ok and math.isfinite(float(metrics["model_loss"]))


# ---- Algorithm 1: the loop, Table 7's values, real short runs ----


class PlanRun:
    """A stand-in for Run that records the loops Algorithm 1 enters (as (stage, index)) instead of running them."""

    def __init__(self, cfg, sources):
        self.cfg, self.sources, self.plan = cfg, [None] * sources, []
        self.source_names = [f"s{i}" for i in range(sources)]
        self.target = self.target_replay = None
        self.source_replays = [None] * sources

    def steps(self, n, desc, safe=None, until=None):
        if match := re.search(r"round (\d+)/\d+: offline", desc):
            self.plan.append(("offline", int(match[1]) - 1))
        elif "target world model" in desc:
            self.plan.append(("pretrain-target", 0))
        else:
            self.plan.append(("pretrain" if desc.startswith("pretrain") else "online", int(desc[-1])))
        return iter(())

    @contextlib.contextmanager
    def collector(self, i):
        yield types.SimpleNamespace(between_episodes=lambda: True)

    def final_evaluation(self, agent, env_name):
        self.plan.append(("evaluate", 0))


def test_algorithm1_plan_has_no_online_phase_after_the_last_round():
    cfg = small_cfg(rounds=3)
    run = PlanRun(cfg, 2)
    C.algorithm1(run)
    assert run.plan == [("pretrain", 0), ("pretrain", 1), ("pretrain-target", 0), ("offline", 0), ("online", 0),
                        ("online", 1), ("offline", 1), ("online", 0), ("online", 1), ("offline", 2), ("evaluate", 0)]
    run = PlanRun(dataclasses.replace(cfg, method="offline-dv2"), 0)
    C.algorithm1(run)
    assert run.plan == [("offline", 0), ("offline", 1), ("offline", 2), ("evaluate", 0)]


def test_algorithm1_is_one_function_that_cites_its_lines_in_order():
    source = inspect.getsource(C.algorithm1)
    cited = []
    for match in re.finditer(r"(?:#|;)\s*(\d+)(?:-(\d+))?:", source):
        cited += range(int(match[1]), int(match[2] or match[1]) + 1)
    assert cited == list(range(1, 28)) and len(source.splitlines()) <= 60


@pytest.mark.parametrize("source, target, method, expected", [
    # Table 7 per target suite (K1: the target's update iterations, 5e4 / 2e4); rounds: App. D's 300k (MW/RoboDesk)
    # / 600k (DMC) target iterations over K1, the same for CoWorld and the baselines.
    ("metaworld:window-close", "robodesk:open_slide", "coworld", (1.0, 0.3, 2.0, 50_000, 160_000, 6)),
    ("metaworld:button-press", "metaworld:door-close", "coworld", (1.0, 0.3, 2.0, 50_000, 160_000, 6)),
    ("dmc:walker_walk", "dmc:walker_uphill", "coworld", (1.5, 0.9, 1.0, 20_000, 600_000, 30)),
    ("metaworld:button-press", "metaworld:door-close", "offline-dv2", (1.0, 0.3, 2.0, 50_000, 160_000, 6)),
    ("dmc:walker_walk", "dmc:walker_uphill", "dv2-finetune", (1.5, 0.9, 1.0, 20_000, 600_000, 30)),
])
def test_table7_defaults_follow_the_target_suite(source, target, method, expected):
    cfg = C.parse_args(["--source", source, "--target", target, "--method", method, "--preset", "paper"])[1]
    assert (cfg.beta2, cfg.k, cfg.alpha, cfg.K1, cfg.pretrain_steps, cfg.rounds) == expected
    assert (cfg.K2, cfg.horizon, cfg.batch_size, cfg.seq_len, cfg.stoch, cfg.classes) == (20_000, 15, 50, 50, 32, 32)


def test_device_dependent_defaults_resolve_on_this_machine():
    cfg = C.parse_args(["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup", "--preset", "paper"])[1]
    on_cuda = torch.cuda.is_available()
    assert (cfg.compile, cfg.chunks) == (("on", 1) if on_cuda else ("off", 1))  # the memory devices are opt-in
    cfg = C.parse_args(["--target", "dmc:cartpole_swingup", "--preset", "small"])[1]
    assert cfg.chunks == 1  # at the small size, splitting costs more time than the memory it saves
    cfg = C.parse_args(["--target", "dmc:cartpole_swingup", "--compile", "on", "--chunks", "2"])[1]
    assert (cfg.compile, cfg.chunks) == ("on", 2)


def test_device_auto_picks_the_paper_preset_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for flags in ([], ["--device", "auto"]):  # the default, whether typed or not
        cfg = C.parse_args(["--source", "dmc:walker_walk", "--target", "dmc:walker_uphill", *flags])[1]
        assert (cfg.preset, cfg.device, cfg.batch_size, cfg.precision) == ("paper", "cuda", 50, "bf16")


def test_precision_auto_is_bf16_on_a_cpu_only_with_amx(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = ["--source", "metaworld:window-close", "--target", "robodesk:open_slide"]
    for amx, precision in ((True, "bf16"), (False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert C.parse_args(flags)[1].precision == precision
        assert C.parse_args([*flags, "--precision", "float32"])[1].precision == "float32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the private query: no AMX assumed
    assert C.parse_args(flags)[1].precision == "float32"


def test_main_command_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["--source", "metaworld:window-close", "--target", "robodesk:open_slide",
            *tiny_flags(run, K1=3, K2=20, rounds=2, **{"pretrain-steps": 40, "target-episodes": 2,
                                                       "data-dir": tmp_path / "data"})]
    calls = []
    original = C.Run.collector

    def stop_after_pretraining(self, *args, **kwargs):
        calls.append(args)
        masks = [agent.wm.rssm.action_mask.tolist() for agent in (*self.sources, self.target)]
        assert masks == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # Meta-World's 4 of the shared 5 dimensions
        if len(calls) == 2:  # the online co-training stage: simulate a kill before it starts
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(C.Run, "collector", stop_after_pretraining)
    assert C.main(argv) == 130
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["progress"]["steps"] == 40 + 3  # pretrain + offline round done
    assert state["target"]["updates"] == 3
    monkeypatch.undo()
    assert C.main(argv) == 0
    out = capsys.readouterr().out
    assert "Resuming" in out
    results = json.loads((run / "results.json").read_text())
    assert results["env"] == "robodesk:open_slide" and results["eval"]["episodes"] == 1
    assert results["eval"]["success_rate"] in (0.0, 1.0)
    assert "value_estimate" in results["eval"] and "true_value" in results["eval"]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["progress"]["env_steps"] == [40 + 20]  # pretraining, then K2 co-training steps
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    etas = [line["source0/eta"] for line in lines if "source0/eta" in line]
    assert etas == pytest.approx([0.775, 0.55, 0.325, 0.1])  # Eq. (5): 1 -> 0.1 over the (rounds - 1) * K2 steps
    assert state["target"]["updates"] == 6  # K1 in each of the two rounds; no online phase after the last
    capsys.readouterr()
    # The evaluate command reads the run and changes nothing in it (it may still be training): not a half-written
    # checkpoint, not the replay; it may use other evaluation settings.
    (run / ".checkpoint.pt.tmp123").write_bytes(b"in flight")
    before = snapshot(run / "replay", run / "checkpoint.pt", run / ".checkpoint.pt.tmp123", run / "metrics.jsonl")
    assert C.main(["evaluate", *argv, "--eval-episodes", "2", "--eval-random"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 2 and result["random_policy"]["episodes"] == 2
    files = (run / "replay", run / "checkpoint.pt", run / ".checkpoint.pt.tmp123", run / "metrics.jsonl")
    assert snapshot(*files) == before
    assert (run / "videos" / "evaluate.mp4").stat().st_size > 0
    set_threads, threads, set_num_threads = [], torch.get_num_threads(), torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_threads.append(n) or set_num_threads(n))
    assert C.main(["evaluate", "--logdir", str(run), "--eval-episodes", "1", "--threads", "2"]) == 0
    set_num_threads(threads)  # the test process keeps its threads
    assert set_threads[0] == 2  # --threads N reaches torch in evaluate too, before acting's own single thread
    assert len(list((tmp_path / "data").glob("*/*.npz"))) == 2  # the default target dataset, cached


def test_online_run_writes_episodes_metrics_video_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["online", "--env", "dmc:cartpole_balance", "--steps", "60", *tiny_flags(run)]

    steps, evaluate = [], C.evaluate

    def ctrl_c_in_evaluation(*args, stop, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the run's handler: stop at the next safe point
        return evaluate(*args, stop=lambda: steps.append(1) or stop(), **kwargs)
    monkeypatch.setattr(C, "evaluate", ctrl_c_in_evaluation)
    assert C.main(argv) == 130  # the evaluation stopped after one step, keeping the training phase's checkpoint
    assert len(steps) == 1 and not (run / "results.json").exists()
    assert "the last checkpoint in" in capsys.readouterr().err
    episodes = sorted((run / "replay").rglob("*.npz"))
    assert len(episodes) == 3  # 60 steps of 20-step episodes
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["progress"]["steps"] == 60 and state["sources"][0]["updates"] > 0
    updates = state["sources"][0]["updates"]
    monkeypatch.undo()
    capsys.readouterr()
    assert C.main(argv) == 0
    out = capsys.readouterr().out
    assert "Resuming" in out
    assert sorted((run / "replay").rglob("*.npz")) == episodes  # nothing collected again
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["sources"][0]["updates"] == updates
    results = json.loads((run / "results.json").read_text())
    assert results["eval"]["episodes"] == 1 and math.isfinite(results["eval"]["return_mean"])
    assert (run / "videos" / "eval.mp4").stat().st_size > 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("source0/model_loss" in line for line in lines)
    assert json.loads((run / "config.json").read_text())["source"] == ["dmc:cartpole_balance"]
    assert list((run / "tb").iterdir())
    # The replay folder is a dataset (medium-replay) that records its render setting: training on it with
    # another render setting is refused before anything is built.
    replay = run / "replay" / "dmc-cartpole_balance"
    assert envs.read_dataset_info(replay)["render"] == "fast"
    capsys.readouterr()
    assert C.main(["--target", "dmc:cartpole_balance", "--target-data", str(replay), "--render", "default",
                   *tiny_flags(tmp_path / "train")]) == 2
    assert "recorded with render='fast'" in capsys.readouterr().err


def test_a_run_folder_holds_one_kind_of_run_and_only_its_own_files_are_touched(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "notes").mkdir(parents=True)
    (run / "notes" / ".draft.tmp.txt").write_text("mine")  # named like a torn file, in no folder the run writes
    assert C.main(online_flags(run, steps=20)) == 0
    assert (run / "notes" / ".draft.tmp.txt").read_text() == "mine"
    capsys.readouterr()
    assert C.main(["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup", *tiny_flags(run)]) == 2
    assert "is of a `coworld.py online` run, not of train" in capsys.readouterr().err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "target": state["sources"][0]}, tmp_path / "train.pt")  # a train run's has a target
    with pytest.raises(C.ConfigError, match="is of a `coworld.py train` run, not of online"):
        C.read_checkpoint(tmp_path / "train.pt", C.parse_args(online_flags(run, steps=20))[1], "online")
    for damage in (b'{"env": "dmc', b"{}", b"\xff"):  # a damaged results.json: the finished run evaluates again
        (run / "results.json").write_bytes(damage)
        assert C.main(online_flags(run, steps=20)) == 0
        assert "results.json is damaged" in capsys.readouterr().out
        assert json.loads((run / "results.json").read_text())["eval"]["episodes"] == 1
    # A run killed before its first checkpoint leaves config.json, which names its command: still refused.
    (run / "checkpoint.pt").rename(tmp_path / "online.pt")
    config = (run / "config.json").read_text()
    assert C.main(["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup", *tiny_flags(run)]) == 2
    assert "is of a `coworld.py online` run, not of train" in capsys.readouterr().err
    assert (run / "config.json").read_text() == config and json.loads(config)["command"] == "online"
    (tmp_path / "online.pt").rename(run / "checkpoint.pt")
    # A folder holding what a run writes, but not the config.json it writes first, is not a run's: left as it is.
    other = tmp_path / "other"
    (other / "tb").mkdir(parents=True)
    (other / "tb" / "events.important").write_text("precious")
    (other / "metrics.jsonl").write_text("line\n")
    assert C.main(online_flags(other, steps=20)) == 2
    assert f"{other} holds metrics.jsonl, tb but no config.json" in capsys.readouterr().err
    assert (other / "tb" / "events.important").read_text() == "precious"
    assert (other / "metrics.jsonl").read_text() == "line\n"
    for damage in (b"[]", b"\xff"):
        (run / "config.json").write_bytes(damage)
        with pytest.raises(C.ConfigError, match="config.json: damaged"):
            C.parse_args(["evaluate", "--logdir", str(run)])


def test_ewc_without_a_source_episode_names_the_flag(tmp_path, capsys):
    argv = [*offline_flags(tmp_path / "run", **{"pretrain-steps": 2}), "--method", "dv2-finetune-ewc",
            "--source", "dmc:cartpole_balance"]
    assert C.main(argv) == 2
    assert "no source episode to train on; its 2 pretraining steps ended none: raise --pretrain-steps" in (
        capsys.readouterr().err)


def test_online_run_stops_at_the_stop_return(tmp_path):
    # The medium-replay recipe: stop once the last 5 episodes average the given return (any return here).
    run = tmp_path / "run"
    argv = ["online", "--env", "dmc:cartpole_balance", "--steps", "1000", "--stop-return=-1e9", *tiny_flags(run)]
    assert C.main(argv) == 0
    assert len(list((run / "replay" / "dmc-cartpole_balance").glob("*.npz"))) == 5  # 5 episodes of 20 steps
    assert json.loads((run / "results.json").read_text())["env_steps"] == {"dmc:cartpole_balance": 100}


def test_stop_return_stops_the_online_command_only():
    cfg = small_cfg(stop_return=3.0)
    for command, stops in (("online", True), ("train", False)):
        run = types.SimpleNamespace(cfg=cfg, command=command, progress={"episodes": [[3.0] * 5]})
        assert C.Run.reached_stop_return(run, 0) == stops
    # The mean of the last five episodes: not the best one, not the last one, not an earlier stretch.
    for episodes, stops in (([0, 0, 0, 0, 10], False), ([9, 9, 9, 9, 9, 0, 0, 0, 0, 0], False),
                            ([0, 3, 3, 3, 3, 3], True), ([3, 3, 3, 3], False)):
        run = types.SimpleNamespace(cfg=cfg, command="online", progress={"episodes": [episodes]})
        assert C.Run.reached_stop_return(run, 0) == stops, episodes


def test_a_stop_request_is_honoured_at_the_end_of_a_loop():
    # The end of a loop is a safe point: a stop asked for during an online stage's last, unfinished episode (no
    # safe point left inside the loop) stops there, with a checkpoint, and not an episode of the next loop later.
    saves = []
    run = types.SimpleNamespace(cursor=0, progress={"steps": 0}, saved=(0, 0), cfg=small_cfg(), stop_requested=None,
                                stop_signal=signal.SIGTERM, updates=lambda: 0, evaluate_periodically=lambda: None,
                                share_cores=lambda: None)
    run.save = lambda: (saves.append(run.progress["steps"]), setattr(run, "saved", (run.progress["steps"], 0)))
    run.check_stop = lambda now=False: C.Run.check_stop(run, now)
    with pytest.raises(C.Interrupted):
        for step in C.Run.steps(run, 3, "online stage", safe=lambda: False):
            if step == 1:
                run.stop_requested = "safe"
    assert run.progress["steps"] == 3 and saves == [3]


def test_periodic_evaluation_logs_learning_curves_without_moving_the_training(tmp_path):
    assert C.main(offline_flags(tmp_path / "a", K1=4, rounds=2, **{"eval-every": 3})) == 0
    assert C.main(offline_flags(tmp_path / "b", K1=4, rounds=2, **{"eval-every": 0})) == 0
    log = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
           for run in "ab"}
    evals = [line for line in log["a"] if "eval/return_mean" in line]
    assert [line["step"] for line in evals] == [3, 6, 8]  # every 3 target updates, then the final evaluation
    assert all({"eval/return_std", "eval/value_estimate", "eval/true_value"} <= line.keys() for line in evals)
    training = {run: [{k: v for k, v in line.items() if k != "time"} for line in log[run]
                      if "target/model_loss" in line] for run in "ab"}
    assert training["a"] == training["b"]  # its own random streams: training computes the same with or without it


def test_videos_are_written_whole_and_fall_back_to_a_gif(tmp_path, monkeypatch):
    import imageio
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    C.write_video(tmp_path / "eval.mp4", frames)
    assert (tmp_path / "eval.mp4").stat().st_size > 0 and sorted(os.listdir(tmp_path)) == ["eval.mp4"]
    save = imageio.mimsave

    def no_ffmpeg(path, *args, **kwargs):
        if str(path).endswith(".mp4"):
            raise ValueError("Could not find a backend to open the mp4")
        return save(path, *args, **kwargs)
    monkeypatch.setattr(imageio, "mimsave", no_ffmpeg)
    C.write_video(tmp_path / "b" / "eval.mp4", frames)
    assert sorted(os.listdir(tmp_path / "b")) == ["eval.gif"]

    def full_disk(path, *args, **kwargs):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(imageio, "mimsave", full_disk)
    with pytest.raises(OSError, match="No space left"):  # a real failure is not hidden behind a gif
        C.write_video(tmp_path / "c" / "eval.mp4", frames)
    assert os.listdir(tmp_path / "c") == []  # and leaves no half-written file


def test_evaluate_reproduces_the_runs_results(tmp_path, capsys):
    argv = offline_flags(tmp_path / "run", **{"eval-episodes": 2})
    assert C.main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())["eval"]
    for _ in range(2):  # a function of the weights and the seed: the same numbers each time
        capsys.readouterr()
        assert C.main(["evaluate", *argv]) == 0
        assert json.loads(capsys.readouterr().out) == results
    # The run folder alone is enough, on any precision (acting runs without autocast); a flag that contradicts
    # the run's is refused.
    capsys.readouterr()
    assert C.main(["evaluate", "--logdir", str(tmp_path / "run"), "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out) == results
    assert C.main(["evaluate", "--logdir", str(tmp_path / "run"), "--beta2", "0.5"]) == 2
    assert "beta2 (" in capsys.readouterr().err
    # A finished run started again with another evaluation count keeps its results and its config.json; one that
    # must evaluate again (its results.json gone, as when a run is resumed before its final evaluation) writes
    # both with the new count, so the folder alone still reproduces results.json.
    for episodes, fresh in ((3, False), (3, True)):
        if fresh:
            (tmp_path / "run" / "results.json").unlink()
        assert C.main(offline_flags(tmp_path / "run", **{"eval-episodes": episodes})) == 0
        results = json.loads((tmp_path / "run" / "results.json").read_text())["eval"]
        assert json.loads((tmp_path / "run" / "config.json").read_text())["eval_episodes"] == (3 if fresh else 2)
        assert results["episodes"] == (3 if fresh else 2)
        capsys.readouterr()
        assert C.main(["evaluate", "--logdir", str(tmp_path / "run")]) == 0
        assert json.loads(capsys.readouterr().out) == results
    (tmp_path / "run" / "config.json").write_text("{")
    assert C.main(["evaluate", "--logdir", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run' / 'config.json'}: damaged" in capsys.readouterr().err


def test_wandb_logs_the_same_scalars_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert C.main([*online_flags(tmp_path / "run", steps=20), "--wandb", "coworld-test"]) == 0
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_without_the_package_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert C.main([*online_flags(tmp_path / "run", steps=20), "--wandb", "p"]) == 2
    assert "--wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


# ---- Baselines and ablations (App. D) ----


def test_action_mapping_between_four_and_five_dimensions():
    a4 = np.array([[0.1, -0.2, 0.3, -0.4]], np.float32)
    a5 = C.pad_action(a4, 5)
    assert a5.shape == (1, 5) and a5[0, 4] == 0 and np.array_equal(a5[:, :4], a4)
    assert np.array_equal(C.pad_action(a5, 5), a5)
    # Through the collector: a 5-d agent acting in a 4-d environment stores the first four dimensions, each
    # action beside the image it led to (zeros beside the reset frame).
    env = envs.make_env("metaworld:window-close", max_steps=3, render="fast")
    added = []
    collector = C.Collector(lambda: env, type("R", (), {"add": lambda self, e: added.append(e)})(), 5, lambda: 7)
    for t in range(3):
        collector.step(None, random_policy=True, rng=np.random.default_rng(t))
    env.close()
    actions = [np.zeros(4, np.float32)] + [np.random.default_rng(t).uniform(-1, 1, 5)[:4] for t in range(3)]
    np.testing.assert_allclose(added[0]["action"], np.stack(actions), rtol=1e-6)


def test_offline_dv2_draws_a_prior_member_for_each_filtering_step():
    # V-D4RL's filtering step draws a prior member in its img_step, one per time step and shared by the batch,
    # from the run's torch RNG (so a resumed run draws the same): the KL term is the mean of each step's own
    # member's KL, and a member's prior gets gradient from its steps only.
    cfg = small_cfg(free_nats=0.0)  # no free nats, so the KL's gradient is never clipped away
    agent = C.Agent(cfg, 5, ensemble=3)
    batch = fake_batch(cfg, 5, T=4)
    B, T = batch["is_first"].shape
    trained_counts = []
    for seed in range(6):
        agent.zero_grad()
        torch.manual_seed(seed)
        loss, terms, _, _ = C.world_model_loss(agent.wm, batch, cfg)
        loss.backward()
        trained = {i for i, prior in enumerate(agent.wm.rssm.priors)
                   if prior[0].weight.grad is not None and prior[0].weight.grad.abs().sum() > 0}
        torch.manual_seed(seed)  # the same draws, by hand: the posterior's samples, then one member per step
        with torch.no_grad():
            _, (h, _), post, _ = agent.wm.observe(batch)
            members = torch.randint(3, (T,))
            every = agent.wm.rssm.prior_logits(h)  # (3, B, T, S, C): every member
        chosen = every[members, :, torch.arange(T)].transpose(0, 1)  # (B, T, S, C): step t under members[t]
        assert trained == set(members.tolist()), (trained, members)
        assert float(terms["kl"]) == pytest.approx(float(C.kl_loss(post, chosen, 0.8, 0.0)[1]), rel=1e-5)
        trained_counts.append(len(trained))
    assert max(trained_counts) > 1  # members differ from step to step


def test_offline_dv2_steps_compute_one_prior_member():
    # An imagination step samples z from one member, so it runs that member's head alone; the update's
    # KL runs each drawn member's head over its own time steps. Only the penalty (ensemble_disagreement)
    # runs every head on every state.
    cfg = small_cfg()
    torch.manual_seed(0)
    agent = C.Agent(cfg, 5, ensemble=3)
    calls = []
    for i, member in enumerate(agent.wm.rssm.priors):
        member.register_forward_hook(lambda module, inputs, output, i=i: calls.append((i, inputs[0].shape[:-1])))
    h, z = torch.randn(6, cfg.deter), torch.zeros(6, cfg.stoch * cfg.classes)
    C.imagine(agent.wm, agent.actor, h, z, cfg.horizon)
    assert len(calls) == cfg.horizon and all(shape == (6,) for _, shape in calls), calls
    assert len({i for i, _ in calls}) > 1  # the member is drawn again at every step
    calls.clear()
    C.world_model_loss(agent.wm, fake_batch(cfg, 5, B=2, T=6), cfg)
    assert len({i for i, _ in calls}) == len(calls) > 1, calls  # each drawn member runs once, on its own steps
    assert all(shape[0] == 2 for _, shape in calls) and sum(shape[1] for _, shape in calls) == 6, calls


def test_offline_dv2_penalty_by_hand():
    # Two prior members with fixed logits: uniform, and 3:1:...:1 in every latent. Each member's probabilities
    # lie ||p0 - p1|| / 2 from their average; imagined rewards drop by penalty times that.
    cfg = small_cfg(penalty=10.0)
    torch.manual_seed(0)
    agent = C.Agent(cfg, 5, ensemble=2)
    S, K = cfg.stoch, cfg.classes
    with torch.no_grad():
        for member, first in zip(agent.wm.rssm.priors, (0.0, math.log(3))):
            member[-1].weight.zero_()
            member[-1].bias.copy_(F.one_hot(torch.zeros(S, dtype=torch.long), K).flatten() * first)
    p0, p1 = np.full(K, 1 / K), np.array([3] + [1] * (K - 1)) / (K + 2)
    expected = math.sqrt(S * ((p0 - p1) ** 2).sum()) / 2
    torch.testing.assert_close(C.ensemble_disagreement(agent.wm.rssm, torch.randn(7, cfg.deter)),
                               torch.full((7,), expected))
    h, z = torch.randn(6, cfg.deter), torch.zeros(6, S * K)
    rewards = []
    for penalty in (0.0, 10.0):
        torch.manual_seed(1)
        _, metrics = C.behaviour_losses(agent, h, z, torch.zeros(6, dtype=torch.bool),
                                        dataclasses.replace(cfg, penalty=penalty))
        rewards.append(float(metrics["imag_reward"]))
    assert rewards[0] - rewards[1] == pytest.approx(10 * expected, rel=1e-4)


def test_ewc_penalty_by_hand():
    # lambda / 2 * sum_i F_i (theta_i - theta*_i)^2: zero at theta*, gradient lambda * F * (theta - theta*).
    anchor = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    fisher = [torch.tensor([0.2, 3.0]), torch.tensor([[4.0]])]
    at_anchor = [a.clone().requires_grad_() for a in anchor]
    assert C.ewc_penalty(at_anchor, anchor, fisher, 10.0).item() == 0.0
    theta = [torch.tensor([2.0, -1.0], requires_grad=True), torch.tensor([[0.0]], requires_grad=True)]
    penalty = C.ewc_penalty(theta, anchor, fisher, 10.0)
    assert penalty.item() == pytest.approx(5.0 * (0.2 * 1.0 + 3.0 * 1.0 + 4.0 * 0.25))
    penalty.backward()
    torch.testing.assert_close(theta[0].grad, 10.0 * torch.tensor([0.2, 3.0]) * torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(theta[1].grad, 10.0 * torch.tensor([[4.0]]) * torch.tensor([[-0.5]]))


def test_ewc_fisher_is_each_losss_squared_gradient_per_sequence_and_enters_every_update():
    cfg = small_cfg(ewc_lambda=5.0)
    agent = C.Agent(cfg, 5).build_optimisers()
    batches = [fake_batch(cfg, 5, B=2, T=4, seed=i) for i in range(2)]
    torch.manual_seed(0)
    C.elastic_weight_consolidation(agent, batches, cfg)
    torch.manual_seed(0)  # the same draws, by hand: each network's own loss on one sequence, squared gradient
    expected = {name: [torch.zeros_like(p) for p in params] for name, params in agent.params.items()}
    mean_gradient_squared = [torch.zeros_like(p) for p in agent.params["critic"]]
    for batch in batches:
        for i in range(2):
            sequence = {key: value[i:i + 1] for key, value in batch.items()}
            wm_loss, _, (h, z), _ = C.world_model_loss(agent.wm, sequence, cfg)
            losses, _ = C.behaviour_losses(agent, h, z, sequence["is_terminal"], cfg)
            for name, loss in (("model", wm_loss), ("actor", losses["actor"]), ("critic", losses["critic"])):
                grads = torch.autograd.grad(loss, agent.params[name], retain_graph=True, allow_unused=True)
                for e, g in zip(expected[name], grads):
                    e += 0 if g is None else g ** 2 / 4
    for batch in batches:  # what a whole batch's mean gradient, squared, would give instead
        wm_loss, _, (h, z), _ = C.world_model_loss(agent.wm, batch, cfg)
        losses, _ = C.behaviour_losses(agent, h, z, batch["is_terminal"], cfg)
        for m, g in zip(mean_gradient_squared, torch.autograd.grad(losses["critic"], agent.params["critic"])):
            m += g ** 2 / 2
    assert not torch.allclose(mean_gradient_squared[0], expected["critic"][0], rtol=1e-2)
    for name in expected:
        for got, want in zip(agent.ewc["fisher"][name], expected[name]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)
    assert all(torch.equal(a, p) for a, p in zip(agent.ewc["anchor"]["model"], agent.params["model"]))
    # Away from the anchor every network's loss carries the penalty: one critic parameter moved by d adds
    # lambda / 2 * F * d^2 to what the critic's backward sees.
    with torch.no_grad():
        agent.params["critic"][0][0, 0] += 0.5
    fisher = float(agent.ewc["fisher"]["critic"][0][0, 0])
    agent.backward("critic", torch.zeros(()) * agent.params["critic"][0].sum())
    assert float(agent.pending["critic"]) == pytest.approx(0.5 * 5.0 * fisher * 0.25, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("method", ["offline-dv2", "dv2-finetune", "dv2-finetune-ewc"])
def test_baselines_run(tmp_path, monkeypatch, method):
    target_update, entered = C.target_update, []

    def check_target(target, batch, cfg, sources=()):  # what the target's first offline update starts from
        if not entered:
            if method.startswith("dv2-finetune"):  # the pretrained source's weights, and no source in the update
                source = run_state["run"].sources[0].state_dict()
                entered.append(not sources and all(torch.equal(v, source[k]) for k, v in target.state_dict().items())
                               and (target.ewc is not None) == method.endswith("ewc"))
            else:  # no source at all, an ensemble of priors
                entered.append(not run_state["run"].sources and len(target.wm.rssm.priors) == 3)
        return target_update(target, batch, cfg, sources)

    run_state, algorithm1 = {}, C.algorithm1
    monkeypatch.setattr(C, "algorithm1", lambda run: (run_state.update(run=run), algorithm1(run))[1])
    monkeypatch.setattr(C, "target_update", check_target)
    run = tmp_path / method
    argv = ["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup", "--method", method,
            *tiny_flags(run, K1=2, K2=10, rounds=1, ensemble=3, **{"pretrain-steps": 30, "target-episodes": 2,
                                                                   "data-dir": tmp_path / "data", "ewc-batches": 2})]
    assert C.main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and math.isfinite(results["eval"]["return_mean"])
    assert entered == [True]


# ---- GPU smoke runs (skipped without CUDA) ----


@gpu
@pytest.mark.gpu
def test_gpu_bf16_updates():
    cfg = dataclasses.replace(small_cfg(), device="cuda", precision="bf16", compile="on")
    target, source = (C.Agent(cfg, 5).cuda().build_optimisers() for _ in range(2))
    batch = {k: v.cuda() for k, v in fake_batch(cfg, 5).items()}
    for _ in range(3):
        metrics, ok = C.target_update(target, batch, cfg, [source])
        assert ok and math.isfinite(float(metrics["model_loss"]))
        metrics, ok = C.source_update(source, batch, cfg, batch, eta=0.5)
        assert ok and math.isfinite(float(metrics["model_loss"]))


@gpu
@pytest.mark.gpu
def test_gpu_coworld_round(tmp_path):
    run = tmp_path / "run"
    argv = ["--source", "dmc:walker_walk", "--target", "dmc:walker_uphill",
            *tiny_flags(run, device="cuda", precision="bf16", K1=3, K2=20, rounds=2,
                        **{"pretrain-steps": 40, "target-episodes": 2, "data-dir": tmp_path / "data"})]
    assert C.main(argv) == 0
    assert json.loads((run / "results.json").read_text())["device"] == "cuda"
    assert C.main(argv) == 0  # resumes the finished run: CPU and CUDA random states come back from the device


# ---- Environments (envs.py): names, settings, OpenGL ----


def test_list_envs_reads_the_installed_packages():
    names = envs.list_envs()
    assert set(names) == {"metaworld", "robodesk", "dmc"}
    assert set(PAPER_METAWORLD) <= set(names["metaworld"]) and len(names["metaworld"]) == 50
    assert len(names["robodesk"]) == 18
    assert {"open_slide", "open_drawer", "push_green", "stack", "upright_block_off_table"} <= set(names["robodesk"])
    assert {"walker_walk", "cheetah_run", *DMC_VARIANTS} <= set(names["dmc"])


@pytest.mark.parametrize("name, listed", [
    ("window-close", "metaworld, robodesk, dmc"),
    ("gym:window-close", "metaworld, robodesk, dmc"),
    ("metaworld:window-clos", "window-close"),
    ("robodesk:open", "open_slide"),
    ("dmc:walker_flip", "walker_uphill"),
])
def test_unknown_names_list_the_valid_ones(name, listed):
    with pytest.raises(envs.EnvError, match=re.escape(listed)) as error:
        envs.make_env(name)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs", [{"render": "pretty"}, {"max_steps": 0}, {"max_steps": 2.5}])
def test_bad_settings_are_env_errors(kwargs):
    with pytest.raises(envs.EnvError):
        envs.make_env("dmc:walker_walk", **kwargs)


def test_gl_backend_is_chosen_before_any_simulator_import():
    code = ("import os, sys, envs; "
            "print(os.environ['MUJOCO_GL'], os.environ.get('PYOPENGL_PLATFORM'), 'mujoco' in sys.modules)")
    clean = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], env=clean, cwd=ROOT, capture_output=True, text=True, check=True)
    expected = "egl" if envs._nvidia_gpu_present() else "osmesa"
    assert out.stdout.split() == [expected, expected, "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "MUJOCO_GL": "egl"}, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["egl", "egl", "False"]  # an explicit choice wins


@pytest.mark.parametrize("backend, package", [("osmesa", "libosmesa6"), ("egl", "libegl1")])
def test_missing_gl_library_names_the_debian_package(monkeypatch, backend, package):
    import mujoco

    for error in (ImportError("Unable to load OpenGL library"),
                  mujoco.FatalError("an OpenGL platform library has not been loaded into this process")):
        def no_gl(*args, **kwargs):
            raise error

        monkeypatch.setattr(mujoco, "Renderer", no_gl)
        monkeypatch.setenv("MUJOCO_GL", backend)
        monkeypatch.setattr(envs.ctypes.util, "find_library", lambda name: None)  # the library is not installed
        with pytest.raises(envs.EnvError, match=f"apt-get install -y {package}"):
            envs.make_env("dmc:walker_walk")
        if backend == "egl":  # installed, yet it cannot start: the GPU driver's part is what is missing
            monkeypatch.setattr(envs.ctypes.util, "find_library", lambda name: f"lib{name}.so.1")
            with pytest.raises(envs.EnvError, match="NVIDIA driver's EGL library .* MUJOCO_GL=osmesa"):
                envs.make_env("dmc:walker_walk")


@pytest.mark.parametrize("name, cls", [("dmc:cartpole_balance", "DMCEnv"), ("robodesk:open_slide", "RoboDeskEnv")])
def test_a_camera_that_cannot_be_made_frees_the_simulator(monkeypatch, name, cls):
    import mujoco

    def no_renderer(*args, **kwargs):
        raise mujoco.FatalError("an OpenGL platform library has not been loaded into this process")

    freed, free = [], getattr(envs, cls)._free_sim
    monkeypatch.setattr(mujoco, "Renderer", no_renderer)
    monkeypatch.setattr(getattr(envs, cls), "_free_sim", lambda self: (freed.append(self._sim), free(self)))
    with pytest.raises(envs.EnvError):
        envs.make_env(name, render="fast")
    assert len(freed) == 1


def test_a_missing_python_package_names_the_pip_command():
    def missing():
        with envs._gl_errors():
            import a_simulator_that_is_not_installed  # noqa: F401
    with pytest.raises(envs.EnvError, match="a_simulator_that_is_not_installed is not installed.*pip install -r"):
        missing()


def test_a_package_version_mismatch_is_not_called_a_gl_problem(monkeypatch):
    import mujoco

    for error, name in [(ImportError("cannot import name 'Box' from 'gymnasium.spaces'", name="gymnasium.spaces"),
                         "gymnasium.spaces"),
                        (ImportError("/lib/libstdc++.so.6: version `GLIBCXX_3.4.32' not found"),
                         "a simulator package")]:
        def mismatch(*args, **kwargs):
            raise error

        monkeypatch.setattr(mujoco, "Renderer", mismatch)
        with pytest.raises(envs.EnvError, match=re.escape(f"cannot import {name} ({str(error)[:20]}") +
                           ".*pip install -r requirements.txt") as raised:
            envs.make_env("dmc:walker_walk")
        assert "OpenGL" not in str(raised.value)


def test_default_episode_lengths():
    for name, repeat in [("metaworld:window-close", 1), ("robodesk:open_slide", 1), ("dmc:walker_walk", 2)]:
        with envs.make_env(name, render="fast") as env:
            assert (env.max_steps, env.action_repeat) == (500, repeat), name


@pytest.mark.parametrize("name", ["metaworld:window-close", "robodesk:open_slide", "dmc:walker_walk"])
def test_reset_with_a_seed_starts_the_same_episode(name):
    # What a resumed run relies on to meet the episodes an uninterrupted one would.
    with envs.make_env(name, render="fast", max_steps=2) as env:
        first = env.reset(seed=3)["image"]
        env.step(np.ones(env.action_size))
        other = env.reset(seed=4)["image"]
        again = env.reset(seed=3)["image"]
    assert np.array_equal(first, again) and not np.array_equal(first, other)


# -- Meta-World


def test_metaworld_episode():
    with envs.make_env("metaworld:window-close", max_steps=4) as env:
        assert (env.name, env.action_size, env.render, env.has_success) == ("metaworld:window-close", 4, "default",
                                                                            True)
        observations = play(env)
        check_observations(env, observations, (0.0, 10.0))
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset()
        with pytest.raises(ValueError, match=r"expected \(4,\)"):
            env.step(np.zeros(5))
        assert env.step(np.full(4, 7.0))["image"].shape == (64, 64, 3)  # out-of-range actions are clipped


@pytest.mark.parametrize("render", envs.RENDERS)
def test_metaworld_image_is_upright(render):
    # Checked by eye on a saved PNG: upright, the wooden table fills the lower
    # left and the plain grey backdrop the upper left. The renderer's raw corner
    # view is upside down, with the red arm where the table should be.
    for seed in range(2):
        with envs.make_env("metaworld:window-close", seed=seed, render=render, max_steps=1) as env:
            image = env.reset()["image"].astype(int)
        red, green, blue = image[42:50, 6:20].reshape(-1, 3).mean(0)
        assert red > green + 10 and green > blue + 8 and red - green < 40, "lower left is not the wooden table"
        backdrop = image[2:10, 2:20].reshape(-1, 3).mean(0)
        assert backdrop.max() - backdrop.min() < 10 and backdrop.mean() > 110, "upper left is not the grey backdrop"


@pytest.mark.parametrize("task", PAPER_METAWORLD)
def test_metaworld_success_comes_from_the_task_not_the_time_limit(task):
    with envs.make_env(f"metaworld:{task}", render="fast", max_steps=200) as env:  # the scripted expert: 40-90 steps
        obs = env.reset()
        while not obs["success"] and not obs["is_last"]:
            obs = env.step(env.expert_action())
        assert obs["success"] and not obs["is_last"]
    with envs.make_env(f"metaworld:{task}", render="fast", max_steps=3) as env:
        observations = play(env)
        assert observations[-1]["is_last"] and not any(obs["success"] for obs in observations)


def test_metaworld_seeding():
    def first_images(seed):
        with envs.make_env("metaworld:window-close", seed=seed, render="fast", max_steps=3) as env:
            goals = []
            images = []
            for _ in range(2):
                images += [obs["image"] for obs in play(env, np.random.default_rng(1))]
                goals.append(env._sim._target_pos.copy())
            return np.stack(images), goals

    images_a, goals_a = first_images(0)
    images_b, goals_b = first_images(0)
    images_c, goals_c = first_images(1)
    assert np.array_equal(images_a, images_b)
    assert not np.allclose(goals_a[0], goals_c[0])  # different seeds, different initial goals
    assert not np.allclose(goals_a[0], goals_a[1])  # and a new goal at every reset


# -- RoboDesk and its scripted experts


def test_robodesk_episode():
    with envs.make_env("robodesk:open_slide", render="fast", max_steps=3) as env:
        assert (env.action_size, env.action_repeat, env.has_success) == (5, 1, True)
        check_observations(env, play(env), (0.0, 1.0))


@pytest.mark.parametrize("task", ["push_green", "open_drawer", "upright_block_off_table"])
def test_robodesk_paper_targets_step(task):
    with envs.make_env(f"robodesk:{task}", render="fast", max_steps=2) as env:
        observations = play(env)
        check_observations(env, observations, (0.0, 1.0))
        assert not observations[0]["success"]


def test_robodesk_default_look_is_the_packages_own_render():
    with envs.make_env("robodesk:open_slide", max_steps=2) as env, \
            envs.make_env("robodesk:open_slide", render="fast", max_steps=2) as fast:
        assert np.array_equal(env.reset()["image"], env._sim.render())  # bit-identical
        assert np.array_equal(env.step(np.full(5, 0.5))["image"], env._sim.render())
        assert not np.array_equal(env.reset()["image"], fast.reset()["image"])  # fast changes the look


def test_robodesk_success_is_the_tasks_own_function():
    with envs.make_env("robodesk:open_slide", render="fast", max_steps=5) as env:
        assert not env.reset()["success"]
        env._sim.physics.named.data.qpos["slide_joint"] = 0.6  # the slide fully open
        obs = env.step(np.zeros(5))
        assert obs["success"] and not obs["is_last"]


def test_robodesk_keeps_positions_at_reset():
    with envs.make_env("robodesk:upright_block_off_table", render="fast", max_steps=3) as env:
        env.reset()
        xpos = env._sim.physics.named.data.xpos
        at_reset = {key: xpos[key].copy() for key in ("ball", "upright_block", "flat_block")}
        env.step(np.array([0.0, 0.0, -1.0, 0.0, 0.0]))
        for key, position in env._sim.original_pos.items():
            assert not np.shares_memory(position, env._sim.physics.data.xpos)
            assert np.array_equal(position, at_reset[key])


def test_robodesk_seeding_leaves_the_global_rng_alone():
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    np.random.random()
    with envs.make_env("robodesk:open_slide", seed=0, render="fast", max_steps=1) as a, \
            envs.make_env("robodesk:open_slide", seed=0, render="fast", max_steps=1) as b, \
            envs.make_env("robodesk:open_slide", seed=1, render="fast", max_steps=1) as c:
        first_a = a.reset()["image"]
        second_a = a.reset()["image"]
        first_b = b.reset()["image"]  # interleaved resets of another env do not shift the stream
        first_c = c.reset()["image"]
    assert np.array_equal(np.random.random(2), expected[1:])
    assert np.array_equal(first_a, first_b)
    assert not np.array_equal(first_a, second_a)
    assert not np.array_equal(first_a, first_c)


def test_creating_and_closing_ten_robodesk_envs_finishes():
    # Each env also renders through the package (dm_control GL contexts), the
    # case that deadlocks at garbage collection unless close() frees the physics.
    code = ("import gc, numpy as np, envs\n"
            "for i in range(10):\n"
            "    env = envs.make_env('robodesk:open_slide', seed=i, render='fast', max_steps=2)\n"
            "    env.reset(); env.step(np.zeros(5)); env._sim.render()\n"
            "    env.close(); env.close(); del env; gc.collect()\n"
            "print('done')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]


# Seed and step budget per expert test: the seed's first success comes at step 65, 314, 292 and 640,
# so each budget leaves ~20% or more in hand. open_slide needs more than an episode's 500 steps:
# pushing against the slide's friction, the arm advances ~0.5-1 mm a step (README, Scripted experts).
ROBODESK_EXPERT_RUNS = {"push_green": (11, 120), "upright_block_off_table": (1, 400),
                        "open_drawer": (56, 400), "open_slide": (39, 770)}


@pytest.mark.parametrize("task", list(ROBODESK_EXPERT_RUNS))
def test_robodesk_expert_reaches_the_tasks_success(task):
    seed, steps = ROBODESK_EXPERT_RUNS[task]
    with envs.make_env(f"robodesk:{task}", render="fast", max_steps=steps) as env:
        obs = env.reset(seed=seed)
        assert not obs["success"]
        while not obs["success"] and not obs["is_last"]:
            obs = env.step(env.expert_action())
        assert obs["success"], f"no success in {steps} steps"
        assert env._sim._get_task_reward(task, "success")  # the package's own success function


def test_robodesk_expert_acts_the_same_under_both_render_settings():
    runs = {}
    for render in envs.RENDERS:
        with envs.make_env("robodesk:open_slide", render=render, max_steps=30) as env:
            obs, steps = env.reset(seed=3), []
            while not obs["is_last"]:
                action = env.expert_action()
                obs = env.step(action)
                steps.append((action.tolist(), obs["reward"], bool(obs["success"])))
            runs[render] = steps
    assert runs["default"] == runs["fast"]
    assert len({tuple(a) for a, _, _ in runs["fast"]}) > 1  # the expert acts, not a constant


def test_robodesk_expert_for_a_task_without_one_names_the_tasks_with_one():
    with envs.make_env("robodesk:stack", render="fast", max_steps=2) as env:
        env.reset()
        with pytest.raises(envs.EnvError, match="robodesk:open_slide, robodesk:push_green, robodesk:open_drawer, "
                                                "robodesk:upright_block_off_table"):
            env.expert_action()


def test_has_expert():
    assert envs.has_expert("metaworld:window-close") and envs.has_expert("metaworld:door-close")
    for task in ("open_slide", "push_green", "open_drawer", "upright_block_off_table"):
        assert envs.has_expert(f"robodesk:{task}")
    assert not envs.has_expert("robodesk:stack") and not envs.has_expert("robodesk:push_red")
    assert not envs.has_expert("dmc:walker_walk") and not envs.has_expert("dmc:walker_uphill")
    with pytest.raises(envs.EnvError, match="unknown"):
        envs.has_expert("robodesk:open")


# -- DeepMind Control and the paper's modified tasks


def test_dmc_episode():
    with envs.make_env("dmc:walker_walk", max_steps=5) as env:
        assert (env.action_size, env.action_repeat, env.has_success) == (6, 2, False)
        check_observations(env, play(env), (0.0, 2.0))


def test_dmc_seeding():
    def images(seed):
        with envs.make_env("dmc:cheetah_run", seed=seed, max_steps=3) as env:
            return np.stack([obs["image"] for obs in play(env)])

    assert np.array_equal(images(0), images(0))
    assert not np.array_equal(images(0), images(1))


def test_a_readme_named_quadruped_task_runs():
    with envs.make_env("dmc:quadruped_run", render="fast", max_steps=3) as env:
        assert len(play(env)) == 4


def _relative_rotation_degrees(stock_quat, modified_quat):
    """Angle and axis of the rotation taking the stock camera frame to the modified one."""
    import mujoco

    inverse, relative = np.zeros(4), np.zeros(4)
    mujoco.mju_negQuat(inverse, stock_quat)
    mujoco.mju_mulQuat(relative, inverse, modified_quat)
    relative *= np.sign(relative[0])
    angle = np.degrees(2 * np.arctan2(np.linalg.norm(relative[1:]), relative[0]))
    return angle, relative[1:] / max(np.linalg.norm(relative[1:]), 1e-12)


@pytest.mark.parametrize("variant", DMC_VARIANTS)
def test_modified_dmc_task(variant):
    domain, change = variant.split("_")
    stock_name = {"walker": "dmc:walker_walk", "cheetah": "dmc:cheetah_run"}[domain]
    with envs.make_env(stock_name, max_steps=6) as stock, envs.make_env(f"dmc:{variant}", max_steps=6) as modified:
        s, m = stock._sim.physics, modified._sim.physics
        assert modified.action_size == stock.action_size == 6
        floor = {"walker": "floor", "cheetah": "ground"}[domain]
        assert m.named.model.geom_size[floor][0] == 1000 and s.named.model.geom_size[floor][0] < 1000
        stock_camera, camera = s.model.cam_quat[0], m.model.cam_quat[0]
        if change in ("uphill", "downhill"):
            sign = -1 if change == "uphill" else 1
            np.testing.assert_allclose(m.model.opt.gravity, [sign * 2.54, 0, -9.47])
            assert abs(np.linalg.norm(m.model.opt.gravity) - 9.81) < 0.01  # same |g|, tilted 15 degrees
            angle, axis = _relative_rotation_degrees(stock_camera, camera)
            assert abs(angle - 15) < 0.01 and abs(axis[2] - sign) < 1e-6  # a roll about the view axis
            assert m.model.id2name(0, "camera") == "side"  # the camera the images come from
        else:
            np.testing.assert_allclose(m.model.opt.gravity, s.model.opt.gravity)
            np.testing.assert_allclose(camera, stock_camera)
            foot = {"walker": "right_foot", "cheetah": "ffoot"}[domain]
            np.testing.assert_allclose(m.named.model.geom_size[foot][:2], [0.001, 0.001])
            assert s.named.model.geom_size[foot][0] > 0.01
            assert m.model.nu == s.model.nu == 6  # the foot's actuator is kept
        actions = np.random.default_rng(3).uniform(-1, 1, (6, 6))
        stock_run, modified_run = play(stock, actions=actions), play(modified, actions=actions)
        assert not np.allclose(s.data.qpos, m.data.qpos)  # same actions, different trajectory
        assert not np.array_equal(stock_run[-1]["image"], modified_run[-1]["image"])


# ---- Offline data: episodes on disk, the replay, collecting ----


def test_episode_round_trip(tmp_path):
    episode = synthetic_episode(7)
    episode["success"] = np.arange(7) > 4
    path = envs.save_episode(tmp_path, episode)
    assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{32}-7\.npz", path.name)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary file permissions
    loaded = envs.load_episode(path)
    assert set(loaded) == set(episode)
    for key, value in episode.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half an episode")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        envs.save_episode(tmp_path, synthetic_episode(3))
    assert list(tmp_path.iterdir()) == []

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(envs, "open", no_space, raising=False)  # the temporary file cannot even be created
    with pytest.raises(OSError, match="No space left"):  # the user sees why, not a missing temporary file
        envs.save_episode(tmp_path, synthetic_episode(3))


def _drop(key):
    return lambda episode: episode.pop(key)


def _set(key, value):
    return lambda episode: episode.__setitem__(key, value(episode[key]))


@pytest.mark.parametrize("corrupt, message", [
    (_drop("reward"), "missing key"),
    (lambda e: (e.pop("discount"), e.pop("is_terminal")), "missing key(s) discount"),
    (_set("image", lambda v: v[..., 0]), "image must be uint8"),
    (_set("image", lambda v: v.astype(np.float32)), "image must be uint8"),
    (_set("action", lambda v: v[:, 0]), "action must be float"),
    (_set("action", lambda v: v[:, :0]), "action must be float (N, A), A >= 1"),
    (_set("image", lambda v: v[:, :0]), "image must be uint8"),
    (_set("reward", lambda v: v.astype(np.int64)), "reward must be float"),
    (_set("is_last", lambda v: v.astype(np.float32) / 2), "is_last must be bool"),
    (_set("discount", lambda v: v * 2), "discount must lie in [0, 1]"),
    (_set("is_terminal", lambda v: np.arange(len(v)) == len(v) - 1), "is_terminal and discount == 0"),
    (lambda e: (e["is_terminal"].__setitem__(2, True), e["discount"].__setitem__(2, 0.0)), "is_terminal at step 2"),
    (_set("reward", lambda v: v[:-1]), "unequal lengths"),
    (_set("is_first", lambda v: np.zeros_like(v)), "is_first"),
    (_set("reward", lambda v: np.where(np.arange(len(v)) == 2, np.nan, v)), "reward contains NaN"),
    (_set("action", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 5, np.inf, v)), "action contains NaN"),
])
def test_load_episode_rejects_bad_files(tmp_path, corrupt, message):
    episode = synthetic_episode(5)
    corrupt(episode)
    path = tmp_path / "bad.npz"
    np.savez_compressed(path, **episode)
    with pytest.raises(envs.DatasetError, match=re.escape(message)) as error:
        envs.load_episode(path)
    assert str(error.value).startswith(str(path))


def test_load_episode_rejects_unreadable_files(tmp_path):
    good = envs.save_episode(tmp_path, synthetic_episode(20))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.npz"
    text.write_text("not an episode")
    for path in (truncated, text):
        with pytest.raises(envs.DatasetError, match=re.escape(str(path))):
            envs.load_episode(path)


def test_vd4rl_shaped_episode_loads(tmp_path):
    episode = synthetic_episode(6, action_size=6)
    del episode["is_terminal"]
    episode["discount"][-1] = 0.0
    for key in ("is_first", "is_last"):
        episode[key] = episode[key].astype(np.uint8)
    episode["success"] = (np.arange(6) == 5).astype(np.float32)  # Meta-World's info["success"] is a float
    np.savez_compressed(tmp_path / "20220109T012015-0123456789abcdef0123456789abcdef-999.npz", **episode)
    (loaded,) = envs.load_dataset(tmp_path, action_size=6)
    assert loaded["is_first"].dtype == loaded["is_terminal"].dtype == bool
    assert loaded["is_terminal"].tolist() == loaded["success"].tolist() == [False] * 5 + [True]
    assert len(loaded["reward"]) == 6  # from the arrays, not the file name


def test_dreamerv2_replay_episode_without_discount_loads(tmp_path):
    # DreamerV2's own replay folders store is_terminal and no discount: discount = 1 - is_terminal.
    episode = synthetic_episode(6)
    del episode["discount"]
    episode["is_terminal"] = (np.arange(6) == 5).astype(np.uint8)
    np.savez_compressed(tmp_path / "20220109T012015-0123456789abcdef0123456789abcdef-6.npz", **episode)
    (loaded,) = envs.load_dataset(tmp_path)
    assert loaded["discount"].dtype == np.float32 and loaded["discount"].tolist() == [1.0] * 5 + [0.0]


def test_load_dataset_errors(tmp_path):
    with pytest.raises(envs.DatasetError, match="no such folder"):
        envs.load_dataset(tmp_path / "missing")
    with pytest.raises(envs.DatasetError, match="no episodes"):
        envs.load_dataset(tmp_path)
    path = envs.save_episode(tmp_path, synthetic_episode(4, action_size=6))
    with pytest.raises(envs.DatasetError, match=re.escape(f"{path}: action size 6, expected 4")):
        envs.load_dataset(tmp_path, action_size=4)
    with pytest.raises(envs.DatasetError, match="image size"):
        envs.load_dataset(tmp_path, image_size=84)
    other = envs.save_episode(tmp_path, synthetic_episode(4, action_size=4))  # after the first in name order
    with pytest.raises(envs.DatasetError, match=re.escape(f"{other}: action size 4, where {path.name} has 6")):
        envs.load_dataset(tmp_path)  # no action size asked for: the folder's first episode sets it
    other.unlink()
    (tmp_path / "broken.npz").write_bytes(b"junk")
    with pytest.raises(envs.DatasetError, match="broken.npz"):
        envs.load_dataset(tmp_path)


def test_atomic_write_puts_the_file_and_its_rename_on_disk(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync
    monkeypatch.setattr(envs.os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                      fsync(fd)))
    envs.atomic_write(tmp_path / "a.json", lambda file: file.write(b"{}"))
    assert synced[0].startswith(str(tmp_path / ".a.json.")) and synced[1:] == [str(tmp_path)]
    assert (tmp_path / "a.json").read_bytes() == b"{}"


def test_episode_names_are_utc_so_a_clock_set_back_keeps_their_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        envs.save_episode(tmp_path, synthetic_episode(3))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    (path,) = tmp_path.glob("*.npz")
    named = datetime.datetime.strptime(path.name[:15], "%Y%m%dT%H%M%S").replace(tzinfo=datetime.timezone.utc)
    assert abs(named.timestamp() - time.time()) < 60


def test_dataset_info_round_trip(tmp_path):
    assert envs.read_dataset_info(tmp_path) is None
    info = {"env": "robodesk:open_slide", "render": "fast", "policy": "random", "seed": 3,
            "action_size": 5, "episodes": 2, "steps": 1000}
    envs.write_dataset_info(tmp_path, info)
    assert envs.read_dataset_info(tmp_path) == info
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]
    (tmp_path / "dataset.json").write_text("{broken")
    with pytest.raises(envs.DatasetError, match="dataset.json"):
        envs.read_dataset_info(tmp_path)


def test_odd_but_usable_data_is_said_once(tmp_path, capsys):
    episodes = [synthetic_episode(12, action_size=1, seed=i) for i in range(3)]
    episodes[1]["action"] *= 1e6
    data = write_dataset(tmp_path / "data", episodes)
    loaded = list(envs.iter_dataset(data, action_size=1, seq_len=16))
    out = capsys.readouterr().out
    assert out.count("note:") == 2 and "actions of 1 episode(s) lie outside [-1, 1]" in out
    assert "3 of 3 episodes are shorter than a training window of 16" in out
    assert np.abs(loaded[1]["action"]).max() == 1.0


def test_the_offline_dataset_is_loaded_whole_whatever_the_replay_capacity(tmp_path):
    data = write_dataset(tmp_path / "data", [synthetic_episode(20, action_size=1, seed=i) for i in range(2)])
    cfg = C.parse_args(["--target", "dmc:cartpole_swingup", "--target-data", str(data), "--replay-capacity", "25",
                        "--logdir", str(tmp_path / "run")])[1]
    assert C.load_target_data(cfg).num_episodes == 2


def _numbered_replay(lengths, **kwargs):
    """A replay whose rewards count the time steps of the whole stream."""
    replay, start = envs.Replay(**kwargs), 0
    for length in lengths:
        replay.add(synthetic_episode(length, reward=np.arange(start, start + length)), save=False)
        start += length
    return replay


def test_replay_windows_cross_into_the_next_episode():
    lengths = (3, 7, 5)
    replay = _numbered_replay(lengths)
    total = sum(lengths)
    assert (replay.num_steps, replay.num_episodes) == (total, 3)
    batch = replay.sample(64, 12, np.random.default_rng(0))  # longer than every episode
    assert batch["image"].shape == (64, 12, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["action"].shape == (64, 12, 4) and batch["action"].dtype == np.float32
    for key in ("reward", "discount", "is_first", "is_last", "is_terminal"):
        assert batch[key].shape == (64, 12), key
    episode_starts = {0, 3, 10}
    for row in range(64):
        steps = batch["reward"][row].astype(int)
        assert np.array_equal(steps, (steps[0] + np.arange(12)) % total)  # one contiguous stream
        assert batch["is_first"][row].tolist() == [int(s) in episode_starts for s in steps]  # seams marked
    assert len(set(batch["reward"][:, 0].tolist())) > 5  # starts are spread


def test_a_closed_replay_says_so(tmp_path):
    replay = envs.Replay(capacity=10_000, spill_dir=tmp_path / "spill")
    replay.add(synthetic_episode(10), save=False)
    replay.close()
    assert (replay.num_steps, replay.num_episodes) == (0, 0)
    for use in (lambda: replay.sample(2, 5, np.random.default_rng(0)),
                lambda: replay.add(synthetic_episode(10), save=False)):
        with pytest.raises(RuntimeError, match="this Replay was closed"):
            use()


def test_replay_memory_stays_flat():
    replay = _numbered_replay([50] * 4)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        replay.sample(8, 16, rng)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            replay.sample(8, 16, rng)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024  # one batch is ~400 KB; 300 batches would be 120 MB


def test_replay_images_on_disk_sample_the_same_and_leave_memory_flat(tmp_path):
    in_memory, on_disk = envs.Replay(capacity=10_000), envs.Replay(capacity=10_000, spill_dir=tmp_path / "spill")
    tracemalloc.start()
    try:
        for seed in range(20):  # 20 x 40 frames of 12 KB: 9.8 MB of images
            on_disk.add(synthetic_episode(40, seed=seed), save=False)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1024 * 1024, f"the disk replay holds {held} bytes"
    for seed in range(20):
        in_memory.add(synthetic_episode(40, seed=seed), save=False)
    assert list((tmp_path / "spill").iterdir()) == []  # an anonymous file: gone with the process
    for seed in range(3):
        a, b = (r.sample(16, 50, np.random.default_rng(seed)) for r in (in_memory, on_disk))  # windows cross seams
        for key in envs.EPISODE_KEYS:
            assert np.array_equal(a[key], b[key]) and a[key].dtype == b[key].dtype, key
    assert np.array_equal(np.asarray(on_disk._episodes[3]["image"]), in_memory._episodes[3]["image"])


def test_replay_resumes_from_its_folder_one_episode_at_a_time(tmp_path):
    for seed in range(20):  # 20 x 40 frames of 12 KB: 9.8 MB of images
        envs.save_episode(tmp_path / "replay", synthetic_episode(40, seed=seed))
    tracemalloc.start()
    try:
        resumed = envs.Replay(tmp_path / "replay", capacity=10_000, spill_dir=tmp_path / "spill")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert resumed.num_steps == 800
    assert peak < 2 * 1024 * 1024, f"resuming held {peak} bytes at once"


def test_replay_capacity_saving_and_resume(tmp_path):
    replay = envs.Replay(tmp_path, capacity=12)
    for seed in range(4):
        replay.add(synthetic_episode(5, seed=seed))
    assert len(list(tmp_path.glob("*.npz"))) == 4  # all saved
    assert (replay.num_episodes, replay.num_steps) == (2, 10)  # oldest dropped beyond 12 steps
    resumed = envs.Replay(tmp_path, capacity=12)  # a restarted run gets the same newest episodes back
    assert (resumed.num_episodes, resumed.num_steps) == (2, 10)
    batch = resumed.sample(16, 5, np.random.default_rng(0))
    newest = {e["image"][0].tobytes() for e in replay._episodes}
    assert {image.tobytes() for image in batch["image"][batch["is_first"]]} <= newest
    assert envs.Replay(tmp_path / "new").num_steps == 0
    with pytest.raises(envs.DatasetError, match="action shape"):
        resumed.add(synthetic_episode(5, action_size=6), save=False)
    with pytest.raises(ValueError, match="directory"):
        envs.Replay().add(synthetic_episode(5))


def test_collect_scripted_metaworld(tmp_path):
    summary = envs.collect("metaworld:window-close", "scripted", 2, tmp_path / "data", seed=1,
                           render="fast", max_steps=30)
    assert summary["episodes"] == 2 and summary["steps"] == 60
    info = envs.read_dataset_info(tmp_path / "data")
    assert (info["env"], info["render"], info["policy"], info["seed"]) == ("metaworld:window-close", "fast",
                                                                            "scripted", 1)
    assert (info["action_size"], info["episodes"], info["steps"], info["epsilon"]) == (4, 2, 60, [0.5, 1.0])
    episodes = envs.load_dataset(tmp_path / "data", action_size=4)
    assert len(episodes) == 2 and all(len(e["reward"]) == 31 and e["success"].dtype == bool for e in episodes)
    returns = [e["reward"].sum() for e in episodes]
    assert np.allclose([np.mean(returns), min(returns), max(returns)],
                       [summary["mean_return"], summary["min_return"], summary["max_return"]])
    assert summary["success_rate"] == np.mean([e["success"].any() for e in episodes])


def test_collect_epsilon_spreads_returns_from_expert_to_random(tmp_path):
    expert = envs.collect("metaworld:window-close", "scripted", 1, tmp_path / "expert", render="fast",
                          max_steps=120, epsilon=(0.0, 0.0))
    noisy = envs.collect("metaworld:window-close", "scripted", 1, tmp_path / "random", render="fast",
                         max_steps=120, epsilon=(1.0, 1.0))
    assert expert["success_rate"] == 1.0 and noisy["success_rate"] == 0.0
    assert expert["mean_return"] > 2 * noisy["mean_return"]


def test_collect_scripted_robodesk_spreads_returns_from_expert_to_random(tmp_path):
    # seed 11: the expert presses the green button at step 65 (test_robodesk_expert_reaches_the_tasks_success)
    expert = envs.collect("robodesk:push_green", "scripted", 1, tmp_path / "expert", seed=11, render="fast",
                          max_steps=120, epsilon=(0.0, 0.0))
    noisy = envs.collect("robodesk:push_green", "scripted", 1, tmp_path / "random", seed=11, render="fast",
                         max_steps=120, epsilon=(1.0, 1.0))
    assert expert["success_rate"] == 1.0 and noisy["success_rate"] == 0.0
    assert expert["mean_return"] > noisy["mean_return"] + 10
    info = envs.read_dataset_info(tmp_path / "expert")
    assert (info["policy"], info["epsilon"], info["action_size"]) == ("scripted", [0.0, 0.0], 5)
    episode, = envs.load_dataset(tmp_path / "expert", action_size=5)
    assert episode["success"].any() and len(episode["reward"]) == 121


def test_collect_rejects_bad_requests(tmp_path):
    with pytest.raises(envs.EnvError, match="Meta-World"):
        envs.collect("dmc:walker_walk", "scripted", 1, tmp_path / "a")
    with pytest.raises(envs.EnvError, match="valid policies for it: random"):
        envs.collect("dmc:walker_walk", "scripted", 1, tmp_path / "a")
    with pytest.raises(envs.EnvError, match="robodesk:stack has no scripted expert .*robodesk:open_slide"):
        envs.collect("robodesk:stack", "scripted", 1, tmp_path / "a")
    with pytest.raises(envs.EnvError, match="policy"):
        envs.collect("dmc:walker_walk", "expert", 1, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.npz").write_bytes(b"")
    with pytest.raises(envs.DatasetError, match="not an empty folder"):
        envs.collect("dmc:walker_walk", "random", 1, tmp_path / "full")


def test_collect_into_a_link_fills_its_target_and_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "made")
    for out, folder in (("link", "real"), ("dangling", "made")):
        envs.collect("dmc:walker_walk", "random", 1, tmp_path / out, render="fast", max_steps=2)
        assert len(envs.load_dataset(tmp_path / folder)) == 1 and (tmp_path / out).is_symlink()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(envs.DatasetError, match="the current folder"):
        envs.collect("dmc:walker_walk", "random", 1, ".", render="fast", max_steps=2)


def test_envs_cli_checks_the_seeds_of_all_episodes_and_stops_on_ctrl_c(monkeypatch, capsys):
    assert envs.main(["expert", "--env", "robodesk:open_slide", "--seed", str(2 ** 32 - 1), "--episodes", "2"]) == 2
    assert "seeds lie in [0, 2**32)" in capsys.readouterr().err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(envs, "collect", ctrl_c)
    assert envs.main(["collect", "--env", "dmc:walker_walk", "--policy", "random", "--episodes", "1",
                      "--out", "unused"]) == 130
    assert capsys.readouterr().err.strip() == "envs.py: interrupted"


def test_a_non_finite_action_is_refused():
    with envs.make_env("dmc:cartpole_balance", render="fast", max_steps=2) as env:
        env.reset()
        with pytest.raises(ValueError, match="is not finite"):
            env.step(np.array([np.nan]))


def test_an_interrupted_collection_leaves_no_dataset(tmp_path, monkeypatch):
    run_episode, calls = envs.run_episode, []

    def killed_at_the_second(env, act):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_episode(env, act)

    monkeypatch.setattr(envs, "run_episode", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        envs.collect("dmc:walker_walk", "random", 3, tmp_path / "d", render="fast", max_steps=3)
    assert not (tmp_path / "d").exists()  # nothing that --target-data could take for a dataset
    monkeypatch.undo()
    envs.collect("dmc:walker_walk", "random", 3, tmp_path / "d", render="fast", max_steps=3)  # starts over
    assert len(envs.load_dataset(tmp_path / "d")) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_runs_building_the_same_default_dataset_take_turns(tmp_path):
    # Two processes need the same default dataset at once: one builds it, the other waits and reads it whole.
    code = ("import sys, coworld as C\n"
            "cfg = C.parse_args(['--target', 'dmc:cartpole_swingup', '--target-episodes', '3', '--max-episode-steps',"
            " '10', '--data-dir', sys.argv[1], '--logdir', sys.argv[1] + '/run'])[1]\n"
            "print(C.build_default_dataset(cfg))\n")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    assert sum("building a dataset" in out for out, _ in outputs) == 1  # built once, read once
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert folders == {str(tmp_path / "dmc-cartpole_swingup-random-fast-3ep-10steps-s0")}  # the episode length counts
    assert len(envs.load_dataset(folders.pop())) == 3
    assert not list(tmp_path.glob("*.partial"))


def test_a_default_dataset_folder_without_its_record_names_the_fix(tmp_path, capsys):
    argv = ["--target", "dmc:cartpole_swingup", "--target-episodes", "1", "--max-episode-steps", "10",
            "--data-dir", str(tmp_path / "data"), "--logdir", str(tmp_path / "run")]
    folder = tmp_path / "data" / "dmc-cartpole_swingup-random-fast-1ep-10steps-s0"
    write_dataset(folder, [synthetic_episode(11, action_size=1)])
    assert C.main([*argv, "--method", "offline-dv2"]) == 2
    assert f"{folder}: a dataset folder without its dataset.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stale_build_leftovers_are_removed_when_no_build_holds_them(tmp_path):
    data = tmp_path / "data"
    (data / ".old-dataset.partial").mkdir(parents=True)
    (data / ".old-dataset.lock").write_text("")
    (data / ".busy.partial").mkdir()
    with envs.locked(data / ".busy.lock"):  # a build in progress
        envs.remove_stale_builds(data)
        assert (data / ".busy.partial").exists() and (data / ".busy.lock").exists()
    assert not (data / ".old-dataset.partial").exists() and not (data / ".old-dataset.lock").exists()
    assert not (data / ".busy.lock").exists()  # its holder removed it when done


def test_cli_collect(tmp_path):
    out = run_envs_cli("collect", "--env", "dmc:walker_walk", "--policy", "random", "--episodes", "2",
                       "--out", str(tmp_path / "d"), "--render", "fast", "--max-steps", "3", "--seed", "4")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 6
    info = envs.read_dataset_info(tmp_path / "d")
    assert (info["render"], info["seed"], info["max_steps"], info["action_size"]) == ("fast", 4, 3, 6)
    assert len(envs.load_dataset(tmp_path / "d", action_size=6)) == 2


def test_cli_expert_prints_success_rate_return_and_steps(tmp_path):
    out = run_envs_cli("expert", "--env", "robodesk:push_green", "--episodes", "1", "--seed", "11",
                       "--max-steps", "80", "--render", "fast")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["env"], summary["render"], summary["episodes"], summary["max_steps"]) == (
        "robodesk:push_green", "fast", 1, 80)
    assert summary["success_rate"] == 1.0 and summary["mean_steps_to_success"] == 65.0
    assert summary["steps_to_success"] == [65]
    assert summary["mean_return"] == pytest.approx(summary["returns"][0], abs=0.01)


@pytest.mark.parametrize("args, message", [
    (["collect", "--env", "nope:x", "--policy", "random", "--episodes", "1", "--out", "OUT"], "unknown environment"),
    (["collect", "--env", "dmc:walker_walk", "--policy", "scripted", "--episodes", "1", "--out", "OUT"], "Meta-World"),
    (["collect", "--env", "dmc:walker_walk", "--policy", "scripted", "--episodes", "1", "--out", "OUT"],
     "valid policies"),
    (["expert", "--env", "dmc:walker_walk"], "no scripted expert"),
    (["expert", "--env", "robodesk:open_slide", "--render", "slow"], "--render"),
    (["collect", "--env", "dmc:walker_walk", "--policy", "random", "--episodes", "0", "--out", "OUT"], "--episodes"),
    (["bench", "--steps", "many"], "--steps"),
    (["collect", "--env", "dmc:walker_walk", "--policy", "random", "--episodes", "1", "--out", "FILE"],
     "a file, not a folder"),
    (["collect", "--env", "dmc:walker_walk", "--policy", "random", "--episodes", "1", "--out", "OUT", "--seed", "-1"],
     "--seed"),
    (["collect", "--env", "dmc:walker_walk", "--policy", "random", "--episode", "1", "--out", "OUT"], "--episode"),
    (["expert", "--env", "robodesk:push_green", "--seed", "-1"], "--seed"),
    ([], "required"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    out = run_envs_cli(*[str(tmp_path / {"OUT": "out", "FILE": "file"}[a]) if a in ("OUT", "FILE") else a
                         for a in args])
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_bench_prints_a_rate_per_task_and_render():
    out = run_envs_cli("bench", "--steps", "3")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.strip().splitlines()]
    assert [(row[0], row[1]) for row in rows] == [(name, render) for name in envs.BENCH_ENVS for render in envs.RENDERS]
    assert all(float(row[2]) > 0 and row[3] == "steps/s" for row in rows)


# ---- bench.py ----


def test_cli_bench_prints_what_an_issue_needs(tmp_path):
    # Every measurement of `bench.py` at a tiny size: updates under the FLOP counter, acting, the bf16
    # check and the replay-memory comparison, each a line someone can paste into an issue.
    out = run_script("bench.py", "--preset", "small", "--batch-size", "2", "--seq-len", "4", "--horizon", "3",
                          "--precision", "bf16", "--updates", "1", "--env-steps", "0", "--check-updates", "2",
                          "--replay-steps", "300", "--data-dir", str(tmp_path), "--profile")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for kind in ("target", "source"):
        line = next(line for line in lines if line.startswith(f"{kind} update:"))
        assert re.search(r"[1-9]\d* GFLOP .* peak memory \d+\.\d\d GB", line), line
    assert any(re.match(r"acting: \d+ policy steps/s", line) for line in lines)
    assert any(line.startswith("bf16 vs float32 over 2 updates") and line.endswith("ok") for line in lines)
    assert sum("training from 300 dataset steps" in line for line in lines) == 2
    for kind in ("target", "source"):  # where the time goes, and how many operators run
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{kind} update profile:"))
        assert int(re.search(r"(\d+) top-level operator calls", lines[at]).group(1)) > 100
        assert "Self CPU" in lines[at + 2] and "aten::" in "".join(lines[at + 3: at + 8])


def test_bench_checks_its_flags_before_any_work(tmp_path):
    import bench
    for flags, message in ((["--replay-steps", "-5"], "--replay-steps must be at least 0"),
                           (["--updates", "0"], "--updates must be at least 1"), (["--update", "3"], "unrecognized")):
        with pytest.raises(C.ConfigError, match=message):
            bench.parse_args(flags)
    (tmp_path / "file").write_text("")  # bench writes no run folder, so one it could not write is no error
    cfg, extra = bench.parse_args(["--logdir", str(tmp_path / "file" / "run"), "--plain", "--compile", "on"])
    assert extra["plain"] and cfg.compile == "off"  # --plain: no speed devices, torch.compile included
    assert bench.action_size(cfg) == 5  # window-close (4) -> open_slide (5): the larger
    walker = bench.parse_args(["--source", "dmc:walker_walk", "--target", "dmc:walker_uphill"])[0]
    assert bench.action_size(walker) == 6 and bench.bench_step(walker, "target", 0)[1][0]["action"].shape[-1] == 6


# ---- experiments.py: grids, launch, report ----


GRID_FLAGS = ["--preset", "small", "--device", "cpu", "--batch-size", "2", "--seq-len", "8", "--max-episode-steps",
              "20", "--prefill", "20", "--eval-episodes", "1", "--K1", "2", "--K2", "10", "--rounds", "1",
              "--pretrain-steps", "20", "--target-episodes", "2"]


SMOKE_COWORLD, SMOKE_OFFLINE = X.GRIDS["smoke"].entries


def run_experiments_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, str(ROOT / "experiments.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_experiments_grids_are_the_papers_cells():
    grids = X.GRIDS
    assert {"table2", "figure4", "table3", "figure5a", "figure5b", "table6", "figure6"} <= set(grids)
    table2 = grids["table2"]
    assert len(table2.entries) == 30 and len(table2.columns) == 6
    rows = ("offline-dv2", "dv2-finetune", "dv2-finetune-ewc", "coworld", "coworld-multi-source")
    assert Counter(e.row for e in table2.entries) == {row: 6 for row in rows}
    best = {e.target: e.sources for e in table2.entries if e.row == "coworld"}
    assert best[X.mw("door-close")] == (X.mw("button-press"),) and best[X.mw("button-press")] == (X.mw("drawer-close"),)
    assert all(e.sources == () for e in table2.entries if e.method == "offline-dv2")
    # App. C's candidates hold the source Table 6 reports as selected; RoboDesk targets get all six (Sec. 4.3).
    for entry in grids["table6"].entries:
        assert X.TABLE6_PAPER[entry.target] in entry.sources and entry.target not in entry.sources
        assert len(entry.sources) == (5 if entry.target.startswith("metaworld:") else 6)
    assert {e.target for e in grids["table3"].entries} == {f"dmc:{t}" for t in DMC_VARIANTS}
    assert {e.row for e in grids["figure5a"].entries} == {"coworld", "no-state-alignment", "no-reward-alignment",
                                                          "no-value-constraint"}
    assert ("--value-constraint", "linear") in [e.flags for e in grids["figure5b"].entries]
    varied = {e.flags[0][2:]: set() for e in grids["figure6"].entries if e.flags}
    for e in grids["figure6"].entries:
        if e.flags:
            varied[e.flags[0][2:]].add(float(e.flags[1]))
    assert {0.1, 0.7} <= varied["k"] and {1.0, 3.0} <= varied["alpha"]  # Sec. 4.5's ranges
    assert min(varied["beta2"]) < 1 < max(varied["beta2"])  # "too small" and "too large" around Table 7's 1
    # The paper's numbers are typed in once, per cell of the grid.
    assert table2.reference["coworld"][X.mw("window-close")] == (4521, 367)
    assert grids["table3"].reference["offline-dv2"][X.dmc("cheetah_uphill")] == (3, 1)
    # Run folders: one per settings and seed (equal settings share a folder across grids), and coworld.py accepts
    # every cell's flags.
    names = {}
    for grid in grids.values():
        for entry in grid.entries:
            for seed in (0, 1, 2):
                names.setdefault(X.run_name(entry, seed), set()).add(X.entry_key(entry) + (seed,))
    X.check_common_flags([], [entry for grid in grids.values() for entry in grid.entries], [0])
    assert all(len(keys) == 1 for keys in names.values()) and max(map(len, names)) < 200
    assert "experiments" not in (ROOT / "coworld.py").read_text()  # the method never imports the launcher


@pytest.mark.parametrize("argv, listed", [
    (["launch", "table9"], "the grids are: table2, figure4, table3, figure5a, figure5b, table6, figure6"),
    (["launch", "table2", "--methods", "coworld", "cql"],
     "its methods are: offline-dv2, dv2-finetune, dv2-finetune-ewc, coworld, coworld-multi-source"),
    (["launch", "figure5a", "--targets", "robodesk:stack"], "its targets are: robodesk:push_green"),
    (["launch", "smoke", "--", "--seed", "3"], "set by the grid"),
    (["launch", "smoke", "--", "--K1", "many"], "argument --K1: invalid int value"),
    (["launch", "smoke", "--partition", "gpu"], "are for --cluster slurm"),
    (["report", "/nonexistent"], "is not a folder"),
])
def test_experiments_bad_grid_method_or_flag_is_one_line_and_exit_code_2(argv, listed, capsys):
    assert X.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and listed in err and err.startswith("experiments.py: error:")


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The smoke grid (CoWorld and Offline DV2 x seeds 0 1) through the local executor, 2 at a time. Mid-way, one run's
    coworld.py is SIGKILLed and another's job gets submitit's preemption signal (SIGUSR2); then the grid is launched
    again."""
    tmp = tmp_path_factory.mktemp("grid")
    out = tmp / "smoke"
    argv = ["launch", "smoke", "--seeds", "0", "1", "--parallel", "2", "--out", str(out), "--", *GRID_FLAGS,
            "--data-dir", str(tmp / "data")]
    killed, preempted = out / X.run_name(SMOKE_COWORLD, 0), out / X.run_name(SMOKE_COWORLD, 1)
    launcher = subprocess.Popen([sys.executable, str(ROOT / "experiments.py"), *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pending = {killed: signal.SIGKILL, preempted: signal.SIGUSR2}
    while pending and launcher.poll() is None:  # at each run's first checkpoint (the end of source pretraining)
        for folder, signum in list(pending.items()):
            status = X.read_json(folder / "status.json") or {}
            if status.get("state") == "running" and (folder / "checkpoint.pt").exists():
                os.kill(status["pid" if signum == signal.SIGKILL else "job_pid"], signum)
                del pending[folder]
        time.sleep(0.01)
    first_out, first_err = launcher.communicate(timeout=300)
    assert not pending, f"runs finished before they could be interrupted: {first_out} {first_err}"
    shutil.copytree(out, tmp / "first")
    again = run_experiments_cli(*argv)
    return types.SimpleNamespace(out=out, first=tmp / "first", first_code=launcher.returncode, first_out=first_out,
                                 again=again, killed=killed, preempted=preempted)


def test_experiments_local_grid_resumes_killed_and_preempted_runs(local_grid):
    grid = local_grid
    names = sorted(X.run_name(entry, seed) for entry in (SMOKE_COWORLD, SMOKE_OFFLINE) for seed in (0, 1))
    assert names == ["coworld__dmc-cartpole_balance__dmc-cartpole_swingup__s0",
                     "coworld__dmc-cartpole_balance__dmc-cartpole_swingup__s1",
                     "offline-dv2__dmc-cartpole_swingup__s0", "offline-dv2__dmc-cartpole_swingup__s1"]
    # First launch: the killed run failed, the others finished; the preempted one was checkpointed, requeued and
    # resumed inside the same launch, as a SLURM job is.
    assert grid.first_code == 1 and f"failed  {grid.killed.name}: killed by SIGKILL" in grid.first_out
    first = {name: (grid.first / name / "results.json").exists() for name in names}
    assert first == {name: name != grid.killed.name for name in names}
    log = (grid.first / grid.preempted.name / "coworld.log").read_text(errors="replace")
    assert "interrupted: checkpoint written" in log and "Resuming from" in log
    assert "Caught signal SIGUSR2" in "".join(p.read_text() for p in (grid.first / "submitit").rglob("*.err"))
    # Each run had its share of the CPU threads.
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {X.read_json(grid.first / name / "status.json")["threads"] for name in names} == {threads}
    # Second launch: resumes the killed run from its checkpoint and skips the finished ones.
    assert grid.again.returncode == 0, grid.again.stderr
    assert "4 runs in" in grid.again.stdout and "1 resume, 3 finished" in grid.again.stdout
    assert "Resuming from" in (grid.killed / "coworld.log").read_text(errors="replace")
    for name in names:
        assert X.read_json(grid.out / name / "status.json")["state"] == "finished"
        if name != grid.killed.name:  # not run again
            assert (grid.out / name / "results.json").stat().st_mtime_ns == \
                   (grid.first / name / "results.json").stat().st_mtime_ns
    job = X.read_json(grid.killed / "job.json")
    assert job["grids"] == ["smoke"] and job["seed"] == 0 and job["command"][-2:] == ["--logdir", str(grid.killed)]


def report_cell(report, row, column):
    """The numbers of one cell of a markdown table: mean, std (and k, n when not all seeds finished)."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = next(i for i, line in enumerate(lines) if column in line)
    col = [c.strip() for c in lines[header].split("|")].index(column)
    line = next(line for line in lines[header:] if line.split("|")[1].strip() == row)
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", line.split("|")[col])]


def test_experiments_report_numbers_match_the_runs_files(local_grid, tmp_path):
    grid = local_grid
    assert X.main(["report", str(grid.out)]) == 0
    report, data = (grid.out / "report.md").read_text(), X.read_json(grid.out / "report.json")
    column = X.GRIDS["smoke"].columns[X.dmc("cartpole_swingup")]
    for entry, row in ((SMOKE_COWORLD, "CoWorld"), (SMOKE_OFFLINE, "Offline DV2")):
        returns = [json.loads((grid.out / X.run_name(entry, s) / "results.json").read_text())["eval"]["return_mean"]
                   for s in (0, 1)]
        mean, std = sum(returns) / 2, math.sqrt(sum((r - sum(returns) / 2) ** 2 for r in returns) / 2)
        cell = data["grids"]["smoke"]["returns"][entry.row][X.dmc("cartpole_swingup")]
        assert (cell["mean"], cell["std"], cell["n"]) == (pytest.approx(mean, rel=1e-12), pytest.approx(std, rel=1e-9),
                                                          2)
        assert report_cell(report, row, column) == pytest.approx([mean, std], rel=6e-4)  # 4 significant digits
        # One task: the IQM of two seeds is their mean; the learning curve is each run's evaluation lines.
        assert data["grids"]["smoke"]["aggregate"]["dmc"]["rows"][entry.row]["iqm"] == pytest.approx(mean)
        logs = [(grid.out / X.run_name(entry, s) / "metrics.jsonl").read_text().splitlines() for s in (0, 1)]
        steps = {json.loads(line)["step"] for log in logs for line in log if "eval/return_mean" in line}
        points = data["grids"]["smoke"]["curves"][X.dmc("cartpole_swingup")][entry.row]
        assert points["step"] == sorted(steps)
        assert points["mean"][-1] == pytest.approx(mean)
    assert (grid.out / "figures" / "smoke-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![smoke learning curves](figures/smoke-curves.png)" in report
    # The first launch's folder: the killed run is reported as failed, its cell counts 1 of 2 seeds; a run whose
    # results.json is gone (its checkpoint stays) is reported in progress.
    first = tmp_path / "first"
    shutil.copytree(grid.first, first)
    in_progress = first / X.run_name(SMOKE_OFFLINE, 1)
    (in_progress / "results.json").unlink()
    assert X.main(["report", str(first)]) == 0
    report, data = (first / "report.md").read_text(), X.read_json(first / "report.json")
    assert data["runs"][grid.killed.name]["state"] == "failed" and "SIGKILL" in data["runs"][grid.killed.name]["detail"]
    assert data["runs"][in_progress.name]["state"] == "in progress"
    assert len(report_cell(report, "CoWorld", column)) == 4  # mean ± std (1/2)
    assert report_cell(report, "CoWorld", column)[2:] == [1, 2]
    assert f"| {grid.killed.name} | failed |" in report and f"| {in_progress.name} | in progress |" in report


def fake_run(out, grid, entry, seed, final, evals=(), value=(0.0, 0.0), selected=None, finished=True):
    """A run folder as coworld.py and the launcher leave it, with evaluation lines written here (as --eval-every
    logs them: eval/return_mean ... at step = target updates)."""
    folder = out / X.run_name(entry, seed)
    X.write_job_record(folder, grid, entry, seed, ["python", "coworld.py"])
    lines = [{"step": step, "time": 0.0, "eval/return_mean": ret, "eval/return_std": 0.0, "eval/value_estimate": 0.0,
              "eval/true_value": 0.0} for step, ret in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "config.json").write_text(json.dumps({"beta2": 1.0, "k": 0.3, "alpha": 2.0}))
    (folder / "checkpoint.pt").write_bytes(b"")
    if finished:
        results = {"env": entry.target, "method": entry.method, "seed": seed, "env_steps": {},
                   "eval": {"return_mean": final, "return_std": 0.0, "success_rate": 0.0, "returns": [final],
                            "episodes": 10, "value_estimate": value[0], "true_value": value[1]}}
        if selected:
            results["source_selected"] = selected
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_experiments_report_curves_values_and_source_selection(tmp_path):
    out = tmp_path / "grid"
    grid = X.GRIDS["figure5b"]
    coworld, offline, wo_max = grid.entries
    curves = {coworld: [[(100, 10.0), (200, 30.0), (300, 50.0)], [(100, 20.0), (200, 40.0), (300, 80.0)],
                        [(100, 0.0), (200, 35.0), (300, 65.0)]],
              offline: [[(100, 5.0), (200, 6.0)], [(100, 7.0), (200, 9.0)], [(100, 9.0)]]}  # seed 2 is behind
    values = {coworld: [(300.0, 250.0), (310.0, 270.0), (290.0, 260.0)],
              offline: [(900.0, 200.0), (950.0, 210.0), (0, 0)], wo_max: [(100.0, 220.0)]}
    for entry, runs in curves.items():
        for seed, points in enumerate(runs):
            fake_run(out, grid, entry, seed, points[-1][1], points, values[entry][seed],
                     finished=entry is coworld or seed < 2)
    fake_run(out, grid, wo_max, 0, 42.0, [(300, 42.0)], values[wo_max][0])
    table6 = X.GRIDS["table6"]
    door, push = table6.entries[0], table6.entries[-3]
    assert (door.target, push.target) == (X.mw("door-close"), X.rd("push_green"))
    fake_run(out, table6, door, 0, 1000.0,
             selected={s: (90.0 if s == X.mw("drawer-close") else 2.5) for s in door.sources})
    fake_run(out, table6, push, 0, 100.0,
             selected={s: (10.0 if s == X.mw("window-close") else 18.0) for s in push.sources})
    assert X.main(["report", str(out)]) == 0
    report, data = (out / "report.md").read_text(), X.read_json(out / "report.json")
    damaged = out / X.run_name(wo_max, 0) / "metrics.jsonl"
    kept = damaged.read_text()
    damaged.write_text(kept + '{"step": 400, "eval/ret\n')
    with pytest.raises(X.UsageError, match=f"{re.escape(str(damaged))}, line {kept.count(chr(10)) + 1} is damaged"):
        X.load_runs(out)
    damaged.write_text(kept)
    # Learning curves: mean and 95% t-interval over the seeds that reached each step.
    points = data["grids"]["figure5b"]["curves"][X.mw("door-close")]
    for entry in (coworld, offline):
        by_step = {}
        for run in curves[entry]:
            for step, ret in run:
                by_step.setdefault(step, []).append(ret)
        got = points[entry.row]
        assert got["step"] == sorted(by_step) and got["n"] == [len(by_step[s]) for s in sorted(by_step)]
        for i, step in enumerate(sorted(by_step)):
            v = np.array(by_step[step])
            half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
            assert (got["mean"][i], got["low"][i], got["high"][i]) == pytest.approx((v.mean(), v.mean() - half,
                                                                                     v.mean() + half))
    assert data["runs"][X.run_name(offline, 2)]["state"] == "in progress"
    # Figure 5(b): value estimate against true value per method, over the finished seeds.
    got = data["grids"]["figure5b"]["values"][X.mw("door-close")]
    assert got["coworld"]["value_estimate"]["mean"] == pytest.approx(300.0)
    assert got["coworld"]["true_value"]["std"] == pytest.approx(np.std([250.0, 270.0, 260.0]))
    assert got["offline-dv2"]["value_estimate"] == {"mean": 925.0, "std": 25.0, "n": 2}
    assert report_cell(report, "Offline DV2 (BP→DC*)", "value estimate") == [925.0, 25.0]
    for name in ("figure5b-curves", "figure5b-values"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"figures/{name}.png" in report
    # Table 6: which candidate each multi-source run selected most, beside the paper's choice.
    selection = data["grids"]["table6"]["selection"]
    assert selection[X.mw("door-close")]["selected"] == X.mw("drawer-close")
    assert selection[X.mw("door-close")]["share"][X.mw("drawer-close")] == pytest.approx(0.9)
    assert selection[X.rd("push_green")]["selected"] != X.mw("window-close")
    assert "| door-close | drawer-close | drawer-close 90%" in report and "drawer-close (same) |" in report
    # The paper's reference cells sit under ours where it prints numbers (Table 6 has none, Figure 5b none).
    assert "(paper)" not in report


def fake_slurm(tmp_path):
    """sbatch, srun and scontrol stand-ins on PATH: sbatch keeps the submission file and says job 4242, scontrol logs
    its arguments; the environment has no GL backend chosen for this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\nenv > "$SBATCH_COPY.env"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SBATCH_COPY.scontrol"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**{k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")},
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_COPY": str(tmp_path / "sbatch.sh")}


def test_experiments_slurm_submission_without_a_cluster(tmp_path):
    env = fake_slurm(tmp_path)  # the submission file submitit writes is what a cluster would receive
    out = tmp_path / "table2"
    done = run_experiments_cli("launch", "table2", "--seeds", "0", "1", "2", "--cluster", "slurm", "--partition", "gpu",
                               "--gpus-per-job", "1", "--timeout-min", "600", "--parallel", "20", "--sbatch",
                               "account=rl", "--out", str(out), "--", "--preset", "paper", env=env)
    assert done.returncode == 0, done.stderr
    assert "submitted 90 runs as SLURM job 4242" in done.stdout
    sbatch = (tmp_path / "sbatch.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-89%20", "#SBATCH --requeue", f"#SBATCH --signal=USR2@{X.SIGNAL_DELAY_S}",
                 "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=600",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --account=rl"):
        assert line in sbatch, (line, sbatch)
    # sbatch passes the launcher's environment on to the jobs: it holds no GL backend chosen for this machine.
    assert "MUJOCO_GL=" not in (tmp_path / "sbatch.sh.env").read_text()
    # One pickled job per run: each a checkpointable coworld.py run in its own folder.
    from submitit.core.utils import DelayedSubmission
    pickles = sorted((out / "submitit").glob("4242_*/*_submitted.pkl"))
    jobs = [DelayedSubmission.load(path).function for path in pickles]
    assert len(jobs) == 90 and all(hasattr(job, "checkpoint") for job in jobs)
    folders = {pathlib.Path(job.logdir) for job in jobs}
    assert len(folders) == 90 and all(folder.parent == out and (folder / "job.json").exists() for folder in folders)
    job = next(job for job in jobs if pathlib.Path(job.logdir).name == "dv2-finetune-ewc__metaworld-button-press__"
                                                                      "metaworld-door-close__s2")
    assert job.command[1:] == [str(ROOT / "coworld.py"), "--method", "dv2-finetune-ewc", "--source",
                               "metaworld:button-press", "--target", "metaworld:door-close", "--seed", "2",
                               "--preset", "paper", "--logdir", job.logdir]
    assert job.threads is None and job.signal_delay_s == X.SIGNAL_DELAY_S  # threads: the job's own CPUs
    # The same folder with other coworld.py flags is refused (its finished runs would be skipped as they are).
    again = run_experiments_cli("launch", "table2", "--cluster", "slurm", "--out", str(out), "--", "--K1", "10",
                                env=env)
    assert again.returncode == 2 and "was launched with coworld.py flags --preset paper" in again.stderr
    # --dry-run lists the runs and changes nothing.
    dry = run_experiments_cli("launch", "figure5a", "--dry-run", "--out", str(tmp_path / "dry"))
    assert dry.returncode == 0 and dry.stdout.count("coworld.py --method coworld") == 12
    assert not (tmp_path / "dry").exists()
    # Values every run would refuse are refused before anything is submitted; a flag is never abbreviated.
    for flags, message in ((["--", "--K1", "0"], "--K1 must be at least 1, got 0"),
                           (["--", "--value-constraint", "max2"], "--value-constraint must be max, linear or none"),
                           (["--seed", "0"], "unrecognized arguments: --seed 0")):
        refused = run_experiments_cli("launch", "figure5a", "--dry-run", "--out", str(tmp_path / "dry"), *flags)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "dry").exists()


def test_experiments_slurm_job_checkpoints_requeues_and_resumes(tmp_path):
    # An array task as SLURM runs it (submitit's entry point with SLURM's variables): submitit's signal before the
    # time limit reaches the job, coworld.py writes its safe-point checkpoint, the job requeues itself with
    # scontrol; the requeued task resumes the run and finishes it.
    env = fake_slurm(tmp_path)
    out = tmp_path / "smoke"
    done = run_experiments_cli("launch", "smoke", "--methods", "coworld", "--seeds", "0", "1", "--cluster", "slurm",
                               "--out", str(out), "--", *GRID_FLAGS, "--data-dir", str(tmp_path / "data"), env=env)
    assert done.returncode == 0, done.stderr
    task = {**env, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "osmesa"), "SUBMITIT_EXECUTOR": "slurm",
            "SLURM_JOB_ID": "4244", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1", "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1"}
    command = [sys.executable, "-u", "-m", "submitit.core._submit", str(out / "submitit" / "%j")]
    run = out / X.run_name(SMOKE_COWORLD, 1)
    job = subprocess.Popen(command, env=task, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while job.poll() is None:
        status = X.read_json(run / "status.json") or {}
        if status.get("state") == "running" and (run / "checkpoint.pt").exists():
            os.kill(status["job_pid"], signal.SIGUSR2)
            break
        time.sleep(0.01)
    _, err = job.communicate(timeout=300)
    assert "Caught signal SIGUSR2" in err and "preempted" in err, err[-2000:]
    assert (tmp_path / "sbatch.sh.scontrol").read_text().split() == ["requeue", "4242_1"]
    assert X.read_json(run / "status.json")["state"] == "requeued" and not (run / "results.json").exists()
    assert "interrupted: checkpoint written" in (run / "coworld.log").read_text(errors="replace")
    requeued = subprocess.run(command, env=task, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert "Resuming from" in (run / "coworld.log").read_text(errors="replace")
    assert X.read_json(run / "status.json")["state"] == "finished" and (run / "results.json").exists()
    assert not (out / X.run_name(SMOKE_COWORLD, 0) / "status.json").exists()  # task 0 never ran here


def test_experiments_statistics_against_a_hand_computation():
    from rliable import metrics

    # IQM: the mean of the middle half of all scores (runs x tasks), here 10 scores -> the middle 6.
    runs = np.array([[0., 10.], [1., 14.], [2., 11.], [3., 19.], [4., 12.]])
    # Probability of improvement, by hand: on task 0, x_i = i + 1 beats y_j = j + 0.5 for j <= i: 10 of 16 pairs;
    # task 1 alike; ties count half (x = [1, 2] vs y = [2, 3]: only (2, 2), a tie: 0.5 of 4 pairs).
    x = np.array([[1., 10.], [2., 20.], [3., 30.], [4., 40.]])
    y = x - np.array([.5, .5])
    assert X.probability_of_improvement(x, y) == 0.625
    assert X.probability_of_improvement(np.array([[1.], [2.]]), np.array([[2.], [3.]])) == 0.125
    rng = np.random.default_rng(0)
    for _ in range(20):  # the same number as rliable's own estimator, ties included
        a, b = rng.integers(0, 4, (3, 4)).astype(float), rng.integers(0, 4, (5, 4)).astype(float)
        assert X.probability_of_improvement(a, b) == pytest.approx(metrics.probability_of_improvement(a, b))
    out = X.interval_estimates({"a": runs, "equal": np.array([[1., 5.]] * 3), "offline-dv2": runs - 100.0},
                               "offline-dv2")
    assert out["a"]["iqm"] == pytest.approx((2 + 3 + 4 + 10 + 11 + 12) / 6)
    # The bootstrap is stratified: resampling runs within each task cannot change a task whose runs are equal
    # (a pooled bootstrap would mix 1s and 5s).
    assert out["equal"]["iqm"] == 3.0 and out["equal"]["iqm_ci"] == [3.0, 3.0]
    # a beats offline-dv2 in every pair: probability 1, and every resample says so.
    assert out["a"]["poi"] == 1.0 and out["a"]["poi_ci"] == [1.0, 1.0] and "poi" not in out["offline-dv2"]
    # The 95% interval against a plain-loop stratified bootstrap of the IQM (percentile method).
    samples = [stats.trim_mean(runs[rng.integers(0, 5, (5, 2)), np.arange(2)], 0.25, axis=None) for _ in range(20000)]
    assert out["a"]["iqm_ci"] == pytest.approx(np.percentile(samples, [2.5, 97.5]), abs=0.35)
    assert X.interval_estimates({"a": runs}, "offline-dv2") == X.interval_estimates({"a": runs}, "offline-dv2")


# ---- Faults caused on purpose: kills and signals ----


def kill_run_flags(tmp_path, name):
    # One thread count for every run: a resume is exact on the same count, and --threads 0 would follow the
    # machine's load, which differs between the reference run and the killed one.
    return ["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup",
            *tiny_flags(tmp_path / name, K1=6, K2=40, rounds=2, threads=1,
                        **{"pretrain-steps": 60, "target-episodes": 3, "data-dir": tmp_path / "data", "eval-every": 4})]


def run_summary(logdir):
    """What must not depend on where a run was killed: counters and the episodes on disk."""
    state = torch.load(logdir / "checkpoint.pt", weights_only=False)
    episodes = [p for p in (logdir / "replay").rglob("*.npz") if "orphaned" not in p.parts]
    return {"progress": {k: state["progress"][k] for k in ("steps", "env_steps")},
            "episodes": len(state["progress"]["episodes"][0]),
            "updates": (state["sources"][0]["updates"], state["target"]["updates"]),
            "files": len(episodes), "lengths": sorted(int(p.stem.rsplit("-", 1)[1]) for p in episodes),
            "results": json.loads((logdir / "results.json").read_text())["env_steps"],
            # Episodes start from seeds of their index and the RNG states come back: the same returns, too.
            "returns": state["progress"]["episodes"],
            "eval": json.loads((logdir / "results.json").read_text())["eval"]["return_mean"],
            # The metrics log holds each logged step once, as an uninterrupted run logs it.
            "log": [{k: v for k, v in json.loads(line).items() if k != "time"}
                    for line in (logdir / "metrics.jsonl").read_text().splitlines()],
            "tensorboard": tensorboard_points(logdir)}


def tensorboard_points(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    done = run_coworld_cli(*kill_run_flags(tmp_path, "run"))
    assert done.returncode == 0, done.stderr
    summary = run_summary(tmp_path / "run")
    logged = {}
    for line in summary["log"]:
        for key, value in line.items():
            if key != "step":
                logged.setdefault(key, []).append((line["step"], pytest.approx(value, rel=1e-6, abs=1e-30,
                                                                               nan_ok=True)))
    assert summary["tensorboard"] == logged  # TensorBoard holds what metrics.jsonl holds
    return summary


def progress_on_disk(run):
    """(source episodes saved, target updates logged) of a running run."""
    log = run / "metrics.jsonl"
    target_lines = log.read_text().count('"target/model_loss"') if log.exists() else 0
    return len(list((run / "replay").glob("*/*.npz"))), target_lines


@pytest.mark.parametrize("episodes, updates, delay", [(1, 0, 0.0), (3, 0, 0.0), (3, 0, 0.4), (4, 0, 0.0), (5, 0, 0.1),
                                                      (3, 2, 0.0)])
def test_sigkill_at_any_point_then_resume_finishes_like_an_uninterrupted_run(tmp_path, uninterrupted, episodes,
                                                                             updates, delay):
    # Killed `delay` seconds after the n-th of the run's 5 source episodes is on disk: in pretraining, between
    # an episode file and its checkpoint, in the first offline round, in co-training, in the second round; and
    # inside the first round, after its second target update, while the next batch is being read ahead.
    reference = uninterrupted
    flags = kill_run_flags(tmp_path, "run")
    process = subprocess.Popen([sys.executable, str(ROOT / "coworld.py"), *flags], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and progress_on_disk(tmp_path / "run") < (episodes, updates):
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err[-2000:]}"
    resumed = run_coworld_cli(*flags)
    assert resumed.returncode == 0, resumed.stderr
    assert run_summary(tmp_path / "run") == reference
    assert not list(tmp_path.rglob("*.tmp*"))  # no half-written file left behind as valid
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2])
def test_sigint_writes_a_checkpoint_and_exits_cleanly(tmp_path, uninterrupted, signum):
    flags = kill_run_flags(tmp_path, "run")
    process = subprocess.Popen([sys.executable, str(ROOT / "coworld.py"), *flags], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    if process.returncode in (0, -signum) or "stopped:" in err:
        pytest.skip("the run finished, or was in its final evaluation, when the signal arrived")
    assert process.returncode == 128 + signum and "checkpoint written" in err and "Traceback" not in err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["progress"]
    assert run_coworld_cli(*flags).returncode == 0
    # The checkpoint was written at a safe point (online: an episode's end), so the resumed run ends where an
    # uninterrupted one does: the same updates, steps and episodes.
    assert run_summary(tmp_path / "run") == uninterrupted


def test_sigterm_while_the_default_dataset_is_built_says_interrupted(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "coworld.py"), "--target", "dmc:cartpole_swingup",
                                "--method", "offline-dv2", "--target-episodes", "50",
                                "--data-dir", str(tmp_path / "data"),
                                "--logdir", str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "data").glob(".*.partial/*.npz")) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "interrupted" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")]  # no dataset left


def test_a_second_run_on_a_folder_stops_at_once_and_evaluate_needs_no_lock(tmp_path):
    run = tmp_path / "run"
    flags = ["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup",
             *tiny_flags(run, K1=200, rounds=1, **{"pretrain-steps": 40, "target-episodes": 2,
                                                   "data-dir": tmp_path / "d"})]
    first = subprocess.Popen([sys.executable, str(ROOT / "coworld.py"), *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoint.pt").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        second = run_coworld_cli(*flags)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert f"{run} is in use by another run (PID {first.pid})" in second.stderr
        assert run_coworld_cli("evaluate", *flags).returncode == 0  # it only reads
        assert first.poll() is None  # the first run goes on, its files untouched
    finally:
        first.kill()
        first.communicate()


# ---- Faults caused on purpose: bad input, damaged files, a full disk, numerical faults ----


def bad_input_cases(tmp_path):
    def good(n=3):
        return [synthetic_episode(12, action_size=1, seed=i) for i in range(n)]
    corrupt = write_dataset(tmp_path / "corrupt", good())
    (corrupt / "20260101T000000-bad-12.npz").write_bytes(b"not a zip file")
    truncated = write_dataset(tmp_path / "truncated", good())
    path = envs.episode_paths(truncated)[0]
    path.write_bytes(path.read_bytes()[:200])
    small = [dict(e, image=e["image"][:, :32, :32]) for e in good()]
    nan = good()
    nan[1]["reward"][3] = np.nan
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    info_list = write_dataset(tmp_path / "info-list", good())
    (info_list / "dataset.json").write_text("[1, 2, 3]")
    info_render = write_dataset(tmp_path / "info-render", good())
    (info_render / "dataset.json").write_text('{"render": "FAST"}')
    flags = {key: good(1) for key in ("no-last", "all-last", "all-first", "huge-reward")}
    flags["no-last"][0]["is_last"][:] = False
    flags["all-last"][0]["is_last"][:] = True
    flags["all-first"][0]["is_first"][:] = True
    flags["huge-reward"][0]["reward"][5] = 3e38
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    ranges = {"--model-lr -1": "--model-lr must be above 0, got -1.0", "--model-lr nan": "--model-lr must be a finite",
              "--adam-eps nan": "--adam-eps must be a finite", "--actor-lr inf": "--actor-lr must be a finite",
              "--beta2 nan": "--beta2 must be a finite", "--free-nats nan": "--free-nats must be a finite",
              "--grad-clip -1": "--grad-clip must be above 0", "--eta-start nan": "--eta-start must be a finite",
              "--alpha -1": "--alpha must be at least 0", "--rho 2": "--rho must lie in [0, 1]",
              "--prefill -5": "--prefill must be at least 0", "--rounds 0": "--rounds must be at least 1",
              "--max-episode-steps 0": "--max-episode-steps must be at least 1",
              "--stop-return nan": "--stop-return must be a finite",
              "--eval-every -1": "--eval-every must be at least 0"}
    return {
        **{f"flag {flag}": (flag.split(), message) for flag, message in ranges.items()},
        "flag prefix": (["--batch", "3"], "unrecognized arguments: --batch"),
        "same source twice": (["--source", "dmc:cartpole_balance", "dmc:cartpole_balance"],
                              "--source names dmc:cartpole_balance twice"),
        "source is the target": (["--source", "dmc:cartpole_swingup"], "is also the --target"),
        "logdir inside the data": (["--target-data", str(tmp_path / "empty"),
                                    "--logdir", str(tmp_path / "empty" / "run")], "lies inside --target-data"),
        "data dir is a file": (["--data-dir", str(tmp_path / "a-file")], "is a file, not a folder"),
        "unwritable logdir": (["--logdir", "/proc/coworld-run"], "cannot write /proc/coworld-run"),
        "dataset.json a list": (["--target-data", str(info_list)], "dataset.json: must hold a JSON object"),
        "dataset.json render": (["--target-data", str(info_render)], "render 'FAST' is not one of default, fast"),
        "one-step episode": (["--target-data", str(write_dataset(tmp_path / "one-step", [synthetic_episode(1, 1)]))],
                             "an episode needs its reset frame and at least one transition"),
        "no is_last": (["--target-data", str(write_dataset(tmp_path / "no-last", flags["no-last"]))],
                       "is_last must be True at step 11 only, found at steps []"),
        "every is_last": (["--target-data", str(write_dataset(tmp_path / "all-last", flags["all-last"]))],
                          "is_last must be True at step 11 only"),
        "every is_first": (["--target-data", str(write_dataset(tmp_path / "all-first", flags["all-first"]))],
                           "is_first must be True at step 0 only"),
        "huge reward": (["--target-data", str(write_dataset(tmp_path / "huge", flags["huge-reward"]))],
                        "rewards up to 3e+38 in magnitude"),
        "too few steps": (["--target-data", str(write_dataset(tmp_path / "few", good(1))), "--seq-len", "20"],
                          "12 steps in all, fewer than one training window of 20"),
        "symlink loop": (["--target-data", str(tmp_path / "loop")], "a symbolic link that loops"),
        "unknown task": (["--target", "dmc:cartpole_swingupp"], "valid: "),
        "unknown family": (["--source", "gym:cartpole"], "family one of metaworld, robodesk, dmc"),
        "malformed source": (["--source", "metaworld"], "use family:task"),
        "missing dataset": (["--target-data", str(tmp_path / "nowhere")], "no such folder"),
        "empty dataset": (["--target-data", str(tmp_path / "empty")], "no episodes"),
        "corrupt npz": (["--target-data", str(corrupt)], "bad-12.npz: not a readable .npz"),
        "truncated npz": (["--target-data", str(truncated)], f"{path.name}: not a readable .npz"),
        "wrong image size": (["--target-data", str(write_dataset(tmp_path / "small", small))], "image size"),
        "wrong action size": (["--target-data", str(write_dataset(tmp_path / "wide", [
            synthetic_episode(12, action_size=4)]))], "action size 4, expected 1"),
        "nan reward": (["--target-data", str(write_dataset(tmp_path / "nan", nan))], "reward contains NaN"),
        "unknown flag": (["--bogus", "1"], "unrecognized arguments: --bogus"),
        "ill-typed flag": (["--batch-size", "many"], "invalid int value: 'many'"),
        "bad value": (["--k", "1.5"], "--k must lie in [0, 1]"),
        "bad compile": (["--compile", "sometimes"], "--compile must be auto, on or off"),
        "bad replay images": (["--replay-images", "tape"], "--replay-images must be disk or memory"),
        "bad chunks": (["--chunks", "-2"], "--chunks must be at least 1, got -2"),
        "zero checkpoint interval": (["--checkpoint-every", "0"], "--checkpoint-every"),
        "negative seed": (["--seed", "-1"], "--seed must lie in [0, 2**31)"),
        "no target iterations": (["--K1", "0"], "--K1 must be at least 1, got 0"),
        "finetune from two sources": (["--method", "dv2-finetune", "--source", "dmc:walker_walk",
                                       "dmc:cartpole_balance"], "dv2-finetune takes one --source"),
        "unwritable output": (["--logdir", str(tmp_path / "a-file" / "run")], "cannot write"),
    }


def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, capsys):
    cases = bad_input_cases(tmp_path)
    base = ["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup", "--device", "cpu",
            "--logdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    for name, (args, message) in cases.items():
        before = snapshot(tmp_path)
        code = C.main([*base, *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert snapshot(tmp_path) == before, f"{name} changed files"


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    out = run_coworld_cli("--target", "robodesk:open_slid", "--logdir", str(tmp_path / "out"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "open_slide" in out.stderr  # the valid names are listed
    out = run_coworld_cli("--target", "robodesk:open_slid", "--debug", "--logdir", str(tmp_path / "out"))
    assert out.returncode == 2 and "Traceback" in out.stderr
    out = run_coworld_cli("--target", "robodesk:open_slid", "--debug", "--no-debug", "--logdir", str(tmp_path / "out"))
    assert out.returncode == 2 and "Traceback" not in out.stderr  # the last of the two wins


def test_missing_gl_library_from_the_main_command(tmp_path, monkeypatch, capsys):
    import mujoco

    def no_gl(*args, **kwargs):
        raise ImportError("Unable to load OpenGL library")
    monkeypatch.setattr(mujoco, "Renderer", no_gl)
    argv = ["--source", "dmc:cartpole_balance", "--target", "dmc:cartpole_swingup",
            *tiny_flags(tmp_path / "run", **{"data-dir": tmp_path / "data"})]
    assert C.main(argv) == 2
    assert "apt-get install -y libosmesa6" in capsys.readouterr().err


def test_flags_a_method_does_not_read_are_named(tmp_path, capsys):
    argv = ["--method", "offline-dv2", "--target", "dmc:cartpole_swingup", "--source", "dmc:walker_walk",
            "--no-state-alignment", "--logdir", str(tmp_path / "run")]
    notes = C.parse_args(argv)[2]
    assert notes == ["--method offline-dv2 does not use --source, --state-alignment"]
    assert C.parse_args(argv[:4] + argv[7:])[2] == []
    # What the settings turn off: the online command's early stop, offline-dv2's absent online stage, App. C's
    # target pretraining with one source, Stage B's k and eta without Stage B, Stage C's alpha without Stage C.
    assert C.parse_args([*argv[:4], "--stop-return", "5", "--prefill", "9", "--train-every", "2"])[2] == [
        "--method offline-dv2 does not use --stop-return, --prefill, --train-every"]
    coworld = ["--source", "dmc:walker_walk", "--target", "dmc:cartpole_swingup", "--target-pretrain", "3",
               "--k", "0.5"]
    assert C.parse_args(coworld)[2] == ["--method coworld does not use --target-pretrain"]
    assert C.parse_args([*coworld, "--no-reward-alignment", "--value-constraint", "none", "--alpha", "2"])[2] == [
        "--method coworld does not use --target-pretrain, --k, --alpha"]
    assert C.parse_args([*coworld[:2], "dmc:cheetah_run", *coworld[2:]])[2] == []  # two sources: App. C pretrains
    with pytest.raises(C.ConfigError, match="online needs --env"):
        C.parse_args(["online", "--steps", "10"])
    # online: train's flags are named as unused; --source and a second step count contradict --env and --steps.
    assert C.parse_args(["online", "--env", "dmc:walker_walk", "--K1", "3", "--method", "offline-dv2"])[2] == [
        "online trains one agent online and does not use --method, --K1"]
    assert C.parse_args(["online", "--env", "dmc:walker_walk", "--pretrain-steps", "7"])[1].pretrain_steps == 7
    with pytest.raises(C.ConfigError, match="online takes --env .*not --source"):
        C.parse_args(["online", "--env", "dmc:walker_walk", "--source", "dmc:cartpole_balance"])
    with pytest.raises(C.ConfigError, match="--steps or --pretrain-steps .* not both"):
        C.parse_args(["online", "--env", "dmc:walker_walk", "--steps", "3", "--pretrain-steps", "50"])


def test_numbers_beyond_float32_and_more_threads_than_cores_are_refused(tmp_path):
    # The networks compute in float32: 1e300 overflows it, and an Adam eps of 1e-50 would be 0 there (NaN weights).
    assert "float32" in C.range_error("free_nats", 1e300) and "float32" in C.range_error("adam_eps", 1e-50)
    assert C.range_error("adam_eps", 1e-5) is None and C.range_error("free_nats", 0.0) is None
    for flag, value in (("--free-nats", "1e300"), ("--adam-eps", "1e-50"), ("--threads", "100000")):
        with pytest.raises(C.ConfigError, match=re.escape(flag)):
            C.parse_args(["--target", "dmc:cartpole_swingup", flag, value, "--logdir", str(tmp_path / "run")])


def test_a_failing_weights_and_biases_start_is_one_line(monkeypatch):
    def no_key(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=no_key))
    with pytest.raises(C.ConfigError, match="--wandb proj: Weights & Biases did not start .*No API key.*"
                                            "WANDB_MODE=offline"):
        C.start_wandb(small_cfg(wandb="proj", logdir="/tmp/run"))


def test_a_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert C.main(online_flags("~/cw", steps=20)) == 0
    assert (tmp_path / "home" / "cw" / "results.json").exists() and (tmp_path / "home" / "cw" / "videos").is_dir()
    assert not (tmp_path / "~").exists()
    cfg = C.parse_args(["--target-data", "~/data/x", "--data-dir", "~/d", "--logdir", "rel"])[1]
    assert (cfg.target_data, cfg.data_dir, cfg.logdir) == (str(tmp_path / "home/data/x"), str(tmp_path / "home/d"),
                                                           str(tmp_path / "rel"))


def test_checkpoint_from_another_config_names_the_fields(tmp_path, capsys):
    argv = ["online", "--env", "dmc:cartpole_balance", "--steps", "20", *tiny_flags(tmp_path / "run")]
    assert C.main(argv) == 0
    before = snapshot(tmp_path)
    assert C.main([*argv, "--gamma", "0.9", "--horizon", "5"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "gamma (0.995 -> 0.9)" in err and "horizon (15 -> 5)" in err
    assert snapshot(tmp_path) == before
    # An online run has no target agent: evaluate says so in one line and touches nothing.
    assert C.main(["evaluate", "--logdir", str(tmp_path / "run")]) == 2
    assert "is of an online run (no target agent to evaluate)" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    # A checkpoint of an older format (its counters meant something else) is refused, not misread.
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    del state["version"]
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    assert C.main(argv) == 2
    assert "another version of coworld.py (checkpoint format 1" in capsys.readouterr().err


def test_resuming_checks_the_checkpoint_before_building_any_data(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["--method", "offline-dv2", "--target", "dmc:cartpole_swingup",
            *tiny_flags(run, K1=2, rounds=1, **{"target-episodes": 1, "data-dir": tmp_path / "data"})]
    assert C.main(argv) == 0
    assert C.main([*argv, "--render", "default"]) == 2
    assert "different config: render ('fast' -> 'default')" in capsys.readouterr().err
    assert len(list((tmp_path / "data").iterdir())) == 1  # no default-render dataset was built first
    assert C.main([*argv, "--replay-images", "memory"]) == 0  # harmless: it resumes (here: the finished run)


def evil_pickle(marker):
    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")
    return {"version": C.CHECKPOINT_VERSION, "progress": {}, "sources": [], "target": None, "config": Evil()}


@pytest.mark.parametrize("damage, message", [
    ("truncated", "damaged, not a readable checkpoint"), ("random bytes", "damaged"), ("empty", "damaged"),
    ("text", "damaged"), ("foreign", "not a coworld.py checkpoint"), ("callable", "refused: it holds a Python object"),
])
def test_a_damaged_or_foreign_checkpoint_is_one_line_and_never_a_new_start(tmp_path, monkeypatch, capsys, damage,
                                                                           message):
    run = tmp_path / "run"
    interrupted_run(offline_flags(run), monkeypatch)
    path, marker = run / "checkpoint.pt", tmp_path / "ran"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("this is not a checkpoint\n")
    elif damage == "foreign":
        torch.save({"a": 1}, path)
    else:
        torch.save(evil_pickle(marker), path)
    before = snapshot(run)
    capsys.readouterr()
    for command in ([], ["evaluate"]):
        assert C.main([*command, *offline_flags(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{path}: {message}" in err and "Traceback" not in err, err
    assert snapshot(run) == before and not marker.exists()  # nothing ran, nothing started over


def test_a_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupted_run(offline_flags(run), monkeypatch)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["version"] == C.CHECKPOINT_VERSION and state["progress"]["steps"] == 3


def test_a_replay_folder_that_lost_episodes_stops_the_resume(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupted_run(online_flags(run), monkeypatch)
    shutil.rmtree(run / "replay")
    capsys.readouterr()
    assert C.main(online_flags(run)) == 2
    err = capsys.readouterr().err
    assert "holds 0 episodes but" in err and "counted 2" in err and "episodes were removed" in err


def test_damaged_metrics_lines_stop_a_resume_with_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupted_run(offline_flags(run), monkeypatch)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join([lines[0], b"\xff\xfe garbage\n", *lines[2:]]))
    capsys.readouterr()
    assert C.main(offline_flags(run)) == 2
    assert f"{run / 'metrics.jsonl'}: line 2 is damaged" in capsys.readouterr().err


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    argv = ["online", "--env", "dmc:cartpole_balance", "--steps", "60", *tiny_flags(tmp_path / "run")]
    original, saves = torch.save, []

    def disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device", str(f.name))
        return original(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_fills)
    assert C.main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".*.tmp*"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)  # the first one, intact
    assert 0 < state["progress"]["steps"] < 60
    monkeypatch.undo()
    assert C.main(argv) == 0  # space again: the same command resumes and finishes


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    argv = online_flags(tmp_path / "run", steps=60)
    original, saves = torch.save, []

    def disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # what torch's zip writer raises when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5185600 vs 5185488")
        return original(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_fills)
    monkeypatch.setattr(C.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
    assert C.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (f"{tmp_path / 'run'}: No space left on device: the disk is full; the last checkpoint checkpoint.pt "
            "stands") in err
    assert 0 < torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["progress"]["steps"] < 60


def test_nan_losses_are_skipped_then_stop_the_run_with_the_checkpoint_intact(tmp_path, monkeypatch, capsys):
    argv = ["online", "--env", "dmc:cartpole_balance", "--steps", "80", "--max-bad-updates", "3",
            *tiny_flags(tmp_path / "run")]
    original, calls = C.world_model_loss, []

    def sometimes_nan(*args, **kwargs):
        loss, *rest = original(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) in (2, 5, 6, 7) else loss), *rest
    monkeypatch.setattr(C, "world_model_loss", sometimes_nan)
    assert C.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("skipped update") == 4 and "non-finite" in err
    assert "3 non-finite updates in a row" in err and "checkpoint.pt" in err
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["sources"][0]["model"].values() if v.is_floating_point())


# ---- The README stays true ----


def readme():
    return (ROOT / "README.md").read_text()


def test_every_function_in_the_paper_to_code_map_exists():
    section = readme().split("## Paper-to-code map", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"`([A-Za-z_][\w.]*)`", section)
    assert len(names) > 25
    for name in names:
        if name == "coworld.py":
            continue
        obj = C
        for part in name.split("."):
            assert hasattr(obj, part), f"README names {name}, which coworld.py does not define"
            obj = getattr(obj, part)
    # Each function of an equation's row cites that equation in its docstring ("Eq. (6)", "Eq. 6", "Eq. (4, 5)").
    rows = re.findall(r"^\| Eq\. \((\d+)\) \|[^|]*\|([^|]*)\|", section, re.M)
    assert len(rows) == 12
    for number, names in rows:
        for name in re.findall(r"`([\w.]+)`", names):
            doc = C
            for part in name.split("."):
                doc = getattr(doc, part)
            groups = re.findall(r"Eq\.\s*\(?([\d, ]+)", doc.__doc__ or "")
            cited = {n for group in groups for n in re.findall(r"\d+", group)}
            assert number in cited, f"{name} is README's code for Eq. ({number}), but its docstring does not cite it"


def test_every_command_in_the_readme_parses():
    import shlex

    import bench
    commands = re.findall(r"python (coworld|envs|bench)\.py([^`\n&|]*)", readme())
    assert len(commands) > 10
    for script, rest in commands:
        if "<" in rest:  # a placeholder in prose, e.g. --source <env>
            continue
        argv = shlex.split(rest.replace("\\", ""))
        if "--help" in argv:
            with pytest.raises(SystemExit, match="0"):
                C.parse_args(argv)
        elif script in ("coworld", "bench") and "cuda" in argv and not torch.cuda.is_available():
            with pytest.raises(C.ConfigError, match="no CUDA device"):  # every flag parses; only the device is missing
                (C.parse_args if script == "coworld" else bench.parse_args)(argv)
        elif script == "coworld":
            C.parse_args(argv)
        elif script == "bench":
            bench.parse_args(argv)
        else:
            envs.build_parser().parse_args(argv)


def test_every_experiments_command_in_the_readme_parses():
    commands = re.findall(r"python experiments\.py ([^`\n]*)", readme())
    assert len(commands) >= 4 and any("--cluster slurm" in c for c in commands)
    assert any(c.startswith("report ") for c in commands) and any("--cluster local" in c for c in commands)
    for command in commands:
        argv = shlex.split(command.replace("\\", ""))
        args = X.build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
        if args.command == "launch":
            assert args.grid in X.GRIDS
        if "--" in argv:
            C.build_parser("coworld.py", "").parse_args(argv[argv.index("--") + 1:])
