"""CoWorld: Collaborative World Models for offline visual RL (Wang et al., ICML 2024).

Read it beside the paper. Above the seam, the method in the paper's order: 1. Config (Table 7);
2. networks (Eq. 1); 3. world-model learning (Eq. 2) and Stage A, state alignment (Eq. 3); 4. Stage B,
reward alignment (Eq. 4, 5); 5. behaviour learning (Eq. 6-11) with Stage C, the min-max value constraint;
6. multi-source selection (App. C, Eq. 12); 7. the update steps, acting and evaluation; 8. Algorithm 1 as
one loop. Below the seam, the harness: run state, checkpoints, signals, logging, datasets, command line.
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import envs  # sets MUJOCO_GL before anything imports mujoco

# =============================================================================================
# 1. Config: Table 7's values as defaults; presets for other scales
# =============================================================================================

def param(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # Run
    source: tuple = param(("metaworld:window-close",), "online source environment(s) S; several: multi-source (App. C)")
    target: str = param("robodesk:open_slide", "offline target task T (its simulator is used for evaluation only)")
    target_data: str = param("", "offline dataset folder B^(T); empty = build (or reuse) a default dataset")
    method: str = param("coworld", "coworld | offline-dv2 (no source, Lu et al. 2023) | dv2-finetune | "
                                   "dv2-finetune-ewc (App. D)")
    logdir: str = param("", "output folder; empty = runs/<method>-<target>-s<seed>")
    data_dir: str = param("data", "where default target datasets are cached")
    preset: str = param("auto", "auto (paper on GPU, small on CPU) | paper | small")
    seed: int = param(0, "random seed")
    device: str = param("auto", "auto | cpu | cuda")
    precision: str = param("auto", "auto (bf16 on CUDA and on CPUs with AMX, else float32) | float32 | bf16")
    compile: str = param("auto", "torch.compile the per-step RSSM functions: auto (on CUDA) | on | off")
    render: str = param("default", "default (the benchmarks' look) | fast (no shadows/reflections/MSAA)")
    threads: int = param(0, "CPU threads of torch (0: the cores other processes leave free, rechecked every 10 s)")
    debug: bool = param(False, "show tracebacks for errors")
    wandb: str = param("", "also log to this Weights & Biases project (needs the wandb package)")
    # Co-training (Table 7; None = the value of the target's suite)
    beta1: float = param(1.0, "beta1: KL loss scale (Eq. 3)")
    beta2: typing.Optional[float] = param(None, "beta2: domain KL loss scale (Eq. 3); 1 MW/RoboDesk, 1.5 DMC")
    k: typing.Optional[float] = param(None, "k: target-informed reward factor (Eq. 4); 0.3 MW/RoboDesk, 0.9 DMC")
    alpha: typing.Optional[float] = param(None, "alpha: target critic value constraint scale (Eq. 6); 2 MW/RD, 1 DMC")
    K1: typing.Optional[int] = param(None, "K1: offline target iterations a round (Alg. 1 line 6); 5e4 MW/RD, 2e4 DMC")
    K2: int = param(20_000, "K2: online source steps per round (Alg. 1 line 16)")
    rounds: typing.Optional[int] = param(None, "rounds of Alg. 1's while loop; default: 300k (MW/RD) or 600k (DMC) "
                                         "target iterations over K1, for every method (App. D)")
    eta_start: float = param(1.0, "eta at the start of the online stages (Eq. 5)")
    eta_end: float = param(0.1, "eta at the end of the online stages (Eq. 5)")
    state_alignment: bool = param(True, "Stage A (Eq. 3); --no-state-alignment is the ablation")
    reward_alignment: bool = param(True, "Stage B (Eq. 4, 5); --no-reward-alignment is the ablation")
    value_constraint: str = param("max", "Stage C (Eq. 6): max | linear ('w/o Max', Sec. 4.5) | none")
    target_pretrain: typing.Optional[int] = param(None, "multi-source: target world-model updates on B^(T) alone "
                                                  "before selecting (App. C step 1); default: a source's pretraining's")
    # World model (Table 7 and DreamerV2)
    replay_capacity: int = param(2_000_000, "capacity of the online source replays in steps (B^(T) loads whole)")
    replay_images: str = param("disk", "replay images in a temporary file in the run folder (disk) | in memory")
    batch_size: int = param(50, "B: batch size")
    seq_len: int = param(50, "L: sequence length")
    stoch: int = param(32, "discrete latent dimensions")
    classes: int = param(32, "discrete latent classes")
    deter: int = param(600, "RSSM number of units (deterministic state)")
    hidden: int = param(600, "RSSM hidden layer size")
    cnn_depth: int = param(48, "CNN depth of the first encoder layer")
    mlp_units: int = param(400, "units of the reward, discount, actor and critic MLPs")
    mlp_layers: int = param(4, "hidden layers of those MLPs")
    kl_balance: float = param(0.8, "KL balancing: weight of KL(sg(q) || p)")
    free_nats: float = param(1.0, "free nats, applied to the batch mean of each KL side")
    model_lr: float = param(2e-4, "world model learning rate")
    ensemble: int = param(7, "prior ensemble size of the offline-dv2 baseline")
    penalty: float = param(10.0, "offline-dv2 reward penalty scale (lambda of Lu et al.)")
    ewc_lambda: float = param(1000.0, "dv2-finetune-ewc: EWC strength lambda (Kirkpatrick et al. 2017)")
    ewc_batches: int = param(20, "dv2-finetune-ewc: source batches the diagonal Fisher is estimated on")
    # Behaviour learning (Table 7, App. A.3)
    horizon: int = param(15, "H: imagination horizon")
    gamma: float = param(0.995, "gamma: discount")
    lambda_: float = param(0.95, "lambda: lambda-target (Eq. 8)")
    actor_lr: float = param(4e-5, "actor learning rate")
    critic_lr: float = param(1e-4, "critic learning rate")
    rho: float = param(1.0, "rho: dynamics backprop vs REINFORCE mix (Eq. 7)")
    beta: float = param(1e-4, "beta: actor entropy scale (Eq. 7)")
    slow_critic_every: int = param(100, "hard copy of the slow target critic every N updates")
    chunks: int = param(1, "memory: decode, recompute the encoder's first convolutions and imagine in this many "
                           "parts (the same gradient; for out-of-memory errors)")
    adam_eps: float = param(1e-5, "Adam epsilon")
    grad_clip: float = param(100.0, "gradient clipping (global norm, per optimiser)")
    # Interaction
    train_every: int = param(5, "environment steps per update online")
    prefill: typing.Optional[int] = param(None, "random steps before training; 5000 MW/RoboDesk, 2500 DMC")
    pretrain_steps: typing.Optional[int] = param(None, "source pretraining steps (Alg. 1 line 3); 160k MW/RD, 600k DMC")
    stop_return: typing.Optional[float] = param(None, "online: stop once the last 5 episodes average this return")
    max_episode_steps: typing.Optional[int] = param(None, "shorter episodes (tests and demos)")
    target_episodes: int = param(200, "episodes in a default target dataset")
    dataset_policy: str = param("auto", "default target dataset's policy: auto (scripted where one exists) | random "
                                        "| scripted")
    # Evaluation, logging, checkpoints
    eval_episodes: int = param(10, "evaluation episodes")
    eval_random: bool = param(False, "also evaluate a uniform random policy")
    eval_every: int = param(10_000, "evaluate the target agent every N of its K1 updates (Alg. 1 line 6), for "
                                    "learning curves (0: at the end only)")
    log_every: int = param(100, "updates between metric logs")
    checkpoint_every: int = param(2000, "updates between checkpoints")
    max_bad_updates: int = param(20, "stop after this many non-finite updates in a row")


# Table 7's per-suite columns (App. D's iteration budget among them): the first five are the target's suite's,
# the last two (source pretraining and its random prefill) the source's.
SUITES = {
    "metaworld": dict(beta2=1.0, k=0.3, alpha=2.0, K1=50_000, iterations=300_000, pretrain_steps=160_000, prefill=5000),
    "robodesk": dict(beta2=1.0, k=0.3, alpha=2.0, K1=50_000, iterations=300_000, pretrain_steps=160_000, prefill=5000),
    "dmc": dict(beta2=1.5, k=0.9, alpha=1.0, K1=20_000, iterations=600_000, pretrain_steps=600_000, prefill=2500),
}
# Presets change scale, never code. `small` makes the default command run end to end in about 40 minutes on a
# 2-core CPU; its RSSM size and learning rates are DreamerV2's own DMC configuration (200 units; 3e-4, 8e-5).
PRESETS = {
    "paper": {},
    "small": dict(
        batch_size=16, seq_len=16, stoch=16, classes=16, deter=200, hidden=200, cnn_depth=16,
        mlp_units=200, mlp_layers=2, model_lr=3e-4, actor_lr=8e-5, critic_lr=8e-5,
        K1=800, K2=2000, rounds=2, pretrain_steps=5000, prefill=1000,
        target_episodes=30, render="fast", replay_capacity=200_000,
        log_every=25, checkpoint_every=250, eval_every=800,
    ),
}
METHODS = ("coworld", "offline-dv2", "dv2-finetune", "dv2-finetune-ewc")
FINETUNE = ("dv2-finetune", "dv2-finetune-ewc")


def family(env_name):
    return env_name.split(":", 1)[0]


def prefill_steps(cfg, env_name):
    return cfg.prefill if cfg.prefill is not None else SUITES[family(env_name)]["prefill"]


def suite_defaults(cfg, command="train"):
    """The values of Table 7's per-suite (None) fields for this run: beta2, k, alpha and K1 from the target's
    suite (online: the environment's), pretraining from the source's; App. C step 1's target pretraining as many
    updates as a source's world model gets in its pretraining; rounds such that every method trains the target
    App. D's 300k (DMC 600k) iterations."""
    target = SUITES.get(family(cfg.source[0] if command == "online" else cfg.target), SUITES["metaworld"])
    source = SUITES.get(family(cfg.source[0]), target)
    values = {name: target[name] for name in ("beta2", "k", "alpha", "K1") if getattr(cfg, name) is None}
    if cfg.pretrain_steps is None:
        values["pretrain_steps"] = source["pretrain_steps"]
    if cfg.target_pretrain is None:
        prefill = cfg.prefill if cfg.prefill is not None else source["prefill"]
        pretrain = values.get("pretrain_steps", cfg.pretrain_steps)
        values["target_pretrain"] = max(0, pretrain - prefill) // cfg.train_every
    if cfg.rounds is None:
        values["rounds"] = max(1, math.ceil(target["iterations"] / max(1, values.get("K1", cfg.K1))))
    return values


# =============================================================================================
# 2. Networks: the world model of Eq. (1) and the actor-critic of App. A.3
# =============================================================================================

def preprocess(image):
    """uint8 pixels -> [-0.5, 0.5], the scale the decoder's Normal(mean, 1) is fitted on."""
    return image.float() / 255.0 - 0.5


class Encoder(nn.Module):
    """Image encoding e_t = e_phi(o_t) (Eq. 1): four 4x4 stride-2 convolutions, 64 -> 31 -> 14 -> 6 -> 2."""

    def __init__(self, depth, chunks=1):
        super().__init__()
        layers, channels = [], 3
        for i in range(4):
            layers += [nn.Conv2d(channels, depth * 2 ** i, 4, 2), nn.ELU()]
            channels = depth * 2 ** i
        self.net = nn.Sequential(*layers)
        self.out_dim, self.chunks = 32 * depth, chunks

    def forward(self, image):  # (..., 64, 64, 3) uint8 -> (..., 32 * depth)
        lead = image.shape[:-3]
        x = preprocess(image.reshape(-1, *image.shape[-3:])).permute(0, 3, 1, 2)  # (N, 3, 64, 64)
        x = x.contiguous(memory_format=torch.channels_last)
        front, back = self.net[:4], self.net[4:]  # the first two convolutions, the last two
        if self.chunks > 1 and torch.is_grad_enabled():  # memory device (section 7): recomputed in parts
            x = recompute_in_chunks(front, x, self.chunks)
        else:
            x = front(x)
        return back(x).reshape(*lead, self.out_dim)


class Decoder(nn.Module):
    """Reconstruction o_t ~ p_phi(o_t | h_t, z_t) (Eq. 1): dense, then transposed convs 1 -> 5 -> 13 -> 30 -> 64."""

    def __init__(self, feat_dim, depth):
        super().__init__()
        self.depth = depth
        self.fc = nn.Linear(feat_dim, 32 * depth)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, 2), nn.ELU(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, 2), nn.ELU(),
            nn.ConvTranspose2d(2 * depth, depth, 6, 2), nn.ELU(),
            nn.ConvTranspose2d(depth, 3, 6, 2))
        # Speed device: on its 1x1 input the first transposed convolution is one matrix product, and computed as
        # one it takes half the decoder's time off a CPU update (bench.py --plain measures without it).
        self.first_as_matmul = True

    def forward(self, feat):  # (..., F) -> image mean (..., 64, 64, 3)
        lead = feat.shape[:-1]
        x = self.fc(feat).reshape(-1, 32 * self.depth)  # (N, 32 * depth)
        first, k = self.net[0], self.net[0].kernel_size[0]
        if self.first_as_matmul:
            x = F.linear(x, first.weight.flatten(1).T, first.bias.repeat_interleave(k * k)).unflatten(-1, (-1, k, k))
        else:
            x = first(x[..., None, None].contiguous(memory_format=torch.channels_last))
        x = self.net[1:](x.contiguous(memory_format=torch.channels_last))  # (N, 3, 64, 64)
        return x.permute(0, 2, 3, 1).reshape(*lead, 64, 64, 3)


def mlp(inp, out, units, layers):
    """The ELU MLP used for the reward, discount, actor and critic heads."""
    parts, size = [], inp
    for _ in range(layers):
        parts += [nn.Linear(size, units), nn.ELU()]
        size = units
    return nn.Sequential(*parts, nn.Linear(size, out))


class GRUCell(nn.Module):
    """The recurrent transition f of Eq. (1), DreamerV2's GRU: one dense layer (with bias) on [x, h], LayerNorm of
    the pre-activations, update gate biased by -1."""

    def __init__(self, inp, size):
        super().__init__()
        self.layer = nn.Linear(inp + size, 3 * size)
        self.norm = nn.LayerNorm(3 * size, eps=1e-3)

    def forward(self, x, h):
        reset, cand, update = self.norm(self.layer(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return update * cand + (1 - update) * h


def straight_through_sample(logits):
    """z_t of Eq. (1): a one-hot sample of each categorical latent with straight-through gradients,
    sample + p - sg(p)."""
    logits = logits.float()
    probs = logits.softmax(-1)
    # Gumbel-max: argmax(log p - log E) ~ Categorical(p) for E ~ Exp(1), with no host sync. E = -log(1 - U)
    # from uniform noise is 4x faster on CPU than exponential_ (1 s of a paper-size update). torch.rand draws
    # k / 2^24, so U = 0 comes once in 2^24 draws and gives E = 0, a class that wins whatever its probability:
    # half a step up, U lies in (0, 1).
    exp_noise = torch.rand_like(logits).add_(2 ** -25).neg_().log1p_().neg_()
    index = (logits - exp_noise.log_()).argmax(-1)
    sample = F.one_hot(index, logits.shape[-1]).to(probs.dtype)
    return sample + probs - probs.detach()


class RSSM(nn.Module):
    """Recurrent state-space model of Eq. (1).

    h_t = f(h_{t-1}, z_{t-1}, a_{t-1})      recurrent transition (GRU)
    z_t ~ q(z_t | h_t, e_t)                 posterior, 32 categoricals x 32 classes
    z_t ~ p(z_t | h_t)                      prior (an ensemble of priors for the offline-dv2 baseline)
    States are (h, z) with z flattened to (..., stoch * classes); features are [z, h].
    Actions live in the shared space of size action_size; the model sees only the first env_actions
    dimensions (its environment's), the rest as zero, exactly as its replay stores them (pad_action).
    """

    def __init__(self, action_size, embed_dim, stoch, classes, deter, hidden, ensemble=1, env_actions=None):
        super().__init__()
        self.stoch, self.classes, self.deter = stoch, classes, deter
        mask = torch.arange(action_size) < (env_actions or action_size)
        self.register_buffer("action_mask", mask.float(), persistent=False)
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_size, hidden), nn.ELU())
        self.gru = GRUCell(hidden, deter)
        self.priors = nn.ModuleList(
            nn.Sequential(nn.Linear(deter, hidden), nn.ELU(), nn.Linear(hidden, stoch * classes))
            for _ in range(ensemble))
        self.posterior = nn.Sequential(nn.Linear(deter + embed_dim, hidden), nn.ELU(),
                                       nn.Linear(hidden, stoch * classes))

    def initial(self, batch, device):
        return (torch.zeros(batch, self.deter, device=device),
                torch.zeros(batch, self.stoch * self.classes, device=device))

    def prior_logits(self, h):
        """p(z_t | h_t) of every prior member: (..., deter) -> (E, ..., stoch, classes)."""
        return torch.stack([p(h) for p in self.priors]).unflatten(-1, (self.stoch, self.classes))

    def draw_member(self):
        """The prior member an imagination step uses: a random one with an ensemble (Lu et al. 2023; V-D4RL's
        img_step draws one at each call), so the others' heads are not computed for it."""
        return int(torch.randint(len(self.priors), ())) if len(self.priors) > 1 else 0

    def filtering_prior(self, h):
        """p(z_t | h_t) over filtered states, (B, T, D) -> (B, T, S, C): with an ensemble each time step under a
        member drawn for it and shared by the batch, as V-D4RL's filtering step draws one in its img_step; each
        head runs only on its own steps."""
        if len(self.priors) == 1:
            return self.priors[0](h).unflatten(-1, (self.stoch, self.classes))
        members = torch.randint(len(self.priors), (h.shape[1],))  # (T,), on the CPU: grouping needs no device sync
        order = members.argsort(stable=True)  # the steps grouped by member
        counts = members.bincount(minlength=len(self.priors)).tolist()
        parts = h[:, order.to(h.device, non_blocking=True)].split(counts, 1)
        logits = torch.cat([prior(part) for prior, part, n in zip(self.priors, parts, counts) if n], 1)
        back = order.argsort().to(h.device, non_blocking=True)  # to time order
        return logits[:, back].unflatten(-1, (self.stoch, self.classes))

    def transition(self, h, z, action):
        """h_t = f(h_{t-1}, z_{t-1}, a_{t-1})."""
        return self.gru(self.img_in(torch.cat([z, action * self.action_mask], -1)), h)

    def obs_step(self, h, z, action, embed, is_first):
        """One filtering step: reset where an episode starts, transition, then the posterior q(z_t | h_t, e_t)."""
        keep = (~is_first).to(h.dtype).unsqueeze(-1)
        h = self.transition(h * keep, z * keep, action * keep)
        logits = self.posterior(torch.cat([h, embed], -1)).unflatten(-1, (self.stoch, self.classes))
        return h, straight_through_sample(logits).flatten(-2), logits

    def img_step(self, h, z, action, member=0):
        """One imagination step under the prior (its member ``member`` with an ensemble)."""
        h = self.transition(h, z, action)
        logits = self.priors[member](h).unflatten(-1, (self.stoch, self.classes))  # one head, no stacked copy
        return h, straight_through_sample(logits).flatten(-2)

    def observe(self, embed, action, is_first, state=None):
        """Filter a batch of sequences: (B, T, E), (B, T, A), (B, T) -> h (B, T, D), z (B, T, S*C), the posterior's
        logits (B, T, S, C)."""
        B, T = is_first.shape
        h, z = state if state is not None else self.initial(B, embed.device)
        hs, zs, post = [], [], []
        for t in range(T):
            h, z, logits = self.obs_step(h, z, action[:, t], embed[:, t], is_first[:, t])
            hs.append(h), zs.append(z), post.append(logits)
        return torch.stack(hs, 1), torch.stack(zs, 1), torch.stack(post, 1)


class TruncatedNormal:
    """The action distribution of pi(a_t | z_t) in Eq. (7, 9): Normal(loc, scale) truncated to [-1, 1], with
    sample, log_prob and entropy of the truncated law.

    The authors' 'truncated normal' was an untruncated Normal (its rsample skipped the override).
    Sampling inverts the CDF, so samples stay in range and carry reparameterised gradients.
    """

    low, high = -1.0, 1.0

    def __init__(self, loc, scale, dims=None):
        """dims (A,), 0/1: the action dimensions log_prob and entropy count (None: all)."""
        self.loc, self.scale, self.dims = loc.float(), scale.float(), dims
        self.a = (self.low - self.loc) / self.scale
        self.b = (self.high - self.loc) / self.scale
        self.cdf_a, self.cdf_b = torch.special.ndtr(self.a), torch.special.ndtr(self.b)
        self.Z = (self.cdf_b - self.cdf_a).clamp_min(1e-6)

    def rsample(self):
        u = torch.rand_like(self.loc)
        p = (self.cdf_a + u * self.Z).clamp(1e-6, 1 - 1e-6)
        x = self.loc + self.scale * torch.special.ndtri(p)
        return x.clamp(self.low, self.high)

    def log_prob(self, x):  # summed over the action dimensions
        log_pdf = -0.5 * ((x - self.loc) / self.scale) ** 2 - 0.5 * math.log(2 * math.pi)
        return self.sum(log_pdf - self.scale.log() - self.Z.log())

    def entropy(self):
        def phi(x):
            return torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)
        ent = (0.5 * math.log(2 * math.pi * math.e) + self.scale.log() + self.Z.log()
               + (self.a * phi(self.a) - self.b * phi(self.b)) / (2 * self.Z))
        return self.sum(ent)

    def sum(self, per_dim):
        return (per_dim if self.dims is None else per_dim * self.dims).sum(-1)

    def mode(self):
        return self.loc.clamp(self.low, self.high)


class Actor(nn.Module):
    """The actor pi_psi(a_t | z_t) of Eq. (7, 9) / App. A.3: mean tanh(x), std 2 * sigmoid(s / 2) + 0.1, truncated
    to [-1, 1]. The critic v_xi(z_t) of Eq. (6, 9) is a plain MLP (Agent.critic).

    It acts in the shared action space; its log-probability and entropy (Eq. 7) count only the first
    env_actions dimensions, those its environment has (the rest reach neither the world model nor the env)."""

    def __init__(self, feat_dim, action_size, units, layers, env_actions=None):
        super().__init__()
        self.net = mlp(feat_dim, 2 * action_size, units, layers)
        dims = torch.arange(action_size) < (env_actions or action_size)
        self.register_buffer("dims", dims.float(), persistent=False)

    def forward(self, feat):
        mean, std = self.net(feat).float().chunk(2, -1)
        return TruncatedNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + 0.1, self.dims)

    def sample(self, feat):
        """A reparameterised action, the log-probability of the (detached) action, the entropy: (N, A), (N,), (N,)."""
        dist = self(feat)
        action = dist.rsample()
        return action, dist.log_prob(action.detach()), dist.entropy()


class WorldModel(nn.Module):
    """M_phi of Eq. (1): encoder, RSSM, decoder, reward predictor and discount predictor."""

    def __init__(self, cfg, action_size, ensemble=1, env_actions=None):
        super().__init__()
        self.encoder = Encoder(cfg.cnn_depth, cfg.chunks)
        self.rssm = RSSM(action_size, self.encoder.out_dim, cfg.stoch, cfg.classes, cfg.deter, cfg.hidden, ensemble,
                         env_actions)
        self.feat_dim = cfg.stoch * cfg.classes + cfg.deter
        self.decoder = Decoder(self.feat_dim, cfg.cnn_depth)
        self.reward = mlp(self.feat_dim, 1, cfg.mlp_units, cfg.mlp_layers)
        self.discount = mlp(self.feat_dim, 1, cfg.mlp_units, cfg.mlp_layers)

    def observe(self, batch, embed=None):
        """Encode and filter a batch: features [z, h] (B, T, F), the states, the posterior's logits, the embedding."""
        embed = self.encoder(batch["image"]) if embed is None else embed  # (B, T, E)
        h, z, post = self.rssm.observe(embed, batch["action"], batch["is_first"])
        return torch.cat([z, h], -1), (h, z), post, embed


# =============================================================================================
# 3. World-model learning (Eq. 2) and Stage A: offline-to-online state alignment (Eq. 3)
# =============================================================================================

def gaussian_nll(mean, target):
    """-ln Normal(target; mean, 1), elementwise."""
    return 0.5 * (target - mean.float()) ** 2 + 0.5 * math.log(2 * math.pi)


def image_nll(mean, image):
    """Eq. (2)'s -ln p(o | h, z) for a Normal(mean, 1) over every pixel, summed over pixels and averaged over frames."""
    target = preprocess(image)  # (..., 64, 64, 3)
    return (0.5 * F.mse_loss(mean.float(), target, reduction="sum") / target.shape[:-3].numel()
            + 0.5 * math.log(2 * math.pi) * target.shape[-3:].numel())


def categorical_kl(p_logits, q_logits):
    """Eq. (2)'s KL[p || q] of the categorical latents, summed over the latents: (..., S, C) -> (...)."""
    p_log = p_logits.float().log_softmax(-1)
    return (p_log.exp() * (p_log - q_logits.float().log_softmax(-1))).sum((-2, -1))


def kl_loss(post, prior, balance, free):
    """KL term of Eq. (2) with DreamerV2's balancing and free nats.

    balance * max(KL[sg(q) || p], free) + (1 - balance) * max(KL[q || sg(p)], free): the first side trains
    the prior toward the posterior, the second regularises the posterior; free nats apply to each batch
    mean. post and prior: logits (..., S, C) of the same shape.
    """
    prior_side = categorical_kl(post.detach(), prior).mean()
    post_side = categorical_kl(post, prior.detach()).mean()
    loss = balance * prior_side.clamp_min(free) + (1 - balance) * post_side.clamp_min(free)
    return loss, prior_side.detach()


def world_model_loss(wm, batch, cfg, reward_term=None):
    """Eq. (2) / the first part of Eq. (3): -ln p(o|h,z) - ln r(r|h,z) - ln p(gamma|h,z) + beta1 KL[q || p],
    averaged over (B, T). Eq. (2) has no beta1; it is Eq. (3)'s, 1 in Table 7, applied to both models.

    reward_term maps the reward NLL to the loss's reward term: the source model passes Eq. (5).
    Returns the loss, its terms, the posterior states (h, z) and the embedding e(o).
    """
    B, T = batch["is_first"].shape
    feat, state, post, embed = wm.observe(batch)  # feat (B, T, F); post (B, T, S, C)
    assert feat.shape == (B, T, wm.feat_dim) and post.shape[:2] == (B, T), (feat.shape, post.shape)
    if cfg.chunks > 1:  # memory device (section 7): the decoder's gradient computed in parts, the same values
        image = decoded_image_nll(wm.decoder, feat, batch["image"], cfg.chunks)
    else:
        image = image_nll(wm.decoder(feat), batch["image"])
    terms = {
        "image_nll": image,
        "reward_nll": gaussian_nll(wm.reward(feat).squeeze(-1), batch["reward"]).mean(),
        "discount_nll": F.binary_cross_entropy_with_logits(
            wm.discount(feat).squeeze(-1).float(), cfg.gamma * (1.0 - batch["is_terminal"].float())),
    }
    prior = wm.rssm.filtering_prior(state[0])  # (B, T, S, C)
    terms["kl_loss"], terms["kl"] = kl_loss(post, prior, cfg.kl_balance, cfg.free_nats)
    reward = terms["reward_nll"] if reward_term is None else reward_term(terms["reward_nll"])
    loss = terms["image_nll"] + reward + terms["discount_nll"] + cfg.beta1 * terms["kl_loss"]
    return loss, {k: v.detach() for k, v in terms.items()}, state, embed


def state_alignment(e_source, e_target):
    """Eq. (3), domain alignment term: KL[sg(g(e_phi'(o))) || g(e_phi(o))] per frame, g = softmax.

    (..., E) -> (...). Only the target encoder gets gradient; callers take the mean over frames, so
    the scale does not grow with the sequence length (the authors' 'batchmean' did).
    """
    log_p = e_source.detach().float().log_softmax(-1)
    log_q = e_target.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# =============================================================================================
# 4. Stage B: online-to-offline reward alignment (Eq. 4, 5)
# =============================================================================================

def relabel_reward(r_source, r_target, k):
    """Eq. (4): r~ = (1 - k) * sg(r_phi'(h~, z~)) + k * r^(T)."""
    return (1 - k) * r_source.detach() + k * r_target


def eta_schedule(step, total, start=1.0, end=0.1):
    """Eq. (5)'s eta: linear from `start` to `end` over the online stages (the authors' never moved)."""
    progress = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    return start + (end - start) * progress


def reward_alignment_loss(source_nll, relabelled_nll, eta):
    """Eq. (5): eta * E_B(S)[-ln r(r^(S))] + (1 - eta) * E_B(T)[-ln r(r~^(S))]."""
    return eta * source_nll + (1 - eta) * relabelled_nll


# =============================================================================================
# 5. Behaviour learning: imagination, lambda-return (Eq. 8), critic (Eq. 6, 11), actor (Eq. 7, 10)
# =============================================================================================

def imagine(wm, actor, h, z, horizon):
    """Roll the prior forward H steps from every start state under pi (Alg. 1 lines 11 and 23).

    Returns features (H+1, N, F), h (H+1, N, D), and per step the action log-prob and entropy (H, N).
    Actions keep their reparameterised gradient (dynamics backprop); the actor sees sg(features).
    """
    feats, hs, log_probs, entropies = [torch.cat([z, h], -1)], [h], [], []
    for _ in range(horizon):
        action, log_prob, entropy = actor.sample(feats[-1].detach())
        log_probs.append(log_prob)
        entropies.append(entropy)
        h, z = wm.rssm.img_step(h, z, action.to(h.dtype), wm.rssm.draw_member())
        feats.append(torch.cat([z, h], -1))
        hs.append(h)
    return torch.stack(feats), torch.stack(hs), torch.stack(log_probs), torch.stack(entropies)


def ensemble_disagreement(rssm, h):
    """Offline-dv2's uncertainty: mean distance of the prior members' means from their average. (..., D) -> (...)."""
    probs = rssm.prior_logits(h).float().softmax(-1).flatten(-2)  # (E, ..., S*C)
    return (probs - probs.mean(0)).norm(dim=-1).mean(0)


def lambda_return(reward, value, discount, lambda_):
    """Eq. (8): V_t = r_t + gamma_t [(1 - lambda) v(z_{t+1}) + lambda V_{t+1}], bootstrapped with V_H = v(z_H).

    reward, discount: (H, N) for states 0..H-1; value: (H+1, N) for states 0..H. Returns V: (H, N),
    in time order (the authors' scan returned it reversed).

        States:    z0 -> z1 -> ... -> z_{H-1} -> z_H
        Rewards:   r0    r1          r_{H-1}
        Values:    v0    v1          v_{H-1}    v_H   (v_H bootstraps V_{H-1})
        Returns:   V0    V1          V_{H-1}
    """
    returns, next_return = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        next_return = reward[t] + discount[t] * ((1 - lambda_) * value[t + 1] + lambda_ * next_return)
        returns.append(next_return)
    return torch.stack(returns[::-1])


def value_constraint(v, v_source, alpha, kind="max"):
    """Eq. (6), min-max value constraint: alpha * max(v_xi(z), sg(v_xi'(z))).

    kind="linear" is Section 4.5's "w/o Max" variant (alpha * v). Without Stage C (--value-constraint none)
    critic_loss gets no source value and is Eq. (11).
    """
    if kind == "max":
        return alpha * torch.maximum(v, v_source.detach())
    if kind == "linear":
        return alpha * v
    raise ValueError(f"value constraint {kind!r}: max or linear")


def critic_loss(v, V, weight, v_source=None, alpha=0.0, kind="max"):
    """Eq. (6) / Eq. (11): E[sum_t w_t (1/2 (v(z_t) - sg(V_t))^2 + value constraint)], over (H, N).

        States:    [z0] [z1] ... [z_{H-1}]  z_H
        Targets:   [V0] [V1] ... [V_{H-1}]        (lambda_return)
        Weights:   [w0] [w1] ... [w_{H-1}]  w_H   (the caller passes weight[:-1])
    """
    loss = 0.5 * (v - V.detach()) ** 2
    if v_source is not None:
        loss = loss + value_constraint(v, v_source, alpha, kind)
    return (weight.detach() * loss).mean()


def actor_loss(V, baseline, log_prob, entropy, weight, rho, beta):
    """Eq. (7) / Eq. (10): -E[sum_t w_t (beta H[pi(.|z_t)] + rho V + (1 - rho) ln pi(a_t|z_t) sg(V - v(z_t)))].

    The action at state t leads to state t+1, so it is scored by V_{t+1} (DreamerV2's indexing):
    V (H, N); baseline, weight (H+1, N); log_prob, entropy (H, N). Uses states 0..H-2.

        States:     [z0] -> [z1] -> ... -> [z_{H-2}] -> z_{H-1} -> z_H
        Actions:    [a0]    [a1]           [a_{H-2}]    a_{H-1}
        Targets:     V0     [V1]    ...    [V_{H-1}]                  V[1:]
        Baselines:  [v0]    [v1]           [v_{H-2}]    v_{H-1}   v_H  baseline[:-2]
        Weights:    [w0]    [w1]           [w_{H-2}]    w_{H-1}   w_H  weight[:-2]
    """
    target = V[1:]
    advantage = (target - baseline[:-2]).detach()
    objective = rho * target + (1 - rho) * log_prob[:-1] * advantage + beta * entropy[:-1]
    return -(weight[:-2].detach() * objective).mean()


def behaviour_losses(agent, h, z, is_terminal, cfg, source_critics=None, omega=None):
    """Alg. 1 lines 11-13 (target) / 23-24 (source): imagine from every posterior state, then Eq. (8), (6), (7).

    h (..., D), z (..., S*C), is_terminal (...): the start states. source_critics with one-hot weights omega give
    v_xi'(z^(T)) for the value constraint (Eq. 6, 12).
    """
    wm, H = agent.wm, cfg.horizon
    h, z = h.detach().flatten(0, -2), z.detach().flatten(0, -2)  # every start state: (N, D), (N, S*C)
    is_terminal, N = is_terminal.flatten(), len(h)
    feat, hs, log_prob, entropy = imagine(wm, agent.actor, h, z, H)  # (H+1, N, F), (H+1, N, D)
    # Eq. (8) needs r and gamma of states 0..H-1 only; the heads skip the states whose outputs go unused.
    reward = wm.reward(feat[:-1]).squeeze(-1).float()  # (H, N)
    if len(wm.rssm.priors) > 1:  # offline-dv2: reward minus lambda * ensemble disagreement
        reward = reward - cfg.penalty * ensemble_disagreement(wm.rssm, hs[:-1])
    discount = torch.sigmoid(wm.discount(feat[1:-1]).squeeze(-1).float())  # (H-1, N), states 1..H-1
    discount = torch.cat([cfg.gamma * (1.0 - is_terminal.float())[None], discount])  # (H, N); state 0 from the data
    weight = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount]), 0)  # (H+1, N)
    slow_value = agent.slow_critic(feat).squeeze(-1).float()  # (H+1, N)
    V = lambda_return(reward, slow_value, discount, cfg.lambda_)  # (H, N)
    assert V.shape == (H, N) and weight.shape == slow_value.shape == (H + 1, N), (V.shape, weight.shape)
    losses = {"actor": actor_loss(V, slow_value, log_prob, entropy, weight, cfg.rho, cfg.beta)}
    v = agent.critic(feat[:-1].detach()).squeeze(-1).float()  # (H, N)
    v_source = None
    if source_critics:
        with torch.no_grad():
            values = torch.stack([c(feat[:-1].detach()).squeeze(-1).float() for c in source_critics])  # (I, H, N)
            v_source = torch.einsum("i,i...->...", omega, values)  # (H, N)
    losses["critic"] = critic_loss(v, V, weight[:-1], v_source, cfg.alpha, cfg.value_constraint)
    metrics = {"imag_reward": reward.mean().detach(), "imag_value": v.mean().detach(),
               "lambda_return": V.mean().detach(), "actor_entropy": entropy.mean().detach()}
    if v_source is not None:
        metrics["source_value"] = v_source.mean()
        metrics["constraint_active"] = (v.detach() > v_source).float().mean()
    return losses, metrics


# =============================================================================================
# 6. Multi-source selection (Appendix C, Eq. 12)
# =============================================================================================

def select_source(e_sources, e_target):
    """App. C, the weights omega of Eq. (12): one-hot on the source whose encoder, fed the target observations, is
    closest in KL to the target encoder: omega_i = 1 for argmin_i mean KL[sg(g(e_phi'_i(o^T))) || g(e_phi(o^T))].

    e_sources: (N, ..., E); e_target: (..., E). Returns omega (N,) and the per-source alignment KLs (N,).
    """
    kls = torch.stack([state_alignment(e, e_target).mean() for e in e_sources])
    omega = F.one_hot(kls.detach().argmin(), len(kls)).to(kls.dtype)
    return omega, kls


# =============================================================================================
# 7. The update steps, acting and evaluation
# =============================================================================================

class Agent(nn.Module):
    """One DreamerV2 agent {phi, psi, xi}: the world model and the actor and critic of Eq. (7, 9), with its
    three Adam optimisers and a slow target critic. With ewc set (DV2 Finetune+EWC), every loss gets its EWC
    penalty."""

    def __init__(self, cfg, action_size, ensemble=1, env_actions=None):
        super().__init__()
        self.cfg, self.action_size = cfg, action_size
        self.wm = WorldModel(cfg, action_size, ensemble, env_actions).to(memory_format=torch.channels_last)
        self.actor = Actor(self.wm.feat_dim, action_size, cfg.mlp_units, cfg.mlp_layers, env_actions)
        self.critic = mlp(self.wm.feat_dim, 1, cfg.mlp_units, cfg.mlp_layers)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        if cfg.compile == "on":
            compile_steps(self.wm.rssm, self.actor)
        self.updates = 0
        self.bad_updates = 0
        self.pending = {}
        self.ewc = None  # {"anchor": {network: [theta*]}, "fisher": {network: [F]}}
        self.single_thread_acting = cfg.device == "cpu"

    def build_optimisers(self):
        cfg = self.cfg
        # fused: one kernel for all of a network's parameters instead of a dozen operations per tensor
        self.opts = {name: torch.optim.Adam(module.parameters(), lr=lr, eps=cfg.adam_eps, fused=True)
                     for name, module, lr in (("model", self.wm, cfg.model_lr), ("actor", self.actor, cfg.actor_lr),
                                              ("critic", self.critic, cfg.critic_lr))}
        self.params = {"model": list(self.wm.parameters()), "actor": list(self.actor.parameters()),
                       "critic": list(self.critic.parameters())}
        return self

    def backward(self, name, loss, accumulate=False):
        """Gradient of one loss ("model", "actor" or "critic") into its own parameters only; with accumulate,
        added to the gradient already there. Called as soon as each loss exists, so its graph is freed
        before the next is built."""
        if not accumulate:
            self.opts[name].zero_grad(set_to_none=True)
            if self.ewc is not None:
                loss = loss + ewc_penalty(self.params[name], self.ewc["anchor"][name], self.ewc["fisher"][name],
                                          self.cfg.ewc_lambda)
        loss.backward(inputs=self.params[name])
        self.pending[name] = loss.detach() + self.pending[name] if accumulate else loss.detach()

    def step(self):
        """Clip each gradient at its global norm, then step the optimisers that got gradients, or none when
        any loss or gradient is not finite. This check is the update's one host synchronisation."""
        pending, self.pending = self.pending, {}
        clip = torch.nn.utils.clip_grad_norm_
        checks = {name: torch.stack([loss.float(), clip(self.params[name], self.cfg.grad_clip)])
                  for name, loss in pending.items()}
        norms = {f"{name}_grad_norm": pair[1] for name, pair in checks.items()}
        if not bool(torch.stack(list(checks.values())).isfinite().all()):
            self.bad_updates += 1
            self.faults = [name for name, pair in checks.items() if not pair.isfinite().all()]
            return norms, False
        for name in pending:
            self.opts[name].step()
        self.bad_updates = 0
        if self.updates % self.cfg.slow_critic_every == 0:
            self.slow_critic.load_state_dict(self.critic.state_dict())
        self.updates += 1
        return norms, True

    @torch.no_grad()
    def act(self, obs, state, explore):
        """One step of the policy on a single observation; state carries (h, z, a_{t-1}) between steps. Speed device:
        on a CPU it runs on one thread, as fast as two on a quiet machine and 5x faster beside a busy process
        (bench.py's acting line, with and without it)."""
        if self.single_thread_acting and torch.get_num_threads() > 1:
            with threads(1):
                return self.act(obs, state, explore)
        device = next(self.parameters()).device
        image = torch.as_tensor(obs["image"], device=device)[None]
        if state is None:
            h, z = self.wm.rssm.initial(1, device)
            state = (h, z, torch.zeros(1, self.action_size, device=device))
        h, z, prev_action = state
        is_first = torch.tensor([bool(obs["is_first"])], device=device)
        h, z, _ = self.wm.rssm.obs_step(h, z, prev_action, self.wm.encoder(image), is_first)
        dist = self.actor(torch.cat([z, h], -1))
        action = dist.rsample() if explore else dist.mode()
        return action[0].cpu().numpy(), (h, z, action), self.critic(torch.cat([z, h], -1))[0, 0].item()

    def state(self):
        return {"model": self.state_dict(), "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "updates": self.updates, "ewc": self.ewc}

    def load(self, state):
        self.load_state_dict(state["model"])
        for name, opt in self.opts.items():
            opt.load_state_dict(state["opts"][name])
        self.updates, self.ewc = state["updates"], state["ewc"]


@contextlib.contextmanager
def threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compile_steps(rssm, actor):
    """Speed device (--compile, default on CUDA): torch.compile the functions called once per time step, the RSSM's
    filtering and imagination steps and the actor's sampling. On a GPU an update is launch-bound (about 10,000
    small kernels for 65 sequential steps); compiling fuses each step's element-wise work (GRU gates, LayerNorm,
    sampling) into few kernels. Each distinct batch shape compiles once (and offline-dv2's imagination step once per
    prior member, its int argument)."""
    rssm.obs_step = torch.compile(rssm.obs_step, dynamic=False)
    rssm.img_step = torch.compile(rssm.img_step, dynamic=False)
    actor.sample = torch.compile(actor.sample, dynamic=False)


def autocast(cfg):
    return torch.autocast(device_type=cfg.device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def check_batch(batch, action_size):
    """The seam between data and model: every sequence batch is (B, T, ...)."""
    B, T = batch["is_first"].shape
    shapes = {k: tuple(v.shape[:2]) for k, v in batch.items()}
    assert all(s == (B, T) for s in shapes.values()) and batch["action"].shape[-1] == action_size, shapes
    return B, T


def target_update(target, batch, cfg, sources=()):
    """Alg. 1 lines 9-13 (offline domain). Without sources this is a plain DreamerV2 update.

    Line 9: the target world model with Eq. (3) (Stage A; with several sources the one App. C's select_source
    chooses, weighted by Eq. 12); lines 11-13: imagination, critic with Eq. (6) (Stage C), actor with Eq. (7).
    """
    B, T = check_batch(batch, target.action_size)
    with autocast(cfg):
        if sources:  # the source encoders see the same target observations, before the target's graph exists
            with torch.no_grad():
                e_sources = torch.stack([s.wm.encoder(batch["image"]) for s in sources])  # (I, B, T, E)
        wm_loss, metrics, (h, z), embed = world_model_loss(target.wm, batch, cfg)
        omega, critics = None, None
        if sources:
            omega, kls = select_source(e_sources, embed)  # App. C
            domain_kl = (omega * kls).sum()  # Eq. (12); Eq. (3) with one source
            metrics["domain_kl"] = domain_kl.detach()
            if cfg.state_alignment:
                wm_loss = wm_loss + cfg.beta2 * domain_kl
            if cfg.value_constraint != "none":
                critics = [s.critic for s in sources]
    target.backward("model", wm_loss)
    assert h.shape[:2] == z.shape[:2] == (B, T), (h.shape, z.shape)
    metrics.update(learn_behaviour(target, h, z, batch["is_terminal"], cfg, critics, omega))
    norms, ok = target.step()
    metrics.update(norms, model_loss=wm_loss.detach())
    if omega is not None:
        metrics["omega"] = omega.detach()
    return metrics, ok


def source_update(source, batch, cfg, target_batch=None, eta=1.0):
    """Alg. 1 lines 20-24 (online domain): the source world model with Eq. (2) + Eq. (5), then behaviour.

    Line 20, Eq. (4): the source model filters the target sequence (target images, target actions in the
    shared action space) to latents (h~, z~) and relabels r~ = (1-k) sg(r_phi'(h~, z~)) + k r^(T). Eq. (5) is
    L_r(phi'), over the whole source world model: its relabelled term trains the reward predictor and, through
    (h~, z~), the encoder and RSSM ("we integrate Eq. (5) into Eq. (2) to train the entire world model").
    """
    B, T = check_batch(batch, source.action_size)
    with autocast(cfg):
        reward_term, relabelled = None, {}
        if target_batch is not None:
            feat_T = source.wm.observe(target_batch)[0]  # (B, T, F): [z~, h~], the source's latents of the target data
            r_pred = source.wm.reward(feat_T).squeeze(-1)  # (B, T)
            r_tilde = relabel_reward(r_pred, target_batch["reward"], cfg.k)  # line 20, Eq. (4): a stop-gradient target
            relabelled_nll = gaussian_nll(r_pred, r_tilde.float()).mean()
            reward_term = lambda source_nll: reward_alignment_loss(source_nll, relabelled_nll, eta)  # noqa: E731, Eq. (5)
            relabelled = {"relabelled_nll": relabelled_nll.detach(), "relabelled_reward": r_tilde.mean().detach()}
        wm_loss, metrics, (h, z), _ = world_model_loss(source.wm, batch, cfg, reward_term)  # line 21
        metrics.update(relabelled)
    source.backward("model", wm_loss)
    assert h.shape[:2] == z.shape[:2] == (B, T), (h.shape, z.shape)
    metrics.update(learn_behaviour(source, h, z, batch["is_terminal"], cfg))
    norms, ok = source.step()
    metrics.update(norms, model_loss=wm_loss.detach())
    if target_batch is not None:
        metrics["eta"] = torch.tensor(eta)
    return metrics, ok


def world_model_update(agent, batch, cfg):
    """App. C step 1: the world model alone on its own data, Eq. (2): no alignment, no behaviour learning."""
    check_batch(batch, agent.action_size)
    with autocast(cfg):
        wm_loss, metrics, _, _ = world_model_loss(agent.wm, batch, cfg)
    agent.backward("model", wm_loss)
    norms, ok = agent.step()
    metrics.update(norms, model_loss=wm_loss.detach())
    return metrics, ok


def ewc_penalty(params, anchor, fisher, lambda_):
    """DV2 Finetune+EWC (App. D; Kirkpatrick et al. 2017): lambda / 2 * sum_i F_i (theta_i - theta*_i)^2."""
    return 0.5 * lambda_ * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchor, fisher))


def diagonal_fisher(agent, batches, cfg):
    """EWC's diagonal (empirical) Fisher information at the agent's weights: each network's loss gradient on one
    source sequence at a time, squared, averaged over the sequences of the batches (world model: Eq. 2; actor:
    Eq. 10; critic: Eq. 11). Per sequence, as Kirkpatrick et al. take the expectation over samples: the square of
    a whole batch's mean gradient would be about 1/B of it near theta*, where the mean gradient vanishes."""
    fisher = {name: [torch.zeros_like(p) for p in params] for name, params in agent.params.items()}
    sequences = [{key: value[i:i + 1] for key, value in batch.items()}
                 for batch in batches for i in range(len(batch["is_first"]))]
    for sequence in sequences:
        with autocast(cfg):
            wm_loss, _, (h, z), _ = world_model_loss(agent.wm, sequence, cfg)
            losses, _ = behaviour_losses(agent, h, z, sequence["is_terminal"], cfg)
        losses["model"] = wm_loss
        for name, params in agent.params.items():
            grads = torch.autograd.grad(losses[name], params, allow_unused=True)
            for f, g in zip(fisher[name], grads):
                if g is not None:
                    f += g.float() ** 2 / len(sequences)
    return fisher


def elastic_weight_consolidation(agent, batches, cfg):
    """DV2 Finetune+EWC: anchor every network at its pretrained source weights theta*, with F from source data."""
    agent.ewc = {"anchor": {name: [p.detach().clone() for p in params] for name, params in agent.params.items()},
                 "fisher": diagonal_fisher(agent, batches, cfg)}


def learn_behaviour(agent, h, z, is_terminal, cfg, source_critics=None, omega=None):
    """Behaviour losses from the posterior states, each backpropagated at once into its own network."""
    if cfg.chunks > 1:  # memory device: the start states in parts whose gradients add up
        return learn_behaviour_in_chunks(agent, h, z, is_terminal, cfg, source_critics, omega)
    with autocast(cfg):
        losses, metrics = behaviour_losses(agent, h, z, is_terminal, cfg, source_critics, omega)
    for name, loss in losses.items():
        agent.backward(name, loss)
    return {**metrics, **{f"{name}_loss": loss.detach() for name, loss in losses.items()}}


# -- Memory devices (--chunks > 1): the same gradients as the plain expressions beside their calls, with a
# fraction of the activation memory. Tested against the plain path.

def recompute_in_chunks(module, x, chunks):
    """module(x) whose activations are not kept but recomputed in the backward pass, in `chunks` parts of the frames.

    For the encoder's first two convolutions: their outputs are the largest activations of an update (650 MB
    of 2,500 frames at the paper's size) and their gradients as large again, while recomputing them costs
    under 3% of the update's FLOPs.
    """
    return torch.cat([checkpoint(module, part, use_reentrant=False) for part in x.tensor_split(chunks)])


class DecodedImageNLL(torch.autograd.Function):
    """image_nll(decoder(feat), image) whose gradient is computed in the forward pass, one chunk of frames at
    a time, and handed out in the backward pass.

    Exact and without recomputation: the decoder's activations (1.4 GB for 2,500 frames at the paper's size)
    are alive for one chunk only, instead of from the forward pass until the loss's backward. The parameters
    are inputs so their gradients flow through the usual .backward().
    """

    @staticmethod
    def forward(ctx, feat, image, decoder, chunks, *params):  # feat (N, F), image (N, 64, 64, 3)
        feat_grads, param_grads = [], [torch.zeros_like(p) for p in params]
        total = feat.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for f, o in zip(feat.tensor_split(chunks), image.tensor_split(chunks)):
                f = f.detach().requires_grad_()
                # The decoder sees a view of f: module hooks (bench's FLOP counter) cannot watch a leaf in autograd.grad
                nll = image_nll(decoder(f.view_as(f)), o) * (len(f) / len(feat))  # shares add up to the mean
                grads = torch.autograd.grad(nll, [f, *params])
                feat_grads.append(grads[0])
                for acc, g in zip(param_grads, grads[1:]):
                    acc += g
                total = total + nll.detach()
        ctx.save_for_backward(torch.cat(feat_grads), *param_grads)
        return total

    @staticmethod
    def backward(ctx, grad):
        feat_grad, *param_grads = ctx.saved_tensors
        return grad * feat_grad, None, None, None, *(grad * g for g in param_grads)


def decoded_image_nll(decoder, feat, image, chunks):
    """-ln p(o | h, z) of Eq. (2) for features (..., F) and images (..., 64, 64, 3), in `chunks` parts."""
    if not torch.is_grad_enabled():
        return image_nll(decoder(feat), image)
    return DecodedImageNLL.apply(feat.flatten(0, -2), image.flatten(0, -4), decoder, chunks, *decoder.parameters())


def learn_behaviour_in_chunks(agent, h, z, is_terminal, cfg, source_critics, omega):
    """learn_behaviour over the B*T start states in cfg.chunks parts whose gradients add up: each part's losses
    (means) weighted by its share of the states, the same gradient as one pass with that fraction of the
    imagination's activation memory."""
    h, z, is_terminal = h.flatten(0, -2), z.flatten(0, -2), is_terminal.flatten()  # (N, D), (N, S*C), (N,)
    metrics = {}
    for i, part in enumerate(torch.arange(len(h), device=h.device).tensor_split(cfg.chunks)):
        share = len(part) / len(h)
        with autocast(cfg):
            losses, part_metrics = behaviour_losses(agent, h[part], z[part], is_terminal[part], cfg, source_critics,
                                                    omega)
        part_metrics.update({f"{name}_loss": loss.detach() for name, loss in losses.items()})
        for name, loss in losses.items():
            agent.backward(name, loss * share, accumulate=i > 0)
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0) + value * share
    return metrics


# -- Acting and evaluation

def pad_action(action, size):
    """The shared action space (the larger size of both domains, App. D): pad with zeros at the end."""
    extra = size - action.shape[-1]
    return action if extra == 0 else np.concatenate(
        [action, np.zeros((*action.shape[:-1], extra), action.dtype)], -1)


def to_torch(batch, action_size, device):
    """A replay batch (numpy, (B, T, ...)) on the device; images stay uint8 until the encoder."""
    out = {key: torch.from_numpy(batch[key]) for key in ("image", "reward", "is_first", "is_terminal")}
    out["action"] = torch.from_numpy(pad_action(batch["action"], action_size)).float()
    out["reward"] = out["reward"].float()
    return {key: value.to(device) for key, value in out.items()}


class Collector:
    """Steps one environment with a policy and writes each finished episode to a replay folder (Alg. 1 lines 3
    and 25). The environment is made at the first step, so a finished stage that a resumed run skips makes none.
    episode_seed() seeds each episode's start, so a resumed run meets the episodes an uninterrupted one would."""

    def __init__(self, make_env, replay, action_size, episode_seed):
        self.make_env, self.replay, self.action_size, self.episode_seed = make_env, replay, action_size, episode_seed
        self.env, self.obs = None, None

    def between_episodes(self):
        return self.obs is None

    def step(self, agent, explore=True, random_policy=False, rng=None):
        if self.obs is None:
            self.env = self.env or self.make_env()
            self.obs, self.policy_state = self.env.reset(seed=self.episode_seed()), None
            self.episode = [(self.obs, np.zeros(self.env.action_size, np.float32))]
        if random_policy:
            action = rng.uniform(-1, 1, self.action_size).astype(np.float32)
        else:
            action, self.policy_state, _ = agent.act(self.obs, self.policy_state, explore)
        env_action = action[: self.env.action_size]  # the smaller environment uses the first dimensions
        self.obs = self.env.step(env_action)
        self.episode.append((self.obs, env_action.astype(np.float32)))
        if not self.obs["is_last"]:
            return None
        episode = envs.episode_from_steps(self.episode)
        self.replay.add(episode)
        self.obs = None
        return {"return": float(episode["reward"].sum()), "length": len(episode["reward"]) - 1,
                **({"success": float(episode["success"].any())} if "success" in episode else {})}

    def close(self):
        if self.env is not None:
            self.env.close()


def discounted_return(rewards, gamma):
    """What the critic's v(z_0) estimates, for the rewards r_1..r_T that followed the actions: sum_t gamma^t r_t.
    In Eq. (8), V_0 starts with r_0, the reward that came with o_0 (none at reset), so r_1 is discounted once."""
    return float(np.sum(np.asarray(rewards, np.float64) * gamma ** np.arange(1, len(rewards) + 1)))


def evaluate(agent, env_name, cfg, episodes, video_path=None, random_policy=False, seed_offset=10_000,
             stop=lambda: None):
    """Deterministic episodes (the policy's mode) in the real simulator: mean/std return, success rate,
    and Figure 5(b)'s comparison of the critic's value estimates with the discounted return achieved.
    stop() is called after every step; it raises to end the evaluation early. An evaluation is a function of the
    weights and the seed alone: it draws from random streams of its own (the latent samples from a forked torch
    generator), so it neither depends on the training's streams nor moves them."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cfg.device == "cuda" else []):
        torch.manual_seed(cfg.seed + seed_offset)
        return run_episodes(agent, env_name, cfg, episodes, video_path, random_policy, seed_offset, stop)


def run_episodes(agent, env_name, cfg, episodes, video_path, random_policy, seed_offset, stop):
    env = envs.make_env(env_name, seed=cfg.seed + seed_offset, render=cfg.render, max_steps=cfg.max_episode_steps)
    rng = np.random.default_rng(cfg.seed + seed_offset)
    returns, successes, start_values, start_returns, frames = [], [], [], [], []
    try:
        for episode in range(episodes):
            obs, state, rewards, values, success = env.reset(), None, [], [], False
            while True:
                if episode == 0 and video_path:
                    frames.append(obs["image"])
                if random_policy:
                    action = rng.uniform(-1, 1, agent.action_size).astype(np.float32)
                else:
                    action, state, value = agent.act(obs, state, explore=False)
                    values.append(value)
                obs = env.step(action[: env.action_size])
                rewards.append(obs["reward"])
                success = success or bool(obs.get("success", False))
                stop()
                if obs["is_last"]:
                    break
            returns.append(float(np.sum(rewards)))
            successes.append(float(success))
            if values:
                start_values.append(values[0])
                start_returns.append(discounted_return(rewards, cfg.gamma))
    finally:
        env.close()
    if frames:
        write_video(video_path, frames)
    result = {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
              "success_rate": float(np.mean(successes)) if env.has_success else None,
              "returns": returns, "episodes": episodes}
    if start_values:
        result.update(value_estimate=float(np.mean(start_values)), true_value=float(np.mean(start_returns)))
    return result


# =============================================================================================
# 8. Algorithm 1
# =============================================================================================

def update_due(run, i, step):
    """DreamerV2's schedule online: one update every train_every environment steps, once the random prefill is
    collected and source i's replay holds a sequence."""
    cfg = run.cfg
    return (run.progress["env_steps"][i] >= prefill_steps(cfg, run.source_names[i])
            and (step + 1) % cfg.train_every == 0 and run.source_replays[i].num_steps >= cfg.seq_len)


def collect(run, i, collector):
    """Source i acts one environment step (uniformly random during the prefill, DreamerV2) and stores it."""
    random_policy = run.progress["env_steps"][i] < prefill_steps(run.cfg, run.source_names[i])
    episode = collector.step(run.sources[i], explore=True, random_policy=random_policy, rng=run.rng)
    run.progress["env_steps"][i] += 1
    if episode is not None:
        run.end_of_episode(i, episode)


def dreamerv2_online(run, i, steps):
    """Alg. 1 line 3 (and the `online` command): source agent i learns online on its own, as DreamerV2 does."""
    source, B_S = run.sources[i], run.source_replays[i]
    with run.collector(i) as collector:
        for step in run.steps(steps, f"pretrain source {run.source_names[i]}", safe=collector.between_episodes,
                              until=lambda: run.reached_stop_return(i)):
            if update_due(run, i, step):
                run.record(source, f"source{i}", *source_update(source, run.sample(B_S), run.cfg))
            collect(run, i, collector)


def algorithm1(run):
    """Algorithm 1, the training scheme of CoWorld; the baselines are its switches (App. D). Returns results.json.

    run.steps(n) is range(n) across restarts: a resumed run passes over the steps its checkpoint holds, and
    after each step it checks for a stop request and saves a checkpoint when one is due."""
    cfg, target, sources, B_S = run.cfg, run.target, run.sources, run.source_replays
    B_T = run.target_replay  # 1: Require: offline dataset B^(T)
    # 2: Initialize: source models {phi', psi', xi'} and target model {phi, psi, xi} (Run; or its checkpoint)
    for i in range(len(sources)):
        dreamerv2_online(run, i, cfg.pretrain_steps)  # 3: Pretrain the source agent and collect a replay buffer B^(S)
    co_training = sources if cfg.method == "coworld" else ()
    if len(co_training) > 1:  # App. C step 1: with several sources the target world model is pretrained too
        for _ in run.steps(cfg.target_pretrain, "multi-source: pretrain the target world model"):
            run.record(target, "target", *world_model_update(target, run.sample(B_T), cfg))
    if cfg.method in FINETUNE:  # App. D: the target agent starts as the pretrained source agent
        for _ in run.steps(1, "finetune: copy the source agent"):
            target.load_state_dict(sources[0].state_dict())
            if cfg.method == "dv2-finetune-ewc":  # ... and each network is held near it
                elastic_weight_consolidation(target, [run.sample(B_S[0]) for _ in range(cfg.ewc_batches)], cfg)
    for r in range(cfg.rounds):  # 4: while not converged do
        # 5: // In the offline domain:
        for _ in run.steps(cfg.K1, f"round {r + 1}/{cfg.rounds}: offline target"):  # 6: for each step in {1:K1} do
            batch = run.sample(B_T)  # 7: Sample {(o_t, a_t, r_t)} ~ B^(T)
            # 8: // Offline-to-online state alignment
            # 9: Train the target world model M_phi using Eq. (3)        (with several sources: Eq. (12))
            # 10: // Behaviour learning with constraint
            # 11: Generate {(z_i, a_i)} using pi_psi and M_phi           (imagine)
            # 12: Train the critic v_xi using Eq. (6); 13: Train the actor pi_psi using Eq. (7)
            run.record(target, "target", *target_update(target, batch, cfg, co_training))
        # 14: end for
        if not co_training or r == cfg.rounds - 1:  # after the last round, source updates reach the target no more
            continue
        # 15: // In the online domain:
        for i, source in enumerate(sources):
            with run.collector(i) as collector:
                for step in run.steps(cfg.K2, f"round {r + 1}/{cfg.rounds}: online source {run.source_names[i]}",
                                      safe=collector.between_episodes):  # 16: for each step in {1:K2} do
                    if update_due(run, i, step):
                        batch = run.sample(B_S[i])  # 17: Sample {(o_t, a_t, r_t)} ~ B^(S)
                        # 18: // Online-to-offline reward alignment
                        batch_T = run.sample(B_T) if cfg.reward_alignment else None  # 19: Sample ~ B^(T)
                        eta = eta_schedule(r * cfg.K2 + step + 1, (cfg.rounds - 1) * cfg.K2, cfg.eta_start, cfg.eta_end)
                        # 20: Relabel the source rewards using Eq. (4); 21: Train M_phi' using Eq. (2) with Eq. (5)
                        # 22: // Source domain behaviour learning; 23: Generate {(z_i, a_i)} using pi_psi', M_phi'
                        # 24: Train pi_psi' and v_xi' over the imagined {(z_i, a_i)}
                        run.record(source, f"source{i}", *source_update(source, batch, cfg, batch_T, eta))
                    collect(run, i, collector)  # 25: Use pi_psi' to collect new source data and append B^(S)
        # 26: end for
    # 27: end while
    return run.final_evaluation(target, cfg.target)


# =============================================================================================
# =============================================================================================
# The harness. It builds the agents a method needs from the sections above (App. D's shared action space, the
# larger of the domains'; Offline DV2's ensemble), keeps a run's state, checkpoints and resumes it, handles
# signals, logs, builds and loads datasets, and reads the command line. Every value of the method comes from
# above: Config, PRESETS, SUITES and suite_defaults.
# =============================================================================================
# =============================================================================================

COMMANDS = ("train", "online", "evaluate")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
STOP_RETURN_EPISODES = 5  # --stop-return: the mean return of this many last episodes
CHECKPOINT_VERSION = 4  # raised when a checkpoint's meaning changes (4: the GRU's bias, one prior member trained)


class ConfigError(ValueError):
    """A bad flag or value; main() prints it as one line and exits with code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a run; main() exits with 128 + the signal's number, as a shell does."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Run:
    """Everything a command trains, with the counters a checkpoint restores.

    Algorithm 1's loops count their work with steps(): the checkpoint records how many of the run's steps are
    done (progress["steps"], one count over all loops in program order), so the same command started again runs
    the same loops and passes over what is done. Checkpoints are written at safe points only: after an offline
    update, at the end of an online episode, at the end of a loop.
    """

    def __init__(self, cfg, command="train"):
        self.cfg, self.command = cfg, command
        if cfg.threads:  # --threads N, for every command; 0: the CoreShare below, in the loops of train and online
            torch.set_num_threads(cfg.threads)
        self.logdir = Path(cfg.logdir)
        self.checkpoint_path = self.logdir / "checkpoint.pt"
        # A checkpoint is checked before any data is built: one from other flags stops the run at once.
        state = read_checkpoint(self.checkpoint_path, cfg, command) if self.checkpoint_path.exists() else None
        if state is None:
            check_run_folder(self.logdir, command)
        self.target_replay = load_target_data(cfg) if command == "train" else None  # Alg. 1 line 1
        self.logdir.mkdir(parents=True, exist_ok=True)
        if command != "evaluate":  # evaluate only reads: the run may still be writing
            # half-written files of a killed run, never read, removed: in the folders the run writes, no others
            for folder in (self.logdir, self.logdir / "videos", *self.logdir.glob("replay/*")):
                for stale in folder.glob(".*.tmp*"):
                    stale.unlink()
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed), np.random.seed(cfg.seed), random.seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.source_names = list(cfg.source)
        uses = () if cfg.method == "offline-dv2" and command != "online" else self.source_names
        targets = () if command == "online" else (cfg.target,)
        self.action_size = max(envs.action_size(n) for n in (*uses, *targets))
        ensemble = cfg.ensemble if cfg.method == "offline-dv2" else 1
        self.sources = [Agent(cfg, self.action_size, env_actions=envs.action_size(name)).to(self.device)
                        .build_optimisers() for name in uses]
        self.target = (Agent(cfg, self.action_size, ensemble, envs.action_size(cfg.target)).to(self.device)
                       .build_optimisers() if command != "online" else None)
        # steps: of Algorithm 1's loops, in program order; evaluated: the curve_step of the target's last periodic
        # evaluation; log_lines: of metrics.jsonl
        self.progress = {"steps": 0, "env_steps": [0] * len(self.sources), "episodes": [[] for _ in self.sources],
                         "selected": [0] * len(self.sources), "evaluated": 0, "log_lines": 0}
        self.cursor = 0  # the steps that this process's loops have counted so far, done or passed over
        self.stop_requested = None  # "safe" after one Ctrl-C, "now" after two
        self.stop_signal = signal.SIGINT
        self.selected = torch.zeros(len(self.sources), device=self.device)  # App. C choices (Table 6)
        self.last_metrics, self.bar, self.worked = {}, None, False  # worked: a step ran in this process
        # torch's threads follow the free cores (--threads 0) in the loops of train and online
        self.core_share = CoreShare.for_config(cfg) if command != "evaluate" else None
        if state is None:
            self.write_config()
        else:
            self.restore(state)
        self.saved = (self.progress["steps"], self.updates())  # what the last checkpoint holds
        if command != "evaluate":
            self.logger = Logger(self.logdir, self.progress["log_lines"], cfg)
            self.source_replays = [self.open_replay(i) for i in range(len(self.sources))]

    def open_replay(self, i):
        """The source replay folder, holding exactly the episodes the checkpoint counted: ones saved after
        it (the process died before the next checkpoint) move to orphaned/ and are collected anew."""
        name = self.source_names[i]
        directory = self.logdir / "replay" / name.replace(":", "-")
        counted = len(self.progress["episodes"][i])
        if directory.is_dir():
            for path in envs.episode_paths(directory)[counted:]:
                (directory / "orphaned").mkdir(exist_ok=True)
                os.replace(path, directory / "orphaned" / path.name)
        found = len(envs.episode_paths(directory)) if directory.is_dir() else 0
        if found < counted:  # the replay B^(S) is part of the run's state: training on what is left would differ
            raise ConfigError(f"{directory} holds {found} episodes but {self.checkpoint_path} counted {counted}: "
                              f"episodes were removed from the replay; restore them, or start a new --logdir")
        # The folder is a dataset too (medium-replay, for --target-data): it records how it was made.
        envs.write_dataset_info(directory, {"env": name, "render": self.cfg.render, "policy": "online",
                                            "seed": self.cfg.seed, "action_size": envs.action_size(name)})
        return envs.Replay(directory, self.cfg.replay_capacity, spill_dir(self.cfg))

    def updates(self):
        return sum(agent.updates for agent in (*self.sources, *([self.target] if self.target else [])))

    # -- Algorithm 1's bookkeeping ----------------------------------------------------------------
    def steps(self, n, desc, safe=lambda: True, until=lambda: False):
        """range(n) for one of Algorithm 1's loops, across restarts: the steps done before the last checkpoint are
        passed over. After each step, where safe() (offline: always; online: between episodes), a stop request
        stops the run and a checkpoint is written when checkpoint_every updates have passed since the last one;
        until() ends the loop early. The end of a loop is a safe point too."""
        first, self.cursor = self.cursor, self.cursor + n
        start = min(max(self.progress["steps"] - first, 0), n)
        if start == n:
            return
        self.worked, self.bar = True, progress_bar(n, start, desc)
        try:
            self.evaluate_periodically()  # one a resumed run's checkpoint was waiting for
            for step in range(start, n):
                yield step
                self.progress["steps"] = first + step + 1
                self.bar.update(1)
                self.share_cores()
                if until():
                    self.progress["steps"] = first + n
                    break
                if safe():
                    self.check_stop()
                    self.evaluate_periodically()
                    if self.updates() - self.saved[1] >= self.cfg.checkpoint_every:
                        self.save()
        finally:
            self.bar.close()
        if self.saved[0] != self.progress["steps"]:
            self.save()
        self.check_stop()  # e.g. one asked for during an online stage's last, unfinished episode

    def share_cores(self):
        change = self.core_share.adjust() if self.core_share else None
        if change:
            self.bar.write(f"  {change}")

    def sample(self, replay):
        if not replay.num_episodes:  # only a source's can be empty: B^(T) is checked when it loads
            raise ConfigError(f"{replay.directory}: no source episode to train on; its {self.cfg.pretrain_steps} "
                              f"pretraining steps ended none: raise --pretrain-steps")
        batch = replay.sample(self.cfg.batch_size, self.cfg.seq_len, self.rng)
        return to_torch(batch, self.action_size, self.device)

    @contextlib.contextmanager
    def collector(self, i):
        """Source i's environment loop for one stage; an episode still running at the stage's end is dropped."""
        cfg, name = self.cfg, self.source_names[i]
        # Distinct streams for every (run seed, source, episode index): no two episodes share a start.
        episode_seed = lambda: int(np.random.SeedSequence(  # noqa: E731
            [cfg.seed, i, len(self.progress["episodes"][i])]).generate_state(1)[0])
        collector = Collector(lambda: envs.make_env(name, render=cfg.render, max_steps=cfg.max_episode_steps),
                              self.source_replays[i], self.action_size, episode_seed)
        try:
            yield collector
        finally:
            collector.close()

    def record(self, agent, prefix, metrics, ok):
        """After an update: a non-finite one is skipped (and stops the run after max_bad_updates in a row);
        multi-source choices are counted; metrics are logged every log_every updates."""
        if not ok:
            print(f"\nskipped update {agent.updates} of {prefix}: non-finite {' and '.join(agent.faults)} loss or "
                  f"gradient ({agent.bad_updates} in a row)", file=sys.stderr)
            if agent.bad_updates >= self.cfg.max_bad_updates:
                raise FloatingPointError(f"{agent.bad_updates} non-finite updates in a row; the last good "
                                         f"checkpoint is {self.checkpoint_path}")
            return
        if "omega" in metrics:
            self.selected += metrics.pop("omega")  # stays on the device: no sync per update
            metrics["source_selected"] = self.selected
        if agent.updates % self.cfg.log_every == 0:
            self.last_metrics = self.logger.write(agent.updates, prefix, metrics)
            self.last_metrics = {k.split("/", 1)[1]: v for k, v in self.last_metrics.items()}
            self.bar.set_postfix(summary(self.last_metrics))

    def end_of_episode(self, i, episode):
        self.progress["episodes"][i].append(episode["return"])
        self.logger.write(self.progress["env_steps"][i], f"source{i}/episode", episode)
        self.bar.set_postfix(ret=f"{episode['return']:.1f}", **summary(self.last_metrics))

    def reached_stop_return(self, i):
        """The medium-replay recipe: only the online command stops early; Algorithm 1's stages run in full."""
        recent = self.progress["episodes"][i][-STOP_RETURN_EPISODES:]
        return (self.command == "online" and self.cfg.stop_return is not None
                and len(recent) == STOP_RETURN_EPISODES and np.mean(recent) >= self.cfg.stop_return)

    def evaluate_periodically(self):
        """Every eval_every target updates, the target agent's evaluation (the final one's settings, no video) goes
        to the log with prefix eval, for learning curves. It runs at a safe point after a checkpoint, and a stop
        request ends it at once: a resumed run makes it up first, from the same weights, to the same numbers."""
        cfg, target = self.cfg, self.target
        n = self.curve_step(target) if self.command == "train" else 0
        if (n <= 0 or not cfg.eval_every or n % cfg.eval_every
                or n in (self.progress["evaluated"], cfg.rounds * cfg.K1)):  # the last: final_evaluation
            return
        self.save()
        result = evaluate(target, cfg.target, cfg, cfg.eval_episodes, stop=functools.partial(self.check_stop, now=True))
        self.progress["evaluated"] = n
        self.logger.write(n, "eval", {k: v for k, v in result.items() if isinstance(v, float)})

    def curve_step(self, agent):
        """The x axis of the learning curves: the agent's updates less a multi-source target's App. C
        pretraining (world model only, no behaviour), so the target's K1 updates count from 1 in every method."""
        pretrained = (self.cfg.target_pretrain if agent is self.target and self.cfg.method == "coworld"
                      and len(self.sources) > 1 else 0)
        return agent.updates - pretrained

    def final_evaluation(self, agent, env_name):
        """Evaluate the trained agent in its real environment once; write results.json and a video. A finished run
        started again returns its results.json (evaluating again if that file is gone)."""
        path = self.logdir / "results.json"
        for _ in self.steps(1, "evaluate"):
            self.write_results(agent, env_name, path)
        results = read_results(path)
        if results is None:
            self.write_results(agent, env_name, path)
            results = json.loads(path.read_text())
        elif not self.worked:
            print(f"{self.logdir} has finished already; its results:")
        return results

    def write_config(self):
        saved = {"command": self.command, **dataclasses.asdict(self.cfg)}  # the command: what kind of run's folder
        envs.atomic_write(self.logdir / "config.json", lambda file: file.write(json.dumps(saved, indent=2).encode()))

    def write_results(self, agent, env_name, path):
        """results.json, after config.json with the flags it is made with: a resumed run may have changed the
        evaluation's, and `evaluate --logdir` reads them from there."""
        cfg, stop = self.cfg, functools.partial(self.check_stop, now=True)
        self.write_config()
        result = {"env": env_name, "method": cfg.method if self.command != "online" else "dreamerv2-online",
                  "preset": cfg.preset, "render": cfg.render, "device": cfg.device, "seed": cfg.seed,
                  "eval": evaluate(agent, env_name, cfg, cfg.eval_episodes, self.logdir / "videos" / "eval.mp4",
                                   stop=stop)}
        if cfg.eval_random:
            result["random_policy"] = evaluate(agent, env_name, cfg, cfg.eval_episodes, random_policy=True, stop=stop)
        if len(self.sources) > 1 and self.command != "online":
            result["source_selected"] = dict(zip(self.source_names, self.selected.tolist()))
        result["env_steps"] = dict(zip(self.source_names, self.progress["env_steps"]))
        envs.atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
        self.logger.write(self.curve_step(agent), "eval", {k: v for k, v in result["eval"].items()
                                                           if isinstance(v, float)})
        self.logger.video("eval/video", self.logdir / "videos" / "eval.mp4")

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self):
        """Atomic checkpoint, written at safe points only (see steps). A killed run resumes from the last one and
        collects anew the episode that was in progress. Only tensors and plain data: it loads with weights_only."""
        progress = copy.deepcopy(self.progress)
        progress["selected"] = self.selected.tolist()
        progress["log_lines"] = self.logger.lines
        state = {"version": CHECKPOINT_VERSION, "config": dataclasses.asdict(self.cfg), "progress": progress,
                 "sources": [s.state() for s in self.sources],
                 "target": self.target.state() if self.target else None,
                 "rng": {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                         "python": random.getstate()}}
        try:
            envs.atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))  # a kill keeps the previous one
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError("... unexpected pos")
            full = getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.logdir).free < 2 ** 26
            reason = ("No space left on device: the disk is full" if full
                      else f"cannot write a checkpoint ({envs.error_message(error)})")
            raise OSError(errno.ENOSPC if full else errno.EIO, f"{reason}; the last checkpoint "
                          f"{self.checkpoint_path.name} stands and the same command resumes from it",
                          str(self.logdir)) from error
        self.saved = (self.progress["steps"], self.updates())

    def restore(self, state):
        """Continue from a checkpoint read_checkpoint accepted: weights, optimisers, counters, random states."""
        for agent, agent_state in zip(self.sources, state["sources"]):
            agent.load(agent_state)
        if self.target:
            self.target.load(state["target"])
        self.progress = state["progress"]
        self.selected = torch.tensor(self.progress["selected"], device=self.device)
        self.rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved it to the device
        if state["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        random.setstate(state["rng"]["python"])
        if self.command != "evaluate":
            print(f"Resuming from {self.checkpoint_path}: {self.progress['steps']} steps done")

    # -- signals -------------------------------------------------------------------------------
    def request_stop(self, signum, frame):
        """The first Ctrl-C (or SIGTERM) stops at the next safe point (see steps) and writes a checkpoint there; a
        second one stops at once, and the last checkpoint stands."""
        self.stop_signal = signum
        if self.stop_requested:
            self.stop_requested = "now"
            raise Interrupted(signum)
        self.stop_requested = "safe"
        # os.write, not print: the handler may interrupt a write to stderr (the progress bar's)
        os.write(2, b"\nstopping at the next safe point (online: the end of this episode; evaluation: now); "
                    b"Ctrl-C again stops now, keeping the last checkpoint\n")

    def check_stop(self, now=False):
        """Stop here if asked to. now: a point that saves nothing (the final evaluation), where the checkpoint
        written just before it is where a resume starts."""
        if self.stop_requested:
            if now:
                self.stop_requested = "now"
            raise Interrupted(self.stop_signal)

    @contextlib.contextmanager
    def stopping_on_signals(self):
        """Ctrl-C (SIGINT), SIGTERM (a cluster's preemption notice) or SIGUSR2 (SLURM's warning before a time
        limit) stops at the next safe point and writes a checkpoint there."""
        previous = {signum: signal.signal(signum, self.request_stop) for signum in stop_signals()}
        try:
            yield
        except KeyboardInterrupt:
            if self.stop_requested == "safe":
                self.save()
                print(f"\ninterrupted: checkpoint written to {self.checkpoint_path}; run the same command to resume",
                      file=sys.stderr)
            elif self.stop_requested == "now":
                print(f"\nstopped: the last checkpoint in {self.checkpoint_path} stands; run the same command to "
                      f"resume from it", file=sys.stderr)
            raise
        finally:
            self.logger.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def read_checkpoint(path, cfg, command="train"):
    """A run's checkpoint, refused with one line when it is damaged, foreign, of another format or of other flags.
    weights_only: a checkpoint holds tensors and plain data only, so loading one from elsewhere runs no code."""
    try:
        state = torch.load(path, map_location=cfg.device, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = (f"refused: it holds a Python object ({unsafe[1]}) where a checkpoint holds only tensors and plain "
                f"data; loading it could run code" if unsafe else f"damaged ({first_line(error)})")
        raise ConfigError(f"{path}: {what}; move it away to start the run over") from error
    except Exception as error:  # truncated, empty, random bytes: torch raises RuntimeError, EOFError, ...
        raise ConfigError(f"{path}: damaged, not a readable checkpoint ({type(error).__name__}: {first_line(error)}); "
                          f"move it away to start the run over") from error
    if not isinstance(state, dict) or not {"progress", "sources", "target", "config"} <= state.keys():
        raise ConfigError(f"{path}: not a coworld.py checkpoint; move it away, or use another --logdir")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path} was written by another version of coworld.py (checkpoint format "
                          f"{state.get('version', 1)}, this one reads {CHECKPOINT_VERSION}); use a new --logdir")
    if command == "evaluate" and state["target"] is None:
        raise ConfigError(f"{path} is of an online run (no target agent to evaluate): its results.json holds the "
                          f"online agent's evaluation, and the same `coworld.py online` command evaluates it again "
                          f"once that file is gone")
    if (command == "online") != (state["target"] is None) and command != "evaluate":  # only train has a target
        raise other_kind(path, "train" if command == "online" else "online", command)
    check_same_config(state["config"], cfg, path, command)
    return state


RUN_OUTPUTS = ("metrics.jsonl", "tb", "results.json", "replay", "videos")  # written after config.json


def check_run_folder(logdir, command):
    """A run with no checkpoint starts over in its --logdir, rewriting config.json, metrics.jsonl and tb/; a folder
    that holds such files without the config.json a run writes first is not a run's, and one whose config.json is
    of the other command (a run killed before its first checkpoint) is not this run's: neither is ours to rewrite."""
    logdir = Path(logdir)
    found = [name for name in RUN_OUTPUTS if (logdir / name).exists()]
    if found and not (logdir / "config.json").exists():
        raise ConfigError(f"{logdir} holds {', '.join(found)} but no config.json or checkpoint.pt, so it is not a "
                          f"coworld.py run folder: use another --logdir, or move those away")
    try:
        written = json.loads((logdir / "config.json").read_text()).get("command", command)
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: the run writes it anew
        return
    if written != command and command != "evaluate":
        raise other_kind(logdir, written, command)


def other_kind(where, written, command):
    """train and online never share a --logdir: where the checkpoint or config.json names the other command."""
    return ConfigError(f"{where} is of a `coworld.py {written}` run, not of {command}: use another --logdir")


def read_results(path):
    """A run's results.json, or None when it is missing or damaged (a damaged one is said so): either way the
    finished run evaluates again."""
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
        if isinstance(results, dict) and isinstance(results.get("eval"), dict) and "env" in results:
            return results
        problem = "not a results object"
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
        problem = f"{type(error).__name__}: {first_line(error)}"
    print(f"note: {path} is damaged ({problem}); evaluating again")
    return None


def first_line(error):
    return (str(error).strip().splitlines() or [""])[0]


def check_same_config(saved, cfg, path, command="train"):
    """A checkpoint only resumes the run it came from: name the fields that differ."""
    current = dataclasses.asdict(cfg)
    # What may change between a run and its resume or evaluation: where and how it runs, logs and evaluates.
    ignore = {"device", "threads", "debug", "log_every", "checkpoint_every", "max_bad_updates", "logdir", "data_dir",
              "eval_episodes", "eval_random", "replay_images", "wandb"}
    if command == "evaluate":  # acting runs without autocast; compiling changes its speed, not what it computes
        ignore |= set(MACHINE_SETTINGS)
    diff = [f"{k} ({saved.get(k)!r} -> {current[k]!r})" for k in current
            if k not in ignore and json.dumps(saved.get(k)) != json.dumps(current[k])]
    if diff:
        raise ConfigError(f"{path} was written by a different config: {', '.join(diff)}; "
                          f"use another --logdir or the original flags")


# -- logging -----------------------------------------------------------------------------------

class Logger:
    """Metrics to metrics.jsonl (one JSON object per line, easy to plot), to TensorBoard and, with --wandb, to
    Weights & Biases.

    keep_lines: the lines the checkpoint a run resumes from had written (0 for a new run). Later ones are
    dropped: the resumed run logs those steps again, so the file reads as one uninterrupted run. TensorBoard's
    files are rebuilt from the kept lines on a resume: a killed run's last points may never have reached them, and
    TensorBoard cannot drop the points logged after the checkpoint."""

    def __init__(self, logdir, keep_lines, cfg):
        from torch.utils.tensorboard import SummaryWriter
        self.path, tb = Path(logdir) / "metrics.jsonl", Path(logdir) / "tb"
        lines = self.path.read_bytes().splitlines(keepends=True) if self.path.exists() else []
        if len(lines) > keep_lines:
            lines = lines[:keep_lines]
            envs.atomic_write(self.path, lambda f: f.writelines(lines))
        records = [self.parse(line, number) for number, line in enumerate(lines, 1)]
        self.lines = len(lines)
        if tb.is_dir():
            shutil.rmtree(tb)
        self.writer = SummaryWriter(str(tb))
        self.wandb, self.wandb_keys = (start_wandb(cfg) if cfg.wandb else None), set()
        for record in records:
            step, walltime = record.pop("step"), record.pop("time")
            for key, value in record.items():
                self.writer.add_scalar(key, value, step, walltime=walltime)

    def parse(self, line, number):
        try:
            record = json.loads(line)
            assert isinstance(record, dict) and {"step", "time"} <= record.keys()
            return record
        except (ValueError, AssertionError):
            raise ConfigError(f"{self.path}: line {number} is damaged (not a JSON object with step and time); mend or "
                              f"delete that line, or start a new --logdir") from None

    def write(self, step, prefix, metrics):
        scalars = {}
        for key, value in metrics.items():
            value = value.detach().float().cpu().numpy() if torch.is_tensor(value) else np.asarray(value, float)
            if value.ndim == 0:
                scalars[f"{prefix}/{key}"] = float(value)
            else:
                scalars.update({f"{prefix}/{key}_{i}": float(v) for i, v in enumerate(value.ravel())})
        now = time.time()
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step, walltime=now)
        if self.wandb:  # each prefix has its own x axis (target updates, source updates, environment steps)
            for key in scalars.keys() - self.wandb_keys:
                self.wandb.define_metric(key, step_metric=f"{prefix}/step")
            self.wandb_keys |= scalars.keys()
            self.wandb.log({**scalars, f"{prefix}/step": step})
        line = (json.dumps({"step": step, "time": now, **scalars}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per line: an interrupt never leaves half of one
        finally:
            os.close(fd)
        self.lines += 1
        return scalars

    def video(self, key, path):
        if self.wandb and path.exists():
            import wandb
            self.wandb.log({key: wandb.Video(str(path), format=path.suffix[1:])})

    def close(self):
        self.writer.close()
        if self.wandb:
            self.wandb.finish()


def start_wandb(cfg):
    """A Weights & Biases run named by the run folder; a resumed run continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    import hashlib
    run_id = hashlib.sha1(cfg.logdir.encode()).hexdigest()[:16]
    try:
        return wandb.init(project=cfg.wandb, name=Path(cfg.logdir).name, id=run_id, resume="allow", dir=cfg.logdir,
                          config=dataclasses.asdict(cfg))
    except Exception as error:  # no API key, no network, a project that is not the user's: wandb's own errors
        raise ConfigError(f"--wandb {cfg.wandb}: Weights & Biases did not start ({type(error).__name__}: "
                          f"{first_line(error)}); run `wandb login`, or set WANDB_MODE=offline to log locally "
                          f"and sync later") from None


def progress_bar(total, initial, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)


def summary(metrics, keys=("model_loss", "actor_loss", "critic_loss", "domain_kl", "eta")):
    return {k: f"{float(metrics[k]):.3g}" for k in keys if k in metrics}


def write_video(path, frames):
    """An mp4 (a gif where imageio has no ffmpeg backend), written under a temporary name and renamed, so a killed
    run leaves no torn video (the name matches the .*.tmp* files a run deletes when it starts)."""
    import imageio
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, options in ((path, dict(fps=20, macro_block_size=1)), (path.with_suffix(".gif"), dict(duration=50))):
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp{target.suffix}")  # the suffix picks the format
        try:
            imageio.mimsave(temporary, frames, **options)
            os.replace(temporary, target)
            return
        except (ImportError, ValueError, RuntimeError):  # no ffmpeg backend for the mp4: the gif instead
            if target.suffix == ".gif":
                raise
        finally:
            temporary.unlink(missing_ok=True)


# -- datasets ----------------------------------------------------------------------------------

def default_dataset_policy(cfg):
    """auto: the task's scripted expert mixed with random actions where it has one (Meta-World; RoboDesk's four
    paper targets), uniformly random actions elsewhere."""
    if cfg.dataset_policy != "auto":
        return cfg.dataset_policy
    return "scripted" if envs.has_expert(cfg.target) else "random"


def load_target_data(cfg):
    """B^(T): the offline dataset (--target-data), or a default one built once with the collect command
    and cached. Its action size and render setting are checked against the target environment."""
    directory = Path(cfg.target_data) if cfg.target_data else build_default_dataset(cfg)
    info = envs.read_dataset_info(directory) or {}
    if info.get("render") not in (None, cfg.render):
        raise envs.DatasetError(f"{directory}: recorded with render={info['render']!r} but the target environment "
                                f"uses render={cfg.render!r}; pass --render {info['render']}")
    if info.get("env") not in (None, cfg.target):
        print(f"note: {directory} was recorded on {info['env']}, the target is {cfg.target}")
    replay = envs.Replay(capacity=sys.maxsize, spill_dir=spill_dir(cfg))  # B^(T) is fixed: all of it, always
    try:
        for episode in envs.iter_dataset(directory, action_size=envs.action_size(cfg.target), seq_len=cfg.seq_len):
            replay.add(episode, save=False)
    except envs.DatasetError:
        replay.close()  # a bad dataset leaves no trace (claimed() removes the run folder it made)
        raise
    return replay


def build_default_dataset(cfg):
    """The default B^(T), collected once per setting into data_dir (runs that need it at once take turns)."""
    policy = default_dataset_policy(cfg)
    steps = f"-{cfg.max_episode_steps}steps" if cfg.max_episode_steps else ""
    directory = (Path(cfg.data_dir) / f"{cfg.target.replace(':', '-')}-{policy}-{cfg.render}-"
                 f"{cfg.target_episodes}ep{steps}-s{cfg.seed}")
    envs.collect_once(cfg.target, policy, cfg.target_episodes, directory, seed=cfg.seed + 7, render=cfg.render,
                      max_steps=cfg.max_episode_steps)
    return directory


def spill_dir(cfg):
    """Where a replay keeps its images: None (in memory) or the run folder (--replay-images disk)."""
    return Path(cfg.logdir) if cfg.replay_images == "disk" else None


# -- the command line --------------------------------------------------------------------------

def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, on which oneDNN runs bf16 matrix products and convolutions (Sapphire
    Rapids and later). AVX-512 BF16 alone does not make bf16 pay: on this project's Xeon with it, bench.py's
    small-preset target update takes 0.63 s in bf16 against 0.45 s in float32 (README, Performance)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent means no
    return bool(has_amx and has_amx())


def resolve(cfg: Config, command: str = "train") -> Config:
    """Fill the per-suite (None) values of Table 7 (suite_defaults, section 1), the device and the output
    folder."""
    values = suite_defaults(cfg, command)
    if cfg.device == "auto":
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = values.get("device", cfg.device)
    if cfg.precision == "auto":
        values["precision"] = "bf16" if device == "cuda" or cpu_has_amx() else "float32"
    if cfg.compile == "auto":
        values["compile"] = "on" if device == "cuda" else "off"
    if not cfg.logdir:
        name = cfg.source[0] if command == "online" else cfg.target
        label = "online" if command == "online" else cfg.method
        values["logdir"] = f"runs/{label}-{name.replace(':', '-')}-s{cfg.seed}"
    for name in ("logdir", "data_dir", "target_data"):  # one meaning of a path everywhere: ~ expanded, absolute
        path = values.get(name, getattr(cfg, name))
        if path:
            values[name] = os.path.abspath(os.path.expanduser(path))
    return dataclasses.replace(cfg, **values)


# The range of every numeric flag; each is also finite. Checked before any work.
AT_LEAST_ONE = ("batch_size", "seq_len", "stoch", "classes", "deter", "hidden", "cnn_depth", "mlp_units", "mlp_layers",
                "ensemble", "chunks", "train_every", "slow_critic_every", "replay_capacity", "eval_episodes",
                "target_episodes", "log_every", "checkpoint_every", "max_bad_updates", "max_episode_steps", "K1",
                "rounds", "ewc_batches")
AT_LEAST_ZERO = ("threads", "K2", "prefill", "pretrain_steps", "target_pretrain", "eval_every", "beta1", "beta2",
                 "alpha", "free_nats", "penalty", "beta", "ewc_lambda")
UNIT_INTERVAL = ("k", "kl_balance", "lambda_", "rho", "eta_start", "eta_end")  # [0, 1]
POSITIVE = ("model_lr", "actor_lr", "critic_lr", "adam_eps", "grad_clip")  # > 0
CHOICES = {"method": METHODS, "device": ("cpu", "cuda"), "precision": ("float32", "bf16"), "compile": ("on", "off"),
           "replay_images": ("disk", "memory"), "render": ("default", "fast"),
           "value_constraint": ("max", "linear", "none"), "dataset_policy": ("auto", "random", "scripted")}


def value_error(name, value):
    """What is wrong with a flag's value on its own (its choices, its range), or None: what can be checked before
    the run's machine is known (a grid's flags are checked with it before anything is submitted)."""
    if name in CHOICES:
        named = ("auto", *CHOICES[name]) if name in ("device", "precision", "compile") else CHOICES[name]
        return None if value in named else f"{flag_name(name)} must be {', '.join(named[:-1])} or {named[-1]}"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return range_error(name, value) if numeric else None


FLOAT32 = tuple(float(x) for x in (np.finfo(np.float32).tiny, np.finfo(np.float32).max))  # its normal magnitudes


def range_error(name, value):
    """What is wrong with a numeric flag's value, or None."""
    if not math.isfinite(value):
        return f"{flag_name(name)} must be a finite number, got {value}"
    if isinstance(value, float) and value and not FLOAT32[0] <= abs(value) <= FLOAT32[1]:  # what the nets compute in
        return f"{flag_name(name)} must be 0 or within float32's {FLOAT32[0]:.2g} to {FLOAT32[1]:.2g}, got {value}"
    rules = [(AT_LEAST_ONE, lambda v: v >= 1, "be at least 1"), (AT_LEAST_ZERO, lambda v: v >= 0, "be at least 0"),
             (UNIT_INTERVAL, lambda v: 0 <= v <= 1, "lie in [0, 1]"), (POSITIVE, lambda v: v > 0, "be above 0"),
             (("gamma",), lambda v: 0 < v <= 1, "lie in (0, 1]"), (("horizon",), lambda v: v >= 2, "be at least 2"),
             (("seed",), lambda v: 0 <= v < 2 ** 31, "lie in [0, 2**31)")]
    for names, ok, rule in rules:
        if name in names and not ok(value):
            return f"{flag_name(name)} must {rule}, got {value}"
    return None


def validate(cfg: Config, command: str = "train"):
    """Reject values that cannot work, with a message that says which flag to change."""
    for f in dataclasses.fields(cfg):
        if error := value_error(f.name, getattr(cfg, f.name)):
            raise ConfigError(error)
    sources = cfg.source if command == "online" or cfg.method != "offline-dv2" else ()
    checks = [
        (cfg.device != "cuda" or torch.cuda.is_available(), "--device cuda, but torch sees no CUDA device"),
        (cfg.threads <= (os.cpu_count() or 1), f"--threads {cfg.threads}: this machine has {os.cpu_count()} cores"),
        (len(cfg.source) >= 1, "--source needs at least one environment"),
        (cfg.method not in FINETUNE or len(cfg.source) == 1, f"--method {cfg.method} takes one --source"),
        (len(set(sources)) == len(sources), f"--source names {next((n for n in sources if sources.count(n) > 1), '')} "
                                            f"twice: each source is its own agent and replay"),
        (command == "online" or cfg.target not in sources, f"--source {cfg.target} is also the --target: a source is "
                                                           f"an online simulator other than the offline task"),
        (not cfg.target_data or not is_inside(cfg.logdir, cfg.target_data),
         f"--logdir {cfg.logdir} lies inside --target-data {cfg.target_data}: its files would mix with the dataset"),
        (not Path(cfg.data_dir).exists() or Path(cfg.data_dir).is_dir(), f"--data-dir {cfg.data_dir} is a file, not "
                                                                          f"a folder"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    used = cfg.source if command == "online" else (*sources, cfg.target)
    for name in used:  # only the environments the command uses: the others need not be installed
        envs.check_env_name(name)
    if command != "bench":  # bench.py writes no run folder
        check_writable(cfg.logdir)


def is_inside(path, folder):
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))  # realpath: no error on link loops


def check_writable(folder):
    """Fail before any work when the output folder cannot be created or written: try it, leaving nothing behind."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write {folder}: {existing} is not a folder")
    if existing == Path(folder).absolute():  # a run folder that exists: resumed, or a new run in an empty folder
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"cannot write {folder}: it is not writable")
        return
    try:  # can the folder be made? (os.access cannot tell: /proc is "writable" and takes no folder)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".coworld-write-test-"))
    except OSError as error:
        raise ConfigError(f"cannot write {folder}: {existing}: {error.strerror}") from None


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --batch is not --batch-size

    def error(self, message):
        raise ConfigError(message)


def flag_name(name):
    return "--" + name.rstrip("_").replace("_", "-")


COMMAND_HELP = {
    "train": "CoWorld (Algorithm 1): pretrain the source agent(s) online, then alternate offline target "
             "iterations and online source iterations, then evaluate the target agent.",
    "online": "Train one DreamerV2 agent online (Alg. 1 line 3); its replay folder is a medium-replay "
              "dataset when --stop-return is set.",
    "evaluate": "Evaluate the target agent of a finished or running CoWorld run.",
}


def build_parser(prog, description):
    """One flag per Config field (its help from the field); defaults stay unset, so presets can fill them."""
    parser = _Parser(prog=prog, argument_default=argparse.SUPPRESS, description=description)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is typing.Union else hints[f.name]
        small = f"; small preset: {PRESETS['small'][f.name]}" if f.name in PRESETS["small"] else ""
        kwargs = dict(help=f"{f.metadata['help']} (default: {f.default}{small})")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = kind
        parser.add_argument(flag_name(f.name), dest=f.name, **kwargs)
    return parser


# Flags a method does not read: given anyway, they are named in a note (unused_flags adds those its settings turn off).
UNUSED = {
    "offline-dv2": ("source", "state_alignment", "reward_alignment", "value_constraint", "beta2", "k", "alpha", "K2",
                    "eta_start", "eta_end", "pretrain_steps", "target_pretrain", "ewc_lambda", "ewc_batches"),
    "dv2-finetune": ("state_alignment", "reward_alignment", "value_constraint", "beta2", "k", "alpha", "K2",
                     "eta_start", "eta_end", "target_pretrain", "ewc_lambda", "ewc_batches", "ensemble", "penalty"),
    "coworld": ("ewc_lambda", "ewc_batches", "ensemble", "penalty"),
}
UNUSED["dv2-finetune-ewc"] = tuple(n for n in UNUSED["dv2-finetune"] if not n.startswith("ewc"))


def unused_flags(cfg):
    """The Config fields train does not read with these settings: the method's (UNUSED), the online command's
    stop_return, the online stage's settings where there is none (offline-dv2), App. C's target pretraining
    with one source, and what Stages B and C read when they are off."""
    names = [*UNUSED.get(cfg.method, ()), "stop_return"]
    if cfg.method == "offline-dv2":
        names += ["prefill", "train_every", "replay_capacity"]
    if cfg.method == "coworld":
        names += ["target_pretrain"] if len(cfg.source) == 1 else []
        names += [] if cfg.reward_alignment else ["k", "eta_start", "eta_end"]
        names += ["alpha"] if cfg.value_constraint == "none" else []
    return names


# What only train reads: the target, its data, and the methods' settings.
OFFLINE_ONLY = ("target", "target_data", "method", "beta1", "beta2", "k", "alpha", "K1", "K2", "rounds", "eta_start",
                "eta_end", "state_alignment", "reward_alignment", "value_constraint", "target_pretrain", "ensemble",
                "penalty", "ewc_lambda", "ewc_batches", "target_episodes", "dataset_policy")


def make_config(given, command="train"):
    """Parsed flags -> (Config, notes): dataclass defaults < preset < explicit flags, then Table 7's per-suite
    values; the notes name given flags the method does not read."""
    if "source" in given:
        given["source"] = tuple(given["source"])
    preset = given.get("preset", "auto")
    if preset == "auto":
        device = given.get("device", "auto")
        on_cuda = device == "cuda" or device == "auto" and torch.cuda.is_available()
        preset = "paper" if on_cuda else "small"
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be auto or one of {', '.join(PRESETS)}")
    cfg = resolve(dataclasses.replace(Config(), **{**PRESETS[preset], **given, "preset": preset}), command)
    validate(cfg, command)
    if command == "online":
        unused = [flag_name(name) for name in OFFLINE_ONLY if name in given]
        notes = [f"online trains one agent online and does not use {', '.join(unused)}"] if unused else []
    else:
        unused = [flag_name(name) for name in unused_flags(cfg) if name in given] if command == "train" else []
        notes = [f"--method {cfg.method} does not use {', '.join(unused)}"] if unused else []
    return cfg, notes


MACHINE_SETTINGS = ("device", "threads", "precision", "compile")  # evaluate: this machine's, not the run's


def evaluation_config(given):
    """evaluate: the run's own config.json, so that `evaluate --logdir DIR` needs no other flag, on any device. Only
    where it runs comes from this machine (and the evaluation flags given); other flags given must agree with the
    run's (checked against its checkpoint)."""
    path = Path(os.path.expanduser(given.get("logdir", ""))) / "config.json"
    if "logdir" not in given or not path.is_file():
        return make_config(given, "evaluate")
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:  # bad JSON, or bytes that are not UTF-8
        raise ConfigError(f"{path}: damaged ({first_line(error)}); pass the run's flags to evaluate it") from error
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: damaged (a JSON {type(saved).__name__}, not the run's flags); pass the run's "
                          f"flags to evaluate it")
    fields = {f.name for f in dataclasses.fields(Config)} - set(MACHINE_SETTINGS)
    return make_config({**{name: saved[name] for name in fields & saved.keys()}, **given}, "evaluate")


def parse_args(argv):
    """Command line -> (command, Config, notes)."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = build_parser(f"coworld.py {command}" if command != "train" else "coworld.py", COMMAND_HELP[command])
    if command == "online":
        parser.add_argument("--env", help="the environment to train on online (DreamerV2)")
        parser.add_argument("--steps", type=int, help="environment steps (after action repeat); default: "
                                                          "--pretrain-steps (160k; DMC 600k; small preset 5000)")
    given = vars(parser.parse_args(argv))
    if command == "online" and "env" not in given:
        raise ConfigError("online needs --env: the environment the agent learns in, e.g. --env dmc:walker_walk")
    if command == "online" and "source" in given:
        raise ConfigError("online takes --env (the one environment it learns in), not --source")
    if command == "online" and {"steps", "pretrain_steps"} <= given.keys():
        raise ConfigError("online takes --steps or --pretrain-steps (the same count), not both")
    if "env" in given:
        given["source"] = (given.pop("env"),)
    if "steps" in given:
        given["pretrain_steps"] = given.pop("steps")
    return (command, *(evaluation_config(given) if command == "evaluate" else make_config(given, command)))


# -- commands ----------------------------------------------------------------------------------

def announce(cfg, command, notes=()):
    notes = list(notes)
    if cfg.preset == "small":
        reason = "no CUDA device: " if not torch.cuda.is_available() else "on the CPU: " if cfg.device == "cpu" else ""
        notes.append(f"{reason}using the `small` preset (--preset paper forces the paper's values)")
    if cfg.render == "fast":
        notes.append("fast rendering (no shadows, reflections or multisampling): images differ from the benchmarks'")
    if cfg.eval_episodes < 10:
        notes.append(f"{cfg.eval_episodes} evaluation episodes (the paper uses 10)")
    print(f"coworld {command}: device={cfg.device} precision={cfg.precision} preset={cfg.preset} -> {cfg.logdir}")
    for note in notes:
        print(f"  note: {note}")


def online(run):
    """The `online` command: Alg. 1 line 3 alone, one DreamerV2 agent, then its evaluation."""
    dreamerv2_online(run, 0, run.cfg.pretrain_steps)
    return run.final_evaluation(run.sources[0], run.source_names[0])


class CoreShare:
    """--threads 0: torch uses the cores that other processes leave free, rechecked every `every_s` seconds from
    /proc/stat. Each parallel region waits for its slowest thread, so beside a process that keeps one of two cores
    busy, two threads run an update 2.5x slower than one (README, Performance). Results depend on the thread
    count in their last bits: --threads N (or OMP_NUM_THREADS) fixes it."""

    def __init__(self, every_s=10.0):
        self.most, self.every_s = torch.get_num_threads(), every_s
        self.cores = set(os.sched_getaffinity(0))
        self.last = self.sample()

    @classmethod
    def for_config(cls, cfg):
        """One where the thread count is the code's to choose: no --threads, no OMP_NUM_THREADS, a Linux CPU."""
        if cfg.threads or "OMP_NUM_THREADS" in os.environ or cfg.device != "cpu" or not Path("/proc/stat").exists():
            return None
        return cls()

    def sample(self):
        """(time, CPU seconds spent on this process's cores by anything, CPU seconds of this process)."""
        busy = 0
        with open("/proc/stat") as stat:
            for line in stat:
                name, *ticks = line.split()
                if name[3:].isdigit() and int(name[3:]) in self.cores:
                    user, nice, system, idle, iowait, irq, softirq, steal = map(int, ticks[:8])
                    busy += user + nice + system + irq + softirq + steal  # steal: another VM has the core
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def free_threads(self):
        """(threads, cores others kept busy) over the time since the last call: a core that others kept more than
        half busy is theirs."""
        now = self.sample()
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / max(now[0] - self.last[0], 1e-9)
        self.last = now
        return max(1, min(self.most, len(self.cores) - round(others))), others

    def adjust(self):
        """At most every `every_s` seconds: torch's thread count follows the free cores. Returns a line saying so
        when it changed."""
        if time.monotonic() - self.last[0] < self.every_s:
            return None
        (threads, others), before = self.free_threads(), torch.get_num_threads()
        if threads == before:
            return None
        torch.set_num_threads(threads)
        return (f"threads {before} -> {threads}: other processes kept {others:.1f} of {len(self.cores)} cores busy "
                f"(--threads N fixes the count)")


def command_run(cfg, command, notes):
    """`train` (CoWorld, Algorithm 1) and `online` (one DreamerV2 agent): run or resume, then report."""
    announce(cfg, command, notes)
    with claimed(cfg.logdir):
        run = Run(cfg, command)
        with run.stopping_on_signals():
            result = algorithm1(run) if command == "train" else online(run)
    print_result(result, run.logdir)
    return 0


@contextlib.contextmanager
def claimed(logdir):
    """The run folder, held under an exclusive lock for as long as the run goes: a second run on it stops at once
    (evaluate, which only reads, takes none). A folder this run made is removed again when bad input stops the run,
    or when it stops before writing anything."""
    folder, created = Path(logdir), not Path(logdir).exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ConfigError(f"{folder} is in use by another run (PID {holder}); wait for it to end, or use another "
                              f"--logdir") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        except BaseException as error:
            bad_input = isinstance(error, (ConfigError, envs.EnvError, envs.DatasetError))
            if created and (bad_input or not set(os.listdir(folder)) - {".lock"}):
                shutil.rmtree(folder, ignore_errors=True)
            raise


def command_evaluate(cfg):
    if not (Path(cfg.logdir) / "checkpoint.pt").exists():
        raise ConfigError(f"no checkpoint in {cfg.logdir}: pass the --logdir (and flags) of a run")
    run = Run(cfg, "evaluate")
    result = evaluate(run.target, cfg.target, cfg, cfg.eval_episodes, run.logdir / "videos" / "evaluate.mp4")
    if cfg.eval_random:
        result["random_policy"] = evaluate(run.target, cfg.target, cfg, cfg.eval_episodes, random_policy=True)
    print(json.dumps(result, indent=2))
    return 0


def print_result(result, logdir):
    ev = result["eval"]
    line = f"{result['env']}: return {ev['return_mean']:.1f} +- {ev['return_std']:.1f} over {ev['episodes']} episodes"
    if ev.get("success_rate") is not None:
        line += f", success {ev['success_rate']:.0%}"
    if "random_policy" in result:
        line += f" (random policy: {result['random_policy']['return_mean']:.1f})"
    print(line)
    print(f"results: {Path(logdir) / 'results.json'}")


def interrupted(signum, frame):
    raise Interrupted(signum)


def stop_signals():
    """The signals that stop a run: Ctrl-C, SIGTERM, and SIGUSR2 (SLURM's notice before a time limit) unless the
    parent set it to be ignored (a job that turns it into SIGTERM itself). Handlers exist in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    return tuple(s for s in STOP_SIGNALS if s != signal.SIGUSR2 or signal.getsignal(s) is not signal.SIG_IGN)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # --debug shows the traceback of an error in the flags too, so it is read before they are parsed; the last wins
    debug = next((flag == "--debug" for flag in reversed(argv) if flag in ("--debug", "--no-debug")), False)
    # Until a run takes them over (it stops at a safe point), SIGTERM and SIGUSR2 stop as Ctrl-C does.
    previous = {signum: signal.signal(signum, interrupted) for signum in stop_signals() if signum != signal.SIGINT}
    try:
        command, cfg, notes = parse_args(argv)
        debug = cfg.debug
        return command_evaluate(cfg) if command == "evaluate" else command_run(cfg, command, notes)
    except (ConfigError, envs.EnvError, envs.DatasetError, FloatingPointError, OSError) as error:
        if debug:
            traceback.print_exc()
        print(f"coworld.py: error: {envs.error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted", file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
