"""The paper's experiment grids: launch them through submitit (on SLURM or locally), then report them.

    python experiments.py launch table2 --cluster slurm --partition gpu --gpus-per-job 1 --timeout-min 1440
    python experiments.py launch smoke --cluster local --parallel 2 -- --preset small --K1 20
    python experiments.py report experiments/table2

A grid is data: a list of (source(s), target, method, flags) cells taken from the paper, each grid citing its
section, run once per seed. A run is one `python coworld.py <flags> --logdir <run folder>` subprocess in its own
folder under the grid's folder, named by its settings. coworld.py holds the method; this file only starts it and
reads what it writes (results.json, metrics.jsonl, config.json, checkpoint.pt), and coworld.py never imports it.

Files this file adds: <grid folder>/launch.json (the coworld.py flags every run got), <run>/job.json (the run's
settings and command), <run>/status.json (what its job last did), <run>/coworld.log (coworld.py's output), and the
report: report.md, report.json (every number behind it) and figures/*.png.
"""
import argparse
import fcntl
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import cloudpickle
import numpy as np
import submitit

ROOT = Path(__file__).resolve().parent
COWORLD = ROOT / "coworld.py"


# =============================================================================================
# 1. The paper's grids
# =============================================================================================

class Entry(NamedTuple):
    """One cell of a paper table or figure: coworld.py with these settings, once per seed."""
    target: str
    method: str
    sources: tuple = ()
    flags: tuple = ()  # this cell's own coworld.py flags, e.g. ("--beta2", "0.1")
    label: str = ""  # the report's row and what --methods selects; empty: the method

    @property
    def row(self):
        return self.label or self.method


class Grid(NamedTuple):
    name: str
    title: str
    cite: str
    entries: tuple
    columns: dict  # target -> the paper's column header, in the paper's order
    reference: dict = None  # row -> {target: (mean, std)}: the paper's numbers, where it prints them
    figures: tuple = ()  # figures beside the table and learning curves: "values" (Fig. 5b), "sensitivity" (Fig. 6)


def mw(task):
    return f"metaworld:{task}"


def rd(task):
    return f"robodesk:{task}"


def dmc(task):
    return f"dmc:{task}"


# Sec. 4.2: "We select 6 tasks to serve as either the offline dataset or potential candidates for the online
# auxiliary domain": Door Close (DC*), Button Press (BP), Window Close (WC), Handle Press (HP), Drawer Close (DC),
# Button Topdown (BT).
PAPER_METAWORLD = ("door-close", "button-press", "window-close", "handle-press", "drawer-close", "button-press-topdown")

# Table 2's columns: (source, target, header).
TABLE2_PAIRS = (("button-press", "door-close", "BP→DC*"), ("drawer-close", "button-press", "DC→BP"),
                ("button-press-topdown", "window-close", "BT→WC"), ("button-press", "handle-press", "BP→HP"),
                ("window-close", "drawer-close", "WC→DC"), ("handle-press", "button-press-topdown", "HP→BT"))
# Figure 4's Meta-World -> RoboDesk pairs (the best sources of Sec. 4.3, also Table 6's selections).
FIGURE4_PAIRS = (("window-close", "open_slide", "WC→open slide"), ("button-press", "push_green", "BP→push green"),
                 ("drawer-close", "open_drawer", "DC→open drawer"),
                 ("handle-press", "upright_block_off_table", "HP→upright block off table"))
# Table 3's DMC pairs: Walker Walk -> Downhill, Uphill, Nofoot; Cheetah Run -> Downhill, Uphill, Nopaw.
TABLE3_PAIRS = (("walker_walk", "walker_downhill", "WW→WD"), ("walker_walk", "walker_uphill", "WW→WU"),
                ("walker_walk", "walker_nofoot", "WW→WN"), ("cheetah_run", "cheetah_downhill", "CR→CD"),
                ("cheetah_run", "cheetah_uphill", "CR→CU"), ("cheetah_run", "cheetah_nopaw", "CR→CN"))
# Sec. 4.5's sensitivity values on DC -> BP. The text gives ranges, not Figure 6's ticks: beta2 "too small" and
# "too large" around Table 7's 1; k improves on DV2 Finetune "in the range of [0.1, 0.7]" (0.9 lies beyond it);
# alpha "performs well within [1, 3]" and "an excessively larger alpha" over-constrains (0.5 lies below it). Table
# 7's own values (beta2 1, k 0.3, alpha 2) are the plain CoWorld run, not repeated here.
FIGURE6_VALUES = {"beta2": ("0.1", "0.5", "2", "5"), "k": ("0.1", "0.5", "0.7", "0.9"), "alpha": ("0.5", "1", "3", "5")}


def metaworld_candidates(target):
    """App. C's candidate sources for a Meta-World target: the other five of Sec. 4.2's six tasks.

    App. C uses, per target, "the CoWorld best-performing task and the CoWorld worst-performing task" of Figure 3's
    transfer matrix, plus "the sub-optimal source task ... for some target tasks". That matrix's numbers are not in
    the text, so these candidates are all five others: a superset holding those two or three, and Table 6's choice.
    """
    return tuple(mw(task) for task in PAPER_METAWORLD if task != target)


# Sec. 4.3: "For the multi-source experiments, we jointly use all aforementioned Meta-World tasks as the source
# domains": all six for every RoboDesk target (Figure 4 and Table 6 share these runs).
ROBODESK_CANDIDATES = tuple(mw(task) for task in PAPER_METAWORLD)


def table2_entries():
    """Table 2 (Sec. 4.2): per pair, Offline DV2, DV2 Finetune, DV2 Finetune+EWC, CoWorld with the pair's source
    (best source) and multi-source CoWorld (App. C: "The performance of multi-source CoWorld is reported in
    Table 2")."""
    entries = []
    for source, target, _ in TABLE2_PAIRS:
        entries += [Entry(mw(target), "offline-dv2"),
                    Entry(mw(target), "dv2-finetune", (mw(source),)),
                    Entry(mw(target), "dv2-finetune-ewc", (mw(source),)),
                    Entry(mw(target), "coworld", (mw(source),)),
                    Entry(mw(target), "coworld", metaworld_candidates(target), label="coworld-multi-source")]
    return tuple(entries)


def figure4_entries():
    """Figure 4 (Sec. 4.3): Offline DV2, DV2 Finetune, CoWorld (best source) and multi-source CoWorld."""
    entries = []
    for source, target, _ in FIGURE4_PAIRS:
        entries += [Entry(rd(target), "offline-dv2"),
                    Entry(rd(target), "dv2-finetune", (mw(source),)),
                    Entry(rd(target), "coworld", (mw(source),)),
                    Entry(rd(target), "coworld", ROBODESK_CANDIDATES, label="coworld-multi-source")]
    return tuple(entries)


def table3_entries():
    """Table 3 (Sec. 4.4): Offline DV2, DV2 Finetune and CoWorld on the modified DMC tasks. The paper picked each
    target's source with App. C's selection ("We apply the proposed multi-source domain selection method to build
    the domain transfer settings shown in Table 3"); these are the sources it names, Walker Walk and Cheetah Run."""
    entries = []
    for source, target, _ in TABLE3_PAIRS:
        entries += [Entry(dmc(target), "offline-dv2"),
                    Entry(dmc(target), "dv2-finetune", (dmc(source),)),
                    Entry(dmc(target), "coworld", (dmc(source),))]
    return tuple(entries)


def table6_entries():
    """Table 6 (App. C): multi-source CoWorld on each Meta-World and RoboDesk target; the report counts which
    source it selects. The same runs as Table 2's and Figure 4's multi-source rows (same folder names)."""
    multi = "coworld-multi-source"
    return (tuple(Entry(mw(t), "coworld", metaworld_candidates(t), label=multi) for t in PAPER_METAWORLD)
            + tuple(Entry(rd(t), "coworld", ROBODESK_CANDIDATES, label=multi) for _, t, _ in FIGURE4_PAIRS))


def figure6_entries():
    """Figure 6 (Sec. 4.5): CoWorld on DC -> BP over beta2, k and alpha, one at a time, and DV2 Finetune, the line
    the text compares k with."""
    source, target = (mw("drawer-close"),), mw("button-press")
    return ((Entry(target, "coworld", source),)
            + tuple(Entry(target, "coworld", source, (f"--{name}", value), label=f"{name}={value}")
                    for name, values in FIGURE6_VALUES.items() for value in values)
            + (Entry(target, "dv2-finetune", source),))


# The paper's numbers, typed in once, for the methods this code runs (DrQ+BC, CQL, CURL and LOMPO are left out).
# Table 2: "Mean episode returns and standard deviations of 10 episodes over 3 seeds on Meta-World", columns in
# TABLE2_PAIRS's order. Its printed AVG column is left out and computed from the cells instead: the printed 3781 of
# DV2 Finetune is not its row's mean (3483), nor 4241 CoWorld's (4236), nor 4094 multi-source CoWorld's (4118).
TABLE2_PAPER = {
    "offline-dv2": ((2143, 579), (3142, 533), (3921, 752), (278, 128), (3899, 679), (3002, 346)),
    "dv2-finetune": ((3500, 414), (2456, 661), (3467, 1031), (3702, 451), (4273, 1327), (3499, 713)),
    "dv2-finetune-ewc": ((1566, 723), (167, 86), (978, 772), (528, 334), (2048, 1034), (224, 147)),
    "coworld": ((3967, 312), (3623, 543), (4521, 367), (4570, 677), (4845, 14), (3889, 159)),
    "coworld-multi-source": ((3864, 352), (3573, 541), (4507, 59), (4460, 783), (4678, 137), (3626, 275)),
}
# Table 3: "Mean rewards and standard deviations of 10 episodes in offline DMC over 3 seeds", TABLE3_PAIRS's order.
# The paper's text of this table repeats LOMPO's WW→WD and CR→CN cells inside the finetune rows; each row's printed
# AVG (181, 417, 488) is the mean of the six cells below.
TABLE3_PAPER = {
    "offline-dv2": ((435, 22), (139, 4), (214, 4), (243, 7), (3, 1), (51, 4)),
    "dv2-finetune": ((379, 23), (354, 29), (407, 37), (702, 41), (208, 22), (454, 82)),
    "coworld": ((629, 9), (407, 141), (426, 32), (745, 28), (225, 20), (493, 10)),
}
# Table 6: "Multi-source CoWorld selection results on Meta-World and RoboDesk": target -> selected source.
TABLE6_PAPER = {mw("door-close"): mw("drawer-close"), mw("button-press"): mw("handle-press"),
                mw("window-close"): mw("button-press-topdown"), mw("handle-press"): mw("button-press"),
                mw("button-press-topdown"): mw("handle-press"), mw("drawer-close"): mw("door-close"),
                rd("push_green"): mw("button-press"), rd("open_slide"): mw("window-close"),
                rd("open_drawer"): mw("drawer-close"), rd("upright_block_off_table"): mw("handle-press")}
# Sec. 4.5: "a consistent improvement over DV2 Finetune (2456 ± 661)" on DC -> BP (Table 2's cell).
FIGURE6_PAPER = {"dv2-finetune": {mw("button-press"): (2456, 661)}}


def paper_cells(pairs, table, prefix):
    return {row: {prefix(target): cell for (_, target, _), cell in zip(pairs, cells)} for row, cells in table.items()}


GRIDS = {grid.name: grid for grid in (
    Grid("table2", "Meta-World, cross-task transfer", "Table 2, Sec. 4.2; multi-source: App. C", table2_entries(),
         {mw(t): header for _, t, header in TABLE2_PAIRS}, paper_cells(TABLE2_PAIRS, TABLE2_PAPER, mw)),
    Grid("figure4", "Meta-World -> RoboDesk, cross-environment transfer", "Figure 4, Sec. 4.3", figure4_entries(),
         {rd(t): header for _, t, header in FIGURE4_PAIRS}),
    Grid("table3", "DMC, cross-dynamics transfer", "Table 3, Sec. 4.4", table3_entries(),
         {dmc(t): header for _, t, header in TABLE3_PAIRS}, paper_cells(TABLE3_PAIRS, TABLE3_PAPER, dmc)),
    Grid("figure5a", "Ablations on RoboDesk push green (source: Meta-World button-press)", "Figure 5(a), Sec. 4.5",
         (Entry(rd("push_green"), "coworld", (mw("button-press"),)),
          Entry(rd("push_green"), "coworld", (mw("button-press"),), ("--no-state-alignment",), "no-state-alignment"),
          Entry(rd("push_green"), "coworld", (mw("button-press"),), ("--no-reward-alignment",), "no-reward-alignment"),
          Entry(rd("push_green"), "coworld", (mw("button-press"),), ("--value-constraint", "none"),
                "no-value-constraint")),
         {rd("push_green"): "BP→push green"}),
    # Sec. 4.5 evaluates the values "on the offline Meta-World datasets" without naming the pair: Table 2's first.
    Grid("figure5b", "Value estimates against true values on Meta-World BP -> DC*", "Figure 5(b), Sec. 4.5",
         (Entry(mw("door-close"), "coworld", (mw("button-press"),)), Entry(mw("door-close"), "offline-dv2"),
          Entry(mw("door-close"), "coworld", (mw("button-press"),), ("--value-constraint", "linear"),
                "coworld-wo-max")),
         {mw("door-close"): "BP→DC*"}, figures=("values",)),
    Grid("table6", "Multi-source selection", "Table 6, App. C; candidates: Sec. 4.2, 4.3", table6_entries(),
         {**{mw(t): t for t in PAPER_METAWORLD}, **{rd(t): t for _, t, _ in FIGURE4_PAIRS}}),
    Grid("figure6", "Hyperparameter sensitivity on Meta-World DC -> BP", "Figure 6, Sec. 4.5", figure6_entries(),
         {mw("button-press"): "DC→BP"}, FIGURE6_PAPER, figures=("sensitivity",)),
    # Not from the paper: a DMC pair small enough to check an installation or a cluster setup in minutes.
    Grid("smoke", "Setup check (not from the paper)", "none: DMC cartpole balance -> swingup",
         (Entry(dmc("cartpole_swingup"), "coworld", (dmc("cartpole_balance"),)),
          Entry(dmc("cartpole_swingup"), "offline-dv2")),
         {dmc("cartpole_swingup"): "balance→swingup"}),
)}

ROW_NAMES = {"offline-dv2": "Offline DV2", "dv2-finetune": "DV2 Finetune", "dv2-finetune-ewc": "DV2 Finetune+EWC",
             "coworld": "CoWorld", "coworld-multi-source": "CoWorld (multi-source)",
             "no-state-alignment": "CoWorld w/o state alignment", "no-reward-alignment": "CoWorld w/o reward alignment",
             "no-value-constraint": "CoWorld w/o value constraint", "coworld-wo-max": "CoWorld w/o Max"}
BASELINE = "offline-dv2"  # the probability of improvement is over Offline DV2


def row_name(row):
    return ROW_NAMES.get(row, f"CoWorld {row}")


# =============================================================================================
# 2. Runs: names, commands, the job that runs one
# =============================================================================================

# The coworld.py flags a grid sets for each run; flags after `--` must not set them again.
RUN_FLAGS = ("--method", "--source", "--target", "--seed", "--logdir", "--target-data")
SIGNAL_DELAY_S = 120  # the signal comes this long before the time limit; an online safe point is <= ~30 s away on a GPU
MAX_TIMEOUTS = 100  # requeues after a time limit (~21 GPU-hours a paper run: 6 slots of 4 h); bounds a stuck run
POLL_S = 1.0
LOCK = "job.lock"  # held (flock) by the job that runs the folder and by its coworld.py


class UsageError(Exception):
    """A bad command line or folder: printed as one line, exit code 2."""


class RunError(Exception):
    """A run that did not finish; its status.json says why."""


def env_slug(name):
    return name.replace(":", "-")


def sources_slug(sources):
    """'metaworld-button-press+drawer-close': the family once per group, so six Meta-World sources stay readable."""
    groups = {}
    for name in sources:
        family, task = name.split(":", 1)
        groups.setdefault(family, []).append(task)
    return ",".join(f"{family}-{'+'.join(tasks)}" for family, tasks in groups.items())


def flag_fields(flags):
    """('--beta2', '0.1', '--no-state-alignment') -> ['beta2=0.1', 'no-state-alignment']."""
    fields = []
    for token in flags:
        if token.startswith("--"):
            fields.append(token[2:])
        else:
            fields[-1] += ("," if "=" in fields[-1] else "=") + token
    return fields


def run_name(entry, seed):
    """The run folder: method__sources__target__flags__seed, e.g.
    coworld__metaworld-button-press__metaworld-door-close__s0. Equal settings give equal names, so grids that
    share a cell (Table 2 and Table 6) share its runs in one --out."""
    fields = [entry.method, *([sources_slug(entry.sources)] if entry.sources else []), env_slug(entry.target),
              *flag_fields(entry.flags), f"s{seed}"]
    return "__".join(fields)


def entry_key(entry):
    return entry.method, tuple(entry.sources), entry.target, tuple(entry.flags)


def job_key(job):
    return job["method"], tuple(job["sources"]), job["target"], tuple(job["flags"])


def coworld_command(entry, seed, logdir, common, datasets):
    """python coworld.py with the cell's settings, the seed, the grid's dataset for the target, the flags given
    after `--`, and the run folder."""
    command = [sys.executable, str(COWORLD), "--method", entry.method]
    if entry.sources:
        command += ["--source", *entry.sources]
    command += ["--target", entry.target, *entry.flags, "--seed", str(seed)]
    if datasets:
        command += ["--target-data", str(Path(datasets) / env_slug(entry.target))]
    return command + [*common, "--logdir", str(logdir)]


def write_file(path, write):
    """write(file) into a temporary file, flushed to disk, then renamed over ``path``: a reader (or a machine lost
    half way) never sees half a file. Not a hidden .*.tmp name, as envs.atomic_write's (importing envs would pick
    this machine's MUJOCO_GL for the jobs): a run deletes those in its folder when it starts."""
    temporary = Path(f"{path}.{os.getpid()}.new")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_json(path, data):
    write_file(path, lambda file: file.write(json.dumps(data, indent=2).encode()))


def save_figure(fig, path):
    write_file(path, lambda file: fig.savefig(file, format=Path(path).suffix[1:], dpi=80))


def read_json(path):
    path = Path(path)
    return parse_json(path.read_text(), path) if path.exists() else None


def parse_json(text, path, line=None):
    """A run folder's JSON, or a UsageError naming the damaged file (and line), not a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"{path}, line {line}" if line else str(path)
        raise UsageError(f"{where} is damaged ({error}); mend or delete it, or move that run folder away") from None


def lock_held(folder):
    """True while a job runs this folder (its flock on job.lock, which its coworld.py inherits and holds too)."""
    path = Path(folder) / LOCK
    if not path.exists():
        return False
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def last_log_line(folder):
    """coworld.py's last line (its one-line error when it fails); progress bars end their lines with \\r."""
    path = Path(folder) / "coworld.log"
    if not path.exists():
        return ""
    tail = path.read_bytes()[-4000:].decode(errors="replace").replace("\r", "\n")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_status(folder, state, **fields):
    """status.json: what the run's job last did (running, finished, failed, interrupted, requeued), where, when."""
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    write_json(Path(folder) / "status.json", {"state": state, "time": time.time(), "host": socket.gethostname(),
                                              "job_id": job_id, **fields})


def ignore_preemption_signal():
    """In the child, before exec: ignore submitit's signal (SIGUSR2). SLURM sends it to every process of the job,
    and its default action would kill coworld.py without a checkpoint; the job's checkpoint() turns it into the
    SIGTERM that coworld.py answers with a safe-point checkpoint. An ignored signal stays ignored across exec."""
    signal.signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), signal.SIG_IGN)


class CoworldJob(submitit.helpers.Checkpointable):
    """One coworld.py run as a submitit job (SLURM or local): start coworld.py, wait for it, record how it ended.

    threads: CPU threads for coworld.py (OMP_NUM_THREADS); None = the CPUs this job may use (SLURM's allocation).
    env: extra environment for coworld.py; a None value removes the variable.
    """

    def __init__(self, command, logdir, cwd, threads=None, env=None, signal_delay_s=SIGNAL_DELAY_S):
        self.command, self.logdir, self.cwd = list(command), str(logdir), str(cwd)
        self.threads, self.env, self.signal_delay_s = threads, dict(env or {}), signal_delay_s
        self.process = None

    def __call__(self):
        logdir = Path(self.logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        if (logdir / "results.json").exists():  # a duplicate submission of a finished run
            return "finished"
        with open(logdir / LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"{logdir} is being run by another job") from None
            threads = self.threads or len(os.sched_getaffinity(0))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **self.env}
            env = {key: value for key, value in env.items() if value is not None}
            with open(logdir / "coworld.log", "ab") as log:
                self.process = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=log,
                                                stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),),
                                                preexec_fn=ignore_preemption_signal)
            write_status(logdir, "running", pid=self.process.pid, job_pid=os.getpid(), threads=threads)
            # A thread reaps the child; this thread only sleeps and reads returncode (see wait_for_child).
            threading.Thread(target=self.process.wait, daemon=True).start()
            self.wait_for_child(math.inf)
        return self.record_exit(logdir, self.process.returncode, threads)

    def wait_for_child(self, seconds):
        """Sleep until coworld.py has exited or `seconds` have passed; True if it exited. checkpoint() calls this
        inside a signal handler, which may have interrupted this very loop: sleeping and reading an attribute are
        safe there, where a Popen method (which takes a lock) could block."""
        deadline = time.monotonic() + seconds
        while self.process.returncode is None and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return self.process.returncode is not None

    def record_exit(self, logdir, code, threads):
        if code == 0 and (logdir / "results.json").exists():
            write_status(logdir, "finished", returncode=0, threads=threads)
            return "finished"
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            state, detail = "interrupted", "stopped by a signal at a safe point; its checkpoint resumes it"
        elif code < 0:
            state, detail = "failed", f"killed by {signal.Signals(-code).name}"
        else:
            state, detail = "failed", last_log_line(logdir) or f"exit code {code}"
        write_status(logdir, state, returncode=code, detail=detail, threads=threads)
        raise RunError(f"{logdir.name}: {detail}")

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on its signal before a time limit or a preemption (signal_delay_s before the end).
        SIGTERM makes coworld.py stop at its next safe point (offline: after the current update; online: at the end
        of the episode, up to ~30 s on a GPU), write a checkpoint and exit 143; after three quarters of the delay, a
        second SIGTERM stops it at once, keeping its last checkpoint (a kill after that keeps it too). The returned
        submission is this run again: submitit requeues the job, and coworld.py resumes from the checkpoint."""
        if self.process is not None and self.process.returncode is None:
            for signum, share in ((signal.SIGTERM, 0.75), (signal.SIGTERM, 0.1), (signal.SIGKILL, 0.05)):
                self.process.send_signal(signum)
                if self.wait_for_child(share * self.signal_delay_s):
                    break
        write_status(self.logdir, "requeued", returncode=self.process.returncode if self.process else None)
        return submitit.helpers.DelayedSubmission(
            CoworldJob(self.command, self.logdir, self.cwd, self.threads, self.env, self.signal_delay_s))


# =============================================================================================
# 3. Launch
# =============================================================================================

def select_entries(grid, targets, methods):
    """The grid narrowed to --targets and --methods (each checked against the grid's own)."""
    for given, valid, flag in ((targets, list(grid.columns), "--targets"),
                               (methods, list(dict.fromkeys(e.row for e in grid.entries)), "--methods")):
        unknown = [value for value in given or () if value not in valid]
        if unknown:
            raise UsageError(f"{flag}: {grid.name} has no {', '.join(unknown)}; its {flag[2:]} are: {', '.join(valid)}")
    return [e for e in grid.entries if (not targets or e.target in targets) and (not methods or e.row in methods)]


# Parses each run's flags with coworld.py's own parser, in a process of its own: importing coworld (envs.py) sets
# MUJOCO_GL for this machine, and sbatch would pass that on to the jobs, whose machines may have other GPUs.
PARSE_FLAGS = """import json, sys, coworld
for name, argv in json.load(sys.stdin):
    try:
        given = vars(coworld.build_parser("coworld.py", "").parse_args(argv))
        errors = [error for flag, value in given.items() if (error := coworld.value_error(flag, value))]
        if errors:
            raise coworld.ConfigError(errors[0])
    except coworld.ConfigError as error:
        sys.exit(f"coworld.py does not accept the flags of {name}: {error}")
"""


def check_common_flags(common, entries, seeds):
    """Flags after `--` go to every run: they must not set what the grid sets, and coworld.py must accept them
    and their values with each cell's own flags, before anything is submitted (here, not on the run's machine:
    whether its environments and device exist is checked when each run starts)."""
    for token in common:
        if token.split("=", 1)[0] in RUN_FLAGS:
            raise UsageError(f"{token} after -- is set by the grid for each run (use --seeds, --targets, --methods, "
                             f"--datasets or --out)")
    runs = [(run_name(entry, seeds[0]), coworld_command(entry, seeds[0], "run", common, None)[2:]) for entry in entries]
    parsed = subprocess.run([sys.executable, "-c", PARSE_FLAGS], input=json.dumps(runs), capture_output=True,
                            text=True, cwd=ROOT)
    if parsed.returncode:
        raise UsageError(parsed.stderr.strip().splitlines()[-1] if parsed.stderr.strip() else "coworld.py failed")


def check_launch_record(out, grid, common, datasets, dry_run):
    """A grid folder holds runs of one set of common flags: launching it again with others would skip finished
    runs made with the old ones. Records the grid and the flags on the first launch."""
    record = read_json(out / "launch.json")
    if record and (record["flags"], record["datasets"]) != (common, datasets):
        raise UsageError(f"{out} was launched with coworld.py flags {shlex.join(record['flags']) or '(none)'} and "
                         f"--datasets {record['datasets']}; use another --out for other flags")
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        grids = sorted({*(record["grids"] if record else ()), grid.name})
        write_json(out / "launch.json", {"grids": grids, "flags": common, "datasets": datasets})


class Planned(NamedTuple):
    name: str  # the run folder's name
    entry: Entry
    seed: int
    command: list
    action: str  # start | resume (a checkpoint exists) | finished | running (both skipped)


def plan_jobs(entries, seeds, out, common, datasets):
    """One Planned per cell and seed, with what launching does with it."""
    jobs = []
    for entry in entries:
        for seed in seeds:
            name = run_name(entry, seed)
            folder = out / name
            if (folder / "results.json").exists():
                action = "finished"
            elif lock_held(folder):
                action = "running"
            else:
                action = "resume" if (folder / "checkpoint.pt").exists() else "start"
            jobs.append(Planned(name, entry, seed, coworld_command(entry, seed, folder, common, datasets), action))
    return jobs


def write_job_record(folder, grid, entry, seed, command):
    previous = read_json(folder / "job.json") or {}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "job.json", {"grids": sorted({*previous.get("grids", ()), grid.name}), "method": entry.method,
                                     "sources": list(entry.sources), "target": entry.target, "flags": list(entry.flags),
                                     "label": entry.row, "seed": seed, "command": command, "cwd": os.getcwd()})


def launch_local(grid, jobs, out, args):
    """Run the jobs as local subprocesses through submitit's LocalExecutor, `--parallel` at a time, each with its
    share of the CPU threads. With --timeout-min, a job gets submitit's signal before its limit and is requeued
    (restarted) as on SLURM. Returns the exit code: 0 when every run finished."""
    threads = max(1, len(os.sched_getaffinity(0)) // args.parallel)
    executor = submitit.LocalExecutor(folder=out / "submitit" / "%j", max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(timeout_min=args.timeout_min or 60 * 24 * 365, signal_delay_s=args.signal_delay_s)
    # Local runs see the GPUs of the launching shell (submitit would hide them from a job without gpus_per_node).
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    waiting, running, unfinished = list(jobs), {}, []
    print(f"{grid.name}: running {len(waiting)} runs, {args.parallel} at a time, {threads} CPU thread(s) each")
    try:
        while waiting or running:
            while waiting and len(running) < args.parallel:
                job = waiting.pop(0)
                running[job.name] = executor.submit(CoworldJob(job.command, out / job.name, os.getcwd(), threads, env,
                                                               args.signal_delay_s))
                print(f"  {job.action:7} {job.name}", flush=True)
            time.sleep(POLL_S)
            for name in [name for name, job in running.items() if job.done()]:
                del running[name]
                if (out / name / "results.json").exists():
                    print(f"  done    {name}", flush=True)
                    continue
                unfinished.append(name)
                status = read_json(out / name / "status.json") or {}
                print(f"  {status.get('state', 'failed'):7} {name}: "
                      f"{status.get('detail', 'see ' + str(out / name / 'coworld.log'))}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: running runs stop at their next safe point with a checkpoint; launch again to resume",
              file=sys.stderr)
        return 130
    if unfinished:
        print(f"{len(unfinished)} run(s) did not finish (see their coworld.log); the same command resumes them")
        return 1
    print(f"all runs finished: python experiments.py report {out}")
    return 0


def launch_slurm(grid, jobs, out, args):
    """Submit the jobs as one SLURM job array through submitit. Each array task is a CoworldJob: on submitit's
    signal before the time limit or a preemption it checkpoints the run and requeues itself (--requeue)."""
    try:
        executor = submitit.SlurmExecutor(folder=out / "submitit" / "%j", max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as error:  # no srun on this machine
        raise UsageError(f"--cluster slurm: {error} (on a machine without SLURM use --cluster local)") from None
    extra = dict(item.split("=", 1) for item in args.sbatch)
    parameters = dict(job_name=f"coworld-{grid.name}", time=math.ceil(args.timeout_min or 24 * 60),
                      gpus_per_node=1 if args.gpus_per_job is None else args.gpus_per_job or None,
                      cpus_per_task=args.cpus_per_job, signal_delay_s=args.signal_delay_s,
                      additional_parameters={"requeue": True, **extra})
    if args.partition:
        parameters["partition"] = args.partition
    if args.parallel:
        parameters["array_parallelism"] = args.parallel
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    submitted = executor.submit_array([CoworldJob(job.command, out / job.name, os.getcwd(), None, None,
                                                  args.signal_delay_s) for job in jobs])
    print(f"{grid.name}: submitted {len(submitted)} runs as SLURM job {submitted[0].job_id.split('_')[0]} "
          f"(logs in {out / 'submitit'}); when they are done: python experiments.py report {out}")
    return 0


def check_launch_args(args):
    if args.grid not in GRIDS:
        raise UsageError(f"unknown grid {args.grid!r}; the grids are: {', '.join(GRIDS)}")
    if args.cluster == "local" and (args.partition or args.gpus_per_job is not None or args.sbatch):
        raise UsageError("--partition, --gpus-per-job and --sbatch are for --cluster slurm")
    if args.parallel is not None and args.parallel < 1 or any(seed < 0 for seed in args.seeds):
        raise UsageError("--parallel must be at least 1 and --seeds not negative")
    if any("=" not in item for item in args.sbatch):
        raise UsageError("--sbatch takes KEY=VALUE, e.g. --sbatch account=abc")


def command_launch(args, common):
    """Check everything, record the runs (job.json), then run them locally or submit them to SLURM; finished and
    running runs are skipped, the others start or resume."""
    check_launch_args(args)
    grid = GRIDS[args.grid]
    if __name__ != "__main__":  # imported: pickle the jobs by value, so that they need no import of this file
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = Path(args.out or Path("experiments") / grid.name).absolute()
    datasets = str(Path(args.datasets).absolute()) if args.datasets else None
    entries = select_entries(grid, args.targets, args.methods)
    if datasets:
        missing = sorted({env_slug(e.target) for e in entries if not (Path(datasets) / env_slug(e.target)).is_dir()})
        if missing:
            raise UsageError(f"--datasets {datasets} has no folder {', '.join(missing)} (one dataset per target)")
    check_common_flags(common, entries, args.seeds)
    check_launch_record(out, grid, common, datasets, args.dry_run)
    jobs = plan_jobs(entries, args.seeds, out, common, datasets)
    counts = {action: sum(job.action == action for job in jobs)
              for action in ("start", "resume", "finished", "running")}
    print(f"{grid.name} ({grid.cite}): {len(jobs)} runs in {out}: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
    if args.dry_run:
        for job in jobs:
            print(f"{job.action:8} {job.name}\n         {shlex.join(job.command)}")
        return 0
    todo = [job for job in jobs if job.action in ("start", "resume")]
    for job in todo:
        write_job_record(out / job.name, grid, job.entry, job.seed, job.command)
    if not todo:
        print("nothing to run")
        return 0
    args.parallel = args.parallel or (1 if args.cluster == "local" else None)
    return (launch_local if args.cluster == "local" else launch_slurm)(grid, todo, out, args)


# =============================================================================================
# 4. Report
# =============================================================================================

BOOTSTRAP_REPS = 2000  # rliable's resamples per confidence interval
CONFIDENCE = 0.95


def run_state(folder, results, status):
    """finished | failed | in progress | not started, and a line that says what to do."""
    status = status or {}
    if results is not None:
        return "finished", ""
    if lock_held(folder):
        return "in progress", f"running on {status.get('host', '?')} (job {status.get('job_id')})"
    if status.get("state") == "failed":
        return "failed", f"{status.get('detail', '')}; see coworld.log"
    if (folder / "checkpoint.pt").exists():
        if status.get("state") == "requeued":
            return "in progress", "requeued after a time limit or preemption: its requeued job resumes it"
        why = {"interrupted": "stopped at a checkpoint", "running": "no job holds it (killed?)"}.get(
            status.get("state"), "checkpoint written")
        return "in progress", f"{why}; launching the grid again resumes it"
    return "not started", "queued or not launched yet"


def load_runs(folder):
    """Every run folder under `folder` (one with a job.json): its settings, results, status and evaluation lines."""
    runs = []
    for path in sorted(Path(folder).iterdir()):
        job = read_json(path / "job.json") if path.is_dir() else None
        if job is None:
            continue
        results, status = read_json(path / "results.json"), read_json(path / "status.json")
        evals = []
        if (path / "metrics.jsonl").exists():
            for number, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
                record = parse_json(line, path / "metrics.jsonl", number)
                if "eval/return_mean" in record:
                    evals.append(record)
        state, detail = run_state(path, results, status)
        runs.append({"name": path.name, "job": job, "results": results, "config": read_json(path / "config.json"),
                     "evals": evals, "state": state, "detail": detail})
    return runs


def grid_cells(grid, runs):
    """{(row, target): runs} for the grid's cells that have run folders, and the rows and targets shown, in the
    paper's order."""
    by_key = defaultdict(list)
    for run in runs:
        by_key[job_key(run["job"])].append(run)
    cells = {}
    for entry in grid.entries:
        if by_key.get(entry_key(entry)):
            cells[(entry.row, entry.target)] = sorted(by_key[entry_key(entry)], key=lambda run: run["job"]["seed"])
    rows = list(dict.fromkeys(row for row, _ in cells))
    targets = [target for target in grid.columns if any(target == t for _, t in cells)]
    return cells, rows, targets


def done_runs(runs):
    return [run for run in runs if run["results"] is not None]


def mean_std(values):
    """The paper's statistic: mean and standard deviation over seeds (numpy's population std, ddof=0)."""
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}


def returns_of(runs):
    return {run["job"]["seed"]: run["results"]["eval"]["return_mean"] for run in done_runs(runs)}


def score_matrix(cells, row, targets):
    """rliable's (seeds, tasks) array for one row: the seeds finished on every target; None if there are none."""
    per_target = [returns_of(cells.get((row, target), [])) for target in targets]
    seeds = sorted(set.intersection(*(set(scores) for scores in per_target)))
    return np.array([[scores[seed] for scores in per_target] for seed in seeds]) if seeds else None


def probability_of_improvement(scores_x, scores_y):
    """rliable's metrics.probability_of_improvement: P(X_m > Y_m) + P(X_m = Y_m) / 2 over all pairs of runs (the
    Mann-Whitney U statistic over n_x * n_y), averaged over the tasks m. rliable gets U from scipy's mannwhitneyu,
    which also computes a p-value it discards: ~6 ms a resample, a minute for Table 2. This is the same number from
    one comparison of arrays (the tests compare the two). scores_*: (runs, tasks)."""
    x, y = scores_x[:, None, :], scores_y[None, :, :]
    return float(np.mean((x > y).mean(axis=(0, 1)) + 0.5 * (x == y).mean(axis=(0, 1))))


def interval_estimates(scores, baseline, reps=BOOTSTRAP_REPS, seed=0):
    """The interquartile mean and the probability of improvement over `baseline`, each with a 95% stratified-
    bootstrap confidence interval: rliable (Agarwal et al., 2021). scores: {row: array (seeds, tasks)}. rliable
    resamples with numpy's global generator, which is seeded here so that the same runs give the same report."""
    from rliable import library as rly
    from rliable import metrics

    np.random.seed(seed)
    iqm, iqm_ci = rly.get_interval_estimates(scores, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps,
                                             confidence_interval_size=CONFIDENCE)
    out = {row: {"iqm": float(iqm[row][0]), "iqm_ci": [float(iqm_ci[row][0][0]), float(iqm_ci[row][1][0])],
                 "seeds": int(scores[row].shape[0]), "tasks": int(scores[row].shape[1])} for row in scores}
    pairs = {row: (s, scores[baseline]) for row, s in scores.items() if baseline in scores and row != baseline}
    if pairs:
        poi, poi_ci = rly.get_interval_estimates(pairs, probability_of_improvement, reps=reps,
                                                 confidence_interval_size=CONFIDENCE)
        for row in pairs:
            out[row].update(poi=float(poi[row]), poi_ci=[float(v) for v in np.ravel(poi_ci[row])])
    return out


def curve(runs):
    """Learning curve: mean and 95% t-interval over seeds of eval/return_mean at each logged step, over the runs
    that have reached it (a run in progress adds its points so far)."""
    from scipy import stats

    by_step = defaultdict(list)
    for run in runs:
        for line in run["evals"]:
            by_step[line["step"]].append(line["eval/return_mean"])
    points = {"step": sorted(by_step), "mean": [], "low": [], "high": [], "n": []}
    for step in points["step"]:
        values = np.asarray(by_step[step], float)
        n, mean = len(values), float(values.mean())
        half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        for key, value in (("mean", mean), ("low", mean - half), ("high", mean + half), ("n", n)):
            points[key].append(value)
    return points


def selection(cells, targets):
    """Table 6: per multi-source target, each candidate's share of the target updates that selected it (App. C's
    one-hot choice, results.json's source_selected summed over seeds), the most selected and the paper's."""
    out = {}
    for (row, target), runs in cells.items():
        counts = defaultdict(float)
        for run in done_runs(runs):
            for source, count in run["results"].get("source_selected", {}).items():
                counts[source] += count
        if counts:
            total = sum(counts.values()) or 1.0
            out[target] = {"row": row, "share": {source: count / total for source, count in counts.items()},
                           "selected": max(counts, key=counts.get), "paper": TABLE6_PAPER.get(target)}
    return {target: out[target] for target in targets if target in out}


def value_estimates(cells, rows, targets):
    """Figure 5(b): the critic's value estimate and the true discounted return, mean and std over seeds."""
    out = {}
    for target in targets:
        for row in rows:
            evals = [run["results"]["eval"] for run in done_runs(cells.get((row, target), []))
                     if "value_estimate" in run["results"]["eval"]]
            if evals:
                out.setdefault(target, {})[row] = {key: mean_std([e[key] for e in evals])
                                                   for key in ("value_estimate", "true_value")}
    return out


def sensitivity(grid, cells, target):
    """Figure 6: the return against each varied hyperparameter, Table 7's value being the plain CoWorld run; each
    point's value is read from its runs' config.json."""
    out = {}
    for name in FIGURE6_VALUES:
        rows = ["coworld"] + [e.row for e in grid.entries if e.flags[:1] == (f"--{name}",)]
        points = []
        for row in rows:
            runs = done_runs(cells.get((row, target), []))
            if runs:
                points.append({"value": float(runs[0]["config"][name]), **mean_std(list(returns_of(runs).values()))})
        out[name] = sorted(points, key=lambda point: point["value"])
    return out


def grid_numbers(grid, runs):
    """Every number of one grid's section: returns per cell, aggregates per suite, learning curves, source
    selection, and Figure 5(b)'s values or Figure 6's sensitivity where the grid is that figure."""
    cells, rows, targets = grid_cells(grid, runs)
    if not cells:
        return cells, rows, targets, {}
    returns = {row: {t: mean_std(list(s.values())) if (s := returns_of(cells.get((row, t), []))) else None
                     for t in targets} for row in rows}
    aggregate = {}
    for family in dict.fromkeys(t.split(":", 1)[0] for t in targets):  # raw returns differ in scale across suites
        tasks = [t for t in targets if t.startswith(family + ":")]
        scores = {row: m for row in rows if (m := score_matrix(cells, row, tasks)) is not None}
        aggregate[family] = {"tasks": len(tasks), "rows": interval_estimates(scores, BASELINE) if scores else {}}
    data = {"returns": returns, "aggregate": aggregate, "selection": selection(cells, targets),
            "curves": {t: {row: curve(cells[(row, t)]) for row in rows if (row, t) in cells} for t in targets}}
    if "values" in grid.figures:
        data["values"] = value_estimates(cells, rows, targets)
    if "sensitivity" in grid.figures:
        data["sensitivity"] = sensitivity(grid, cells, targets[0])
    return cells, rows, targets, data


def fmt(x):
    """Four significant digits, never in exponent form: 3967, 435.2, 0.01484."""
    if x == 0 or not math.isfinite(x):
        return f"{x:.0f}"
    return f"{x:.{max(0, 3 - math.floor(math.log10(abs(x))))}f}"


def markdown_row(cells):
    return "| " + " | ".join(cells) + " |"


def cell_text(stats, launched):
    if stats is None:
        return f"— (0/{launched})"
    text = f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"
    return text if stats["n"] == launched else f"{text} ({stats['n']}/{launched})"


def returns_table(grid, cells, rows, targets, returns):
    """The paper's layout: rows methods, columns tasks, mean ± std over seeds, and the mean over the tasks (AVG.)
    where there are several; the paper's own row, where it prints one, under ours."""
    average = len(targets) > 1
    lines = [markdown_row(["", *(grid.columns[t] for t in targets), *(["AVG."] if average else [])]),
             "|---|" + "---:|" * (len(targets) + average)]
    for row in rows:
        stats = [returns[row][t] for t in targets]
        mean = fmt(float(np.mean([s["mean"] for s in stats]))) if all(stats) else "—"
        texts = [cell_text(s, len(cells.get((row, t), []))) for s, t in zip(stats, targets)]
        lines.append(markdown_row([row_name(row), *texts, *([mean] if average else [])]))
        paper = [(grid.reference or {}).get(row, {}).get(t) for t in targets]
        if any(paper):
            mean = f"*{fmt(float(np.mean([p[0] for p in paper])))}*" if all(paper) else "—"
            texts = [f"*{p[0]} ± {p[1]}*" if p else "—" for p in paper]
            lines.append(markdown_row([f"*{row_name(row)} (paper)*", *texts, *([mean] if average else [])]))
    return lines


def aggregate_tables(aggregate, rows):
    lines = []
    for family, block in aggregate.items():
        lines += [f"Aggregate over the {block['tasks']} {family} task(s), raw returns (rliable; 95% stratified-"
                  f"bootstrap CIs, {BOOTSTRAP_REPS} resamples):", "",
                  markdown_row(["", "IQM [95% CI]", f"P(better than {row_name(BASELINE)}) [95% CI]", "seeds x tasks"]),
                  "|---|---|---|---|"]
        for row in rows:
            s = block["rows"].get(row)
            if s is None:
                lines.append(markdown_row([row_name(row), "— (a task without a finished run)", "", ""]))
                continue
            poi = f"{s['poi']:.2f} [{s['poi_ci'][0]:.2f}, {s['poi_ci'][1]:.2f}]" if "poi" in s else "—"
            iqm = f"{fmt(s['iqm'])} [{fmt(s['iqm_ci'][0])}, {fmt(s['iqm_ci'][1])}]"
            lines.append(markdown_row([row_name(row), iqm, poi, f"{s['seeds']} x {s['tasks']}"]))
        lines.append("")
    return lines


def task_name(env):
    return env.split(":", 1)[1]


def selection_table(selection):
    lines = ["Source selection (App. C; each candidate's share of the target updates, all seeds):", "",
             "| target | selected most | shares | paper (Table 6) |", "|---|---|---|---|"]
    for target, s in selection.items():
        shares = ", ".join(f"{task_name(source)} {share:.0%}"
                           for source, share in sorted(s["share"].items(), key=lambda item: -item[1]))
        paper = (task_name(s["paper"]) + (" (same)" if s["paper"] == s["selected"] else "")) if s["paper"] else "—"
        lines.append(markdown_row([task_name(target), task_name(s["selected"]), shares, paper]))
    return lines + [""]


def values_table(grid, values):
    lines = ["| | value estimate | true value |", "|---|---:|---:|"]
    for target, by_row in values.items():
        for row, v in by_row.items():
            lines.append(markdown_row([f"{row_name(row)} ({grid.columns[target]})",
                                       *(f"{fmt(v[key]['mean'])} ± {fmt(v[key]['std'])}"
                                         for key in ("value_estimate", "true_value"))]))
    return lines + [""]


def plot_curves(grid, curves, rows, targets, path):
    import matplotlib.pyplot as plt

    cols = min(3, len(targets))
    lines = math.ceil(len(targets) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.2 * lines), squeeze=False)
    for ax, target in zip(axes.flat, targets):
        for row in rows:
            points = curves[target].get(row)
            if points and points["step"]:
                ax.plot(points["step"], points["mean"], marker="o", markersize=3, label=row_name(row))
                ax.fill_between(points["step"], points["low"], points["high"], alpha=0.2)
        ax.set_title(grid.columns[target], fontsize=9)
        ax.set_xlabel("target updates", fontsize=8)
        ax.set_ylabel("evaluation return", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels) or 1), fontsize=7)
    fig.suptitle(f"{grid.name}: mean and 95% CI over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    save_figure(fig, path)
    plt.close(fig)


def plot_values(grid, values, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 3.4), squeeze=False)
    for ax, (target, by_row) in zip(axes.flat, values.items()):
        x = np.arange(len(by_row))
        for offset, key, label in ((-0.2, "value_estimate", "value estimate"), (0.2, "true_value", "true value")):
            ax.bar(x + offset, [v[key]["mean"] for v in by_row.values()], 0.4, label=label, capsize=3,
                   yerr=[v[key]["std"] for v in by_row.values()])
        ax.set_xticks(x, [row_name(row) for row in by_row], fontsize=7, rotation=15)
        ax.set_title(grid.columns[target], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_sensitivity(points, finetune, path):
    import matplotlib.pyplot as plt

    paper = FIGURE6_PAPER["dv2-finetune"][mw("button-press")][0]
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.2), squeeze=False)
    for ax, (name, series) in zip(axes.flat, points.items()):
        if series:
            ax.errorbar([p["value"] for p in series], [p["mean"] for p in series], [p["std"] for p in series],
                        marker="o", capsize=3, label="CoWorld")
        if finetune:
            ax.axhline(finetune["mean"], linestyle="--", color="gray", label="DV2 Finetune")
        ax.axhline(paper, linestyle=":", color="gray", label="DV2 Finetune (paper)")
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("evaluation return", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def grid_section(grid, runs, folder):
    """One grid's section of the report (markdown lines) and its numbers; writes its figures."""
    cells, rows, targets, data = grid_numbers(grid, runs)
    if not cells:  # its cells changed since the launch
        return [f"## {grid.name}: none of its runs are in this folder", ""], data
    figure = folder / "figures" / grid.name
    lines = [f"## {grid.name}: {grid.title} ({grid.cite})", "",
             "Evaluation return (`results.json` eval.return_mean), mean ± std over seeds; (k/n): k of the n launched "
             "seeds finished; the paper's numbers in italics.", "",
             *returns_table(grid, cells, rows, targets, data["returns"]), "",
             *aggregate_tables(data["aggregate"], rows)]
    if any(points["step"] for by_row in data["curves"].values() for points in by_row.values()):
        plot_curves(grid, data["curves"], rows, targets, Path(f"{figure}-curves.png"))
        lines += [f"![{grid.name} learning curves](figures/{grid.name}-curves.png)", ""]
    if data["selection"]:
        lines += selection_table(data["selection"])
    if data.get("values"):
        plot_values(grid, data["values"], Path(f"{figure}-values.png"))
        lines += [*values_table(grid, data["values"]),
                  f"![{grid.name} value estimates](figures/{grid.name}-values.png)", ""]
    if "sensitivity" in data:
        plot_sensitivity(data["sensitivity"], data["returns"].get("dv2-finetune", {}).get(targets[0]),
                         Path(f"{figure}-sensitivity.png"))
        lines += [f"![{grid.name} sensitivity](figures/{grid.name}-sensitivity.png)", ""]
    return lines, data


def command_report(args):
    """report.md, report.json and figures/*.png for every grid launched into the folder, and the runs not finished."""
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    runs = load_runs(folder)
    if not runs:
        raise UsageError(f"{folder} holds no runs (folders with a job.json, which `experiments.py launch` writes)")
    import matplotlib
    matplotlib.use("Agg")
    (folder / "figures").mkdir(exist_ok=True)
    states = defaultdict(int)
    for run in runs:
        states[run["state"]] += 1
    counts = f"{len(runs)} runs: " + ", ".join(f"{n} {state}" for state, n in states.items())
    lines = [f"# Report of {folder}", "", f"{counts}. Written by `python experiments.py report {args.folder}`.", ""]
    data = {"runs": {run["name"]: {"state": run["state"], "detail": run["detail"]} for run in runs}, "grids": {}}
    launched = {name for run in runs for name in run["job"]["grids"]}
    for grid in (grid for name, grid in GRIDS.items() if name in launched):
        section, data["grids"][grid.name] = grid_section(grid, runs, folder)
        lines += section
    unfinished = [run for run in runs if run["state"] != "finished"]
    if unfinished:
        lines += ["## Runs not finished", "", "| run | state | |", "|---|---|---|",
                  *(markdown_row([run["name"], run["state"], run["detail"]]) for run in unfinished), ""]
    write_file(folder / "report.md", lambda file: file.write("\n".join(lines).encode()))
    write_json(folder / "report.json", data)
    print(f"wrote {folder / 'report.md'} ({counts})")
    return 0


# =============================================================================================
# 5. Command line
# =============================================================================================

class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --seed is not --seeds

    def error(self, message):
        raise UsageError(message)


def build_parser():
    parser = _Parser(prog="experiments.py", description="The paper's experiment grids: launch them, then report them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    launch = commands.add_parser("launch", help="launch a grid's runs (flags after -- go to every coworld.py run)")
    launch.add_argument("grid", help=f"one of: {', '.join(GRIDS)}")
    launch.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2, as the paper)")
    launch.add_argument("--targets", nargs="+", help="only these targets (environment names)")
    launch.add_argument("--methods", nargs="+", help="only these rows (e.g. coworld offline-dv2)")
    launch.add_argument("--out", help="the grid's folder (default: experiments/<grid>); grids launched into the same "
                                      "folder share the runs they have in common")
    launch.add_argument("--datasets", help="a folder with one offline dataset per target, named like "
                                           "metaworld-door-close (as `coworld.py online --stop-return` names the "
                                           "folders under <logdir>/replay/)")
    launch.add_argument("--cluster", choices=("local", "slurm"), default="local")
    launch.add_argument("--parallel", type=int, help="runs at a time (local: default 1, each with its share of the CPU "
                                                     "threads; slurm: array tasks at a time, default no limit)")
    launch.add_argument("--partition", help="slurm partition")
    launch.add_argument("--gpus-per-job", type=int, help="slurm GPUs per run (default 1)")
    launch.add_argument("--cpus-per-job", type=int, default=8, help="slurm CPUs per run (default 8)")
    launch.add_argument("--timeout-min", type=float, help="time limit of a job, after which it is checkpointed and "
                                                          "requeued (slurm default: 1440; local: none)")
    launch.add_argument("--signal-delay-s", type=int, default=SIGNAL_DELAY_S,
                        help=f"how long before the time limit a run is told to checkpoint (default {SIGNAL_DELAY_S})")
    launch.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                        help="another sbatch option, e.g. --sbatch account=abc (repeatable)")
    launch.add_argument("--dry-run", action="store_true", help="print the runs and their commands, change nothing")
    report = commands.add_parser("report", help="write DIR/report.md, DIR/report.json and DIR/figures/")
    report.add_argument("folder", metavar="DIR", help="a grid's folder")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(argv)
        return command_launch(args, common) if args.command == "launch" else command_report(args)
    except UsageError as error:
        print(f"experiments.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
