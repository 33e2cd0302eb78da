"""Speed and memory of CoWorld's updates, acting and environments: a much shorter version of coworld.py's training,
for benchmarking (nanoGPT's bench.py). coworld.py's Config flags set what is timed (preset, sizes, device,
precision, compile, threads; --source and --target set the action size); the updates timed are CoWorld's,
whatever --method says.

    python bench.py --preset small --updates 5 --env-steps 0
    python bench.py --preset paper --device cuda --precision bf16 --compile on --updates 10 --profile

It prints the median seconds per update, frames/s, GFLOP/s against the machine's matrix-multiply peak, peak
memory, acting speed and environment steps per second, each update and acting measurement in its own process;
lines to paste into an issue.
"""
import dataclasses
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

import coworld as C
import envs

FLAGS = {  # bench's own flags: name -> (type, default, help)
    "updates": (int, 3, "timed updates per measurement"),
    "env_steps": (int, 50, "environment steps per environment benchmark (0: skip)"),
    "check_updates": (int, 20, "bf16 only: updates of the bf16 vs float32 loss check (0: skip)"),
    "replay_steps": (int, 0, "also measure training memory from a synthetic dataset of this many steps, images on "
                             "disk vs in memory (0: skip)"),
}


def synthetic_batch(cfg, actions, seed):
    """Random uint8 images and actions of a real batch's shapes and dtypes (timing does not depend on pixels)."""
    g = torch.Generator().manual_seed(seed)
    B, T = cfg.batch_size, cfg.seq_len
    batch = {"image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8, generator=g),
             "action": torch.rand(B, T, actions, generator=g) * 2 - 1, "reward": torch.rand(B, T, generator=g),
             "is_first": torch.zeros(B, T, dtype=torch.bool), "is_terminal": torch.zeros(B, T, dtype=torch.bool)}
    batch["is_first"][:, 0] = True
    return {k: v.to(cfg.device) for k, v in batch.items()}


def action_size(cfg):
    """The shared action size of the run these flags describe (App. D's maximum action space)."""
    return max(envs.action_size(name) for name in (*cfg.source, cfg.target))


def agent(cfg, plain=False):
    """A fresh agent; plain: with its speed devices off (the plain expressions beside them run instead)."""
    agent = C.Agent(cfg, action_size(cfg)).to(cfg.device)
    if plain:
        agent.single_thread_acting = agent.wm.decoder.first_as_matmul = False
    return agent


def bench_step(cfg, kind, seed, plain=False):
    """One target update (Eq. 3 + Eq. 6) or source update (Eq. 2 + 5) of fresh agents, as a function of two
    synthetic batches, and those batches."""
    torch.manual_seed(seed)
    target, source = (agent(cfg, plain).build_optimisers() for _ in range(2))
    step = {"target": lambda b, b2: C.target_update(target, b, cfg, [source]),
            "source": lambda b, b2: C.source_update(source, b, cfg, b2, eta=0.5)}[kind]
    return step, [synthetic_batch(cfg, action_size(cfg), seed + i) for i in range(2)]


def peak_memory(cfg):
    if cfg.device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_update(cfg, kind, updates, plain=False, seed=0):
    """Median seconds of one update, its FLOPs and the peak memory, with fresh agents on synthetic data. Runs
    in its own process so peak memory is its own."""
    from torch.utils.flop_counter import FlopCounterMode
    step, batches = bench_step(cfg, kind, seed, plain)
    with FlopCounterMode(display=False) as counter:
        step(*batches)  # the first warm-up update also counts the FLOPs
    if cfg.compile == "on":
        step(*batches)  # compiled functions trace again outside the counter
    if cfg.device == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        metrics, _ = step(*batches)
        float(metrics["model_loss"])  # waits for the device
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"seconds": seconds, "frames_per_s": cfg.batch_size * cfg.seq_len / seconds,
            "gflop": counter.get_total_flops() / 1e9, "gflop_per_s": counter.get_total_flops() / 1e9 / seconds,
            "peak_gb": peak_memory(cfg) / 1e9}


def bench_profile(cfg, kind, rows=12, seed=0):
    """Where one update's time goes: the operators with the most self time (device time on CUDA), the
    update's top-level operator calls and, on CUDA, its kernel launches: what decides whether an update is
    launch-bound (then CUDA graphs pay) or compute-bound."""
    from torch.profiler import ProfilerActivity, profile
    step, batches = bench_step(cfg, kind, seed)
    for _ in range(2 if cfg.compile == "on" else 1):  # warm-up (and compilation) outside the profile
        step(*batches)
    cuda = cfg.device == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        metrics, _ = step(*batches)
        float(metrics["model_loss"])
    events = prof.events()
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows)
    return {"table": table, "ops": sum(e.cpu_parent is None and e.name.startswith("aten::") for e in events),
            "kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events) if cuda else None}


def bench_precision(cfg, updates=20, tolerance=0.05):
    """bf16 against float32: the same agents and batches for `updates` target updates; the largest relative
    difference of each world-model loss term (pixel constant removed) must stay within `tolerance`."""
    constant = 0.5 * math.log(2 * math.pi) * 64 * 64 * 3
    runs = {}
    for precision in ("float32", "bf16"):
        torch.manual_seed(0)
        run_cfg = dataclasses.replace(cfg, precision=precision)
        target, source = (C.Agent(run_cfg, action_size(cfg)).to(cfg.device).build_optimisers() for _ in range(2))
        losses = []
        for i in range(updates):
            metrics, _ = C.target_update(target, synthetic_batch(run_cfg, action_size(cfg), i), run_cfg, [source])
            losses.append([float(metrics["image_nll"]) - constant, float(metrics["reward_nll"]),
                           float(metrics["kl"])])
        runs[precision] = np.array(losses)
    deviation = np.abs(runs["bf16"] - runs["float32"]) / np.maximum(np.abs(runs["float32"]), 1e-3)
    worst = dict(zip(("image", "reward", "kl"), deviation.max(0)))
    return {"worst": worst, "ok": bool(max(worst.values()) <= tolerance), "tolerance": tolerance}


def bench_act(cfg, plain=False, steps=200):
    """Policy steps per second on single observations (the acting cost inside data collection)."""
    actor = agent(cfg, plain)
    obs = {"image": np.zeros((64, 64, 3), np.uint8), "is_first": True}
    state = None
    for i in range(steps + 10):
        if i == 10:
            start = time.perf_counter()
        _, state, _ = actor.act(obs, state, explore=True)
        obs["is_first"] = False
    return {"steps_per_s": steps / (time.perf_counter() - start)}


def write_bench_dataset(directory, steps, actions, length=501):
    """A dataset of `steps` time steps in the on-disk layout, with smooth synthetic images (memory use does not
    depend on the pixels; smooth ones compress fast)."""
    rng = np.random.default_rng(0)
    ramp = np.arange(64, dtype=np.uint8)
    for start in range(0, steps, length):
        n = min(length, steps - start)
        offsets = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
        image = (ramp[None, :, None, None] + ramp[None, None, :, None] + offsets).astype(np.uint8)
        flags = np.arange(n)
        envs.save_episode(directory, {
            "image": image, "action": rng.uniform(-1, 1, (n, actions)).astype(np.float32),
            "reward": rng.uniform(0, 1, n).astype(np.float32), "discount": np.ones(n, np.float32),
            "is_first": flags == 0, "is_last": flags == n - 1, "is_terminal": flags < 0})


def bench_replay(cfg, directory, updates):
    """Peak memory of loading a dataset into the replay (cfg.replay_images) and training the target agent from it."""
    torch.manual_seed(0)
    start = time.perf_counter()
    replay = envs.Replay(capacity=cfg.replay_capacity, spill_dir=C.spill_dir(cfg))
    for episode in envs.iter_dataset(directory, action_size=action_size(cfg)):
        replay.add(episode, save=False)
    load_s, rng = time.perf_counter() - start, np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(10):
        replay.sample(cfg.batch_size, cfg.seq_len, rng)
    sample_s = (time.perf_counter() - start) / 10
    agent = C.Agent(cfg, action_size(cfg)).to(cfg.device).build_optimisers()
    for _ in range(updates):
        batch = replay.sample(cfg.batch_size, cfg.seq_len, rng)
        C.target_update(agent, C.to_torch(batch, action_size(cfg), cfg.device), cfg)
    return {"steps": replay.num_steps, "load_s": load_s, "sample_s": sample_s, "peak_gb": peak_memory(cfg) / 1e9}


def peak_gflops(device, dtype, n=2048, reps=10):
    """The machine's measured matrix-multiply throughput, the yardstick for an update's GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def in_subprocess(function, *args):
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def parse_args(argv):
    """coworld.py's Config flags plus bench's own; --profile adds the operator profile."""
    parser = C.build_parser("bench.py", "Time updates, acting and environment steps; prints numbers to paste into "
                                        "an issue.")
    for name, (kind, default, help) in FLAGS.items():
        parser.add_argument(C.flag_name(name), dest=name, type=kind, help=f"{help} (default {default})")
    parser.add_argument("--profile", action="store_true", help="also profile one update of each kind: the operators "
                        "that take the most time, operator calls and kernel launches")
    parser.add_argument("--plain", action="store_true", help="the speed devices off (the decoder's first layer as "
                        "its transposed convolution, acting on every thread, no torch.compile): what they buy")
    given = vars(parser.parse_args(argv))
    extra = {name: given.pop(name, default) for name, (_, default, _) in FLAGS.items()}
    extra["profile"], extra["plain"] = given.pop("profile", False), given.pop("plain", False)
    for name in ("updates", "replay_steps", "env_steps", "check_updates"):
        if extra[name] < (1 if name == "updates" else 0):
            raise C.ConfigError(f"{C.flag_name(name)} must be at least {1 if name == 'updates' else 0}")
    cfg = C.make_config(given, "bench")[0]
    return (dataclasses.replace(cfg, compile="off") if extra["plain"] else cfg), extra


def bench(cfg, updates, env_steps, check_updates, replay_steps, profile, plain):
    """Print update, acting and environment speeds in a form to paste into an issue."""
    threads, share = cfg.threads, C.CoreShare.for_config(cfg)
    if share:  # as coworld.py's runs do: the cores other processes leave free, looked at for a second
        time.sleep(1.0)
        threads, others = share.free_threads()
    if threads:  # the measuring processes read it when they start
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    print(f"coworld bench  {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  device {cfg.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cfg.device == 'cuda' else ''}  threads "
          f"{torch.get_num_threads()}{f' (others kept {others:.1f} cores busy)' if share else ''}  "
          f"cpus {os.cpu_count()}")
    print(f"preset {cfg.preset}  precision {cfg.precision}  batch {cfg.batch_size} x {cfg.seq_len}  "
          f"horizon {cfg.horizon}  latents {cfg.stoch}x{cfg.classes}  deter {cfg.deter}  cnn depth {cfg.cnn_depth}"
          f"{'  plain (no speed devices)' if plain else ''}")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    print(f"matmul peak: {peak_gflops(cfg.device, dtype):.0f} GFLOP/s ({cfg.precision})")
    for kind in ("target", "source"):
        r = in_subprocess(bench_update, cfg, kind, updates, plain)
        print(f"{kind} update: {r['seconds']:.3f} s median of {updates}  {r['frames_per_s']:.0f} frames/s  "
              f"{r['gflop']:.0f} GFLOP  {r['gflop_per_s']:.0f} GFLOP/s  peak memory {r['peak_gb']:.2f} GB")
    print(f"acting: {in_subprocess(bench_act, cfg, plain)['steps_per_s']:.0f} policy steps/s")
    if profile:
        for kind in ("target", "source"):
            r = in_subprocess(bench_profile, cfg, kind)
            kernels = f", {r['kernels']} kernel launches" if r["kernels"] is not None else ""
            print(f"{kind} update profile: {r['ops']} top-level operator calls{kernels}\n{r['table']}")
    if cfg.precision == "bf16" and check_updates:
        r = in_subprocess(bench_precision, cfg, check_updates)
        worst = ", ".join(f"{k} {v:.2%}" for k, v in r["worst"].items())
        print(f"bf16 vs float32 over {check_updates} updates: largest relative loss difference "
              f"{worst} (tolerance {r['tolerance']:.0%}): {'ok' if r['ok'] else 'FAILED'}")
    if replay_steps:
        with tempfile.TemporaryDirectory(dir=cfg.data_dir if os.path.isdir(cfg.data_dir) else None) as directory:
            write_bench_dataset(directory, replay_steps, action_size(cfg))
            for images in ("memory", "disk"):
                run_cfg = dataclasses.replace(cfg, replay_images=images, logdir=directory)
                r = in_subprocess(bench_replay, run_cfg, directory, updates)
                print(f"training from {r['steps']} dataset steps, images in {images}: peak memory "
                      f"{r['peak_gb']:.2f} GB (load {r['load_s']:.0f} s, one batch sampled in "
                      f"{1000 * r['sample_s']:.0f} ms, {updates} updates)")
    if env_steps:
        print("environment steps per second (step + render):")
        envs.bench(steps=env_steps)


def main(argv=None):
    try:
        cfg, extra = parse_args(sys.argv[1:] if argv is None else argv)
        bench(cfg, **extra)
    except (C.ConfigError, envs.EnvError, OSError) as error:
        print(f"bench.py: error: {envs.error_message(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
