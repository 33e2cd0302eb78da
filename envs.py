"""Simulators and offline data on disk for CoWorld.

Three simulator families behind one interface (`make_env("family:task")`):

* ``metaworld:<task>``  Meta-World v3, camera ``corner``, 4-d actions, 500 steps.
* ``robodesk:<task>``   RoboDesk 1.0.0, 5-d actions, dense reward, 500 steps.
* ``dmc:<domain>_<task>`` DeepMind Control Suite, action repeat 2, 500 agent
  steps, plus the paper's modified tasks (walker/cheetah uphill, downhill,
  walker_nofoot, cheetah_nopaw).

Every environment returns 64x64 RGB images and the DreamerV2 flags
(``is_first``, ``is_last``, ``is_terminal``). Offline data is stored one episode
per ``.npz`` file in the DreamerV2 / V-D4RL layout; `load_dataset` validates
every file and `Replay` samples fixed-length windows from the episodes.

Command line::

    python envs.py collect --env metaworld:window-close --policy scripted --episodes 50 --out DIR
    python envs.py expert --env robodesk:push_green --episodes 20 --render fast
    python envs.py bench --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import datetime
import errno
import fcntl
import functools
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from typing import Callable

import numpy as np


def _nvidia_gpu_present() -> bool:
    """True when an NVIDIA GPU is visible (device node or a working nvidia-smi)."""
    if os.path.exists("/dev/nvidia0"):
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# MuJoCo and dm_control pick their OpenGL backend when they are first imported,
# so this must run before any simulator import. EGL needs a GPU; OSMesa renders
# on the CPU anywhere. An explicit MUJOCO_GL from the user wins.
os.environ.setdefault("MUJOCO_GL", "egl" if _nvidia_gpu_present() else "osmesa")
if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

FAMILIES = ("metaworld", "robodesk", "dmc")
RENDERS = ("default", "fast")
IMAGE_SIZE = 64
EPISODE_KEYS = ("image", "action", "reward", "discount", "is_first", "is_last", "is_terminal")
FLAG_KEYS = ("is_first", "is_last", "is_terminal", "success")
DATASET_INFO = "dataset.json"
MAX_REWARD = 1e4  # per step; the benchmarks give at most 10 (Meta-World), and squares of 1e19 overflow float32
BENCH_ENVS = ("metaworld:window-close", "robodesk:open_slide", "dmc:walker_walk", "dmc:walker_uphill")

# Debian packages that provide each OpenGL backend, for error messages.
_GL_PACKAGES = {"osmesa": "libosmesa6", "egl": "libegl1", "glfw": "libglfw3"}
# In every GL loader's ImportError (PyOpenGL, mujoco, glfw); not in a C library's version (GLIBC, GLIBCXX).
_GL_WORDS = re.compile(r"GL(?!IBC)|[Mm]esa|\begl\b|glfw")


class EnvError(ValueError):
    """A bad environment name or setting, or an OpenGL library that cannot be loaded."""


class DatasetError(ValueError):
    """An offline dataset that is missing or malformed; the message names the file."""


def error_message(error: Exception) -> str:
    """One line for the user: an OSError with a file (unwritable folder, full disk, unreadable file, ...) names
    the file and the reason, whether it was being read or written."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return str(error)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _gl_errors():
    """Turn a failure to load OpenGL into an EnvError naming the Debian package.

    Missing GL libraries surface as ImportError, OSError, AttributeError or
    RuntimeError from deep inside PyOpenGL, or as mujoco.FatalError when a
    renderer is made; none of them says what to install. A missing Python
    package (ModuleNotFoundError) and an ImportError that names no GL library
    (a package version mismatch) are reported as such, with the pip command.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        raise EnvError(f"the Python package {exc.name} is not installed; the tested versions are in "
                       f"requirements.txt: pip install -r requirements.txt") from exc
    except (ImportError, OSError, AttributeError, RuntimeError,
            getattr(sys.modules.get("mujoco"), "FatalError", RuntimeError)) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, ImportError) and not _GL_WORDS.search(str(exc)):
            raise EnvError(f"cannot import {exc.name or 'a simulator package'} ({reason}); the tested versions are "
                           f"in requirements.txt: pip install -r requirements.txt") from exc
        backend = os.environ.get("MUJOCO_GL", "")
        package = _GL_PACKAGES.get(backend)
        fix = (f"install the Debian package {package}: apt-get install -y {package}" if package
               else "set MUJOCO_GL=osmesa (CPU) or MUJOCO_GL=egl (NVIDIA GPU)")
        if backend == "egl" and ctypes.util.find_library("EGL"):
            fix = ("libEGL is installed, so the NVIDIA driver's EGL library is missing or cannot open the GPU (in a "
                   "container, NVIDIA_DRIVER_CAPABILITIES must include graphics); MUJOCO_GL=osmesa renders on the CPU")
        if backend == "glfw":
            fix += "; glfw also needs a display (DISPLAY): without one, use osmesa or egl"
        raise EnvError(f"cannot load OpenGL for MUJOCO_GL={backend} ({reason}); {fix}") from exc


def _mujoco():
    """The mujoco module. Importing it loads the OpenGL backend named by MUJOCO_GL."""
    with _gl_errors():
        import mujoco
    return mujoco


class _Camera:
    """One persistent offscreen renderer for one environment.

    Creating a renderer per frame is slow, and replacing one without closing it
    corrupts later images, so each environment keeps one and closes it in close().
    ``fast`` turns off shadows, reflections and multisampling: several times
    faster on CPUs but a different look, which is why it is an explicit setting.
    """

    def __init__(self, model, data, size: int, camera, fast: bool, finish: Callable | None = None):
        mujoco = _mujoco()
        if fast:
            model.vis.quality.offsamples = 0  # read when the GL context is created
        with _gl_errors():
            self._renderer = mujoco.Renderer(model, size, size)
        if fast:
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._data, self._camera, self._finish = data, camera, finish

    def render(self) -> np.ndarray:
        """The current frame as a fresh uint8 (H, W, 3) array."""
        self._renderer.update_scene(self._data, camera=self._camera)
        image = self._renderer.render()
        return self._finish(image) if self._finish else image

    def close(self) -> None:
        self._renderer.close()


# ---------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------


class Env:
    """One simulator task behind the interface the agent uses.

    Observations are dicts: ``image`` uint8 (64, 64, 3), ``reward`` float (summed
    over the action repeat, 0.0 at reset), ``is_first``, ``is_last``,
    ``is_terminal`` bools, and ``success`` (bool) where ``has_success``. Hitting
    ``max_steps`` ends the episode with is_last=True, is_terminal=False.
    Subclasses implement the four ``_..._sim`` / ``_success`` hooks.
    """

    has_success = False

    def __init__(self, name: str, action_size: int, action_repeat: int, max_steps: int, render: str, camera: _Camera):
        self.name = name
        self.action_size = action_size
        self.action_repeat = action_repeat
        self.max_steps = max_steps
        self.render = render
        self._camera = camera
        self._steps = 0
        self._done = True  # step() before reset() is an error

    def reset(self, seed: int | None = None) -> dict:
        """Start a new episode and return its first observation; with ``seed``, first reseed the task's random
        initial state, so that the episode's start depends on that seed alone."""
        if seed is not None:
            self._reseed(seed)
        self._reset_sim()
        self._steps = 0
        return self._observe(0.0, is_first=True, is_terminal=False)

    def step(self, action: np.ndarray) -> dict:
        """Apply ``action`` (clipped to [-1, 1]) for ``action_repeat`` simulator steps."""
        if self._done:
            raise RuntimeError(f"{self.name}: the episode is over (or never started); call reset()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_size,):
            raise ValueError(f"{self.name}: action has shape {action.shape}, expected ({self.action_size},)")
        if not np.isfinite(action).all():  # np.clip keeps NaN, which the simulators reject or propagate
            raise ValueError(f"{self.name}: action {action.tolist()} is not finite")
        action = np.clip(action, -1.0, 1.0)
        reward, terminal = 0.0, False
        for _ in range(self.action_repeat):
            step_reward, terminal = self._step_sim(action)
            reward += step_reward
            if terminal:
                break
        self._steps += 1
        return self._observe(reward, is_first=False, is_terminal=terminal)

    def close(self) -> None:
        """Release the renderer and the simulator (safe to call twice)."""
        if self._camera is not None:
            self._camera.close()
            self._camera = None
            self._free_sim()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _observe(self, reward: float, is_first: bool, is_terminal: bool) -> dict:
        is_last = is_terminal or self._steps >= self.max_steps
        self._done = is_last
        obs = {
            "image": self._camera.render(),
            "reward": float(reward),
            "is_first": is_first,
            "is_last": is_last,
            "is_terminal": is_terminal,
        }
        if self.has_success:
            obs["success"] = self._success()
        return obs

    def _reseed(self, seed: int) -> None:
        raise NotImplementedError

    def _reset_sim(self) -> None:
        raise NotImplementedError

    def _step_sim(self, action: np.ndarray) -> tuple[float, bool]:
        """One simulator step: (reward, reached a true terminal state)."""
        raise NotImplementedError

    def _success(self) -> bool:
        raise NotImplementedError

    def _free_sim(self) -> None:
        pass

    def _open_camera(self, *args, **kwargs) -> _Camera:
        """A _Camera on this environment's simulator (the arguments of _Camera). If it cannot be made, the
        simulator is freed before the error goes on: a caller that handles the error (a test, a notebook)
        keeps no half-built environment, whose physics dm_control can deadlock on tearing down."""
        try:
            return _Camera(*args, **kwargs)
        except BaseException:
            self._free_sim()
            raise


class MetaWorldEnv(Env):
    """Meta-World v3 with the goal-observable class and a new goal every reset."""

    has_success = True

    def __init__(self, task: str, seed: int, render: str, max_steps: int | None):
        with _gl_errors():
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
            from metaworld.policies import ENV_POLICY_MAP
        # seed= seeds the env's own generator (env.seed); reset(seed=) is ignored in v3.
        self._sim = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-v3-goal-observable"](seed=seed)
        self._sim._freeze_rand_vec = False  # new object/goal position at every reset...
        self._sim.seeded_rand_vec = True  # ...drawn from the seeded generator
        self._sim.max_path_length = max_steps or self._sim.max_path_length
        self._policy = ENV_POLICY_MAP[f"{task}-v3"]()
        self._state = None
        self._last_success = False
        # The renderer's corner view comes out upside down: rotate 180 degrees.
        camera = self._open_camera(self._sim.model, self._sim.data, IMAGE_SIZE, "corner", render == "fast",
                                   finish=lambda image: np.ascontiguousarray(image[::-1, ::-1]))
        super().__init__(f"metaworld:{task}", 4, 1, self._sim.max_path_length, render, camera)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action (metaworld.policies) for the current state."""
        with warnings.catch_warnings():  # "Constant(s) may be too high": we clip, as the env would
            warnings.simplefilter("ignore", UserWarning)
            return np.clip(self._policy.get_action(self._state), -1.0, 1.0)

    def _reseed(self, seed):
        self._sim.seed(seed)

    def _reset_sim(self):
        self._state, _ = self._sim.reset()
        self._last_success = False

    def _step_sim(self, action):
        self._state, reward, _, _, info = self._sim.step(action)
        self._last_success = bool(info["success"])
        return float(reward), False  # Meta-World only truncates, it never terminates

    def _success(self):
        return self._last_success


_ROBODESK_CROP = (16.75, 25.0, 105.0, 88.75)  # RoboDesk.render(): 120x120 frame, cropped, resized to 64


def _import_robodesk():
    """Import robodesk 1.0.0 with the shims it needs on current Pillow and gym."""
    import PIL.Image

    if not hasattr(PIL.Image, "ANTIALIAS"):  # removed in Pillow 10; robodesk's render uses it
        PIL.Image.ANTIALIAS = PIL.Image.LANCZOS
    # robodesk imports the old gym, which prints a migration notice users cannot act on.
    with _gl_errors(), contextlib.redirect_stderr(io.StringIO()):
        import robodesk
    return robodesk


def _robodesk_finish(image: np.ndarray) -> np.ndarray:
    """Crop and resize exactly as RoboDesk.render() does (bit-identical images)."""
    import PIL.Image

    image = PIL.Image.fromarray(image).crop(box=_ROBODESK_CROP)
    return np.array(image.resize((IMAGE_SIZE, IMAGE_SIZE), resample=PIL.Image.LANCZOS))


def _free_robodesk(sim) -> None:
    """Free a RoboDesk's physics. dm_control's GL context teardown can deadlock
    when a RoboDesk that ever rendered is garbage collected; freeing avoids it."""
    sim.physics.free()
    sim.physics_copy.free()


@contextlib.contextmanager
def _global_numpy_rng(state: np.random.RandomState):
    """Run code that draws from np.random using ``state``'s stream instead.

    RoboDesk's reset draws from the global numpy generator. Swapping our own
    stream in (and the caller's back out) keeps several environments, and the
    caller's own use of np.random, independent of each other.
    """
    saved = np.random.get_state()
    np.random.set_state(state.get_state())
    try:
        yield
    finally:
        state.set_state(np.random.get_state())
        np.random.set_state(saved)


# ---------------------------------------------------------------------------
# RoboDesk scripted experts
# ---------------------------------------------------------------------------
#
# RoboDesk has no scripted policies of its own. These act on the simulator's
# state (end-effector site, handles, buttons, blocks), never on pixels, so the
# render setting cannot change what they do. How the 5-d action moves the arm
# (robodesk.py, RoboDesk._convert_action): a[0:3] puts an inverse-kinematics
# target a[0:3] * 1 cm from where the end effector is, a[3] turns the wrist
# (joint 7) by up to 0.059 rad, a[4] sets the finger opening (-1 closed, +1
# open). The joint servos lag that target, so the hand moves at most ~1.65 mm
# a step along each axis (~0.8 m in a 500-step episode), and ~0.5 mm a step when
# it drags the slide or the drawer (5 N of joint friction each; more while the
# wrist turns, which the open_slide expert uses). The inverse
# kinematics place the hand's position only: where the fingers point drifts
# with the path, so it is read from the simulator, never assumed.

# Geometry of RoboDesk 1.0.0's desk.xml, world frame, metres.
_DESK_TOP_Z = 0.76  # top of the desk's top plate (box centre z 0.735, half-height 0.025)
_DESK_FRONT_Y = 0.575  # front edge of that plate (desk at y 0.85, half-depth 0.275)
_DRAWER_BAR = np.array([0.0, -0.36, 0.01])  # the drawer handle's bar (a capsule along x), drawer frame
_DRAWER_WALL_Y = -0.24  # inner face of the drawer's front wall (box at y -0.25, half-thickness 0.01), drawer frame
_BUTTON_TOP = 0.03  # a button's top above its body (cylinder centre +0.02, half-height 0.01)
_FINGER_REACH = 0.05  # the fingertips lie 5 cm beyond the end-effector site along the fingers
_GRIP_STEPS = 8  # steps the open fingers take to close on a block
_LIFT = 0.10  # carry a block 10 cm above where it stood: clear of the flat block (3 cm) and the ball (8 cm)


def _hand_pointing(sim) -> np.ndarray:
    """Unit vector along the fingers (the end-effector site's z axis, which is also joint 7's axis)."""
    return sim.physics.named.data.site_xmat["end_effector"].reshape(3, 3)[:, 2].copy()


def _fingertips(sim) -> np.ndarray:
    return sim.physics.named.data.site_xpos["end_effector"] + _FINGER_REACH * _hand_pointing(sim)


def _half_size(sim, body: str) -> np.ndarray:
    """Half extents of a block (the one geom of ``body``; a ball's radius on every axis)."""
    model = sim.physics.model
    geom = model.body_geomadr[model.name2id(body, "body")]
    size = model.geom_size[geom].copy()
    return np.full(3, size[0]) if model.geom_type[geom] == _mujoco().mjtGeom.mjGEOM_SPHERE else size


def _toward(sim, target, gain: float = 2.0) -> np.ndarray:
    """a[0:3] that moves the end effector straight at ``target``: full speed until it is 1 cm / gain
    away, then proportionally. A hand below the desk top in front of the desk rises above the top
    before it goes over it, instead of running into its front edge."""
    ee = sim.physics.named.data.site_xpos["end_effector"]
    target = np.array(target, dtype=float)
    if ee[1] < _DESK_FRONT_Y and ee[2] < _DESK_TOP_Z + 0.03 and target[1] > _DESK_FRONT_Y:
        target[1] = _DESK_FRONT_Y - 0.08  # the fingertips reach up to 5 cm further forward
        target[2] = max(target[2], _DESK_TOP_Z + 0.06)
    return np.clip((target - ee) / sim.end_effector_scale * gain, -1.0, 1.0)


def _wrist_toward(sim, vertical: bool) -> float:
    """a[3] that turns the wrist until the fingers open horizontally (side by side: a hand that is
    thin from above) or, with vertical=True, as vertically as the hand's pointing allows (stacked:
    a hand that is thin from the side)."""
    pointing = _hand_pointing(sim)
    opening = sim.physics.named.data.xmat["panda0_leftfinger"].reshape(3, 3)[:, 1]  # the finger joint's axis
    turning = np.cross(pointing, opening)  # where the opening axis goes as the wrist turns
    turn = np.arctan2(turning[2], opening[2]) if vertical else np.arctan2(-opening[2], turning[2])
    turn = (turn + np.pi / 2) % np.pi - np.pi / 2  # the two fingers are alike: the nearer of two turns
    low, high = sim.physics.model.jnt_range[6]
    if not low <= sim.physics.data.qpos[6] + turn <= high:
        turn -= np.sign(turn) * np.pi
    return float(np.clip(turn / (sim.wrist_scale * sim.joint_bounds[6][1]), -1.0, 1.0))


def _along_fingers(sim, goal: np.ndarray, back: float = 0.13, rate: float = 3.0) -> np.ndarray:
    """A target that brings the hand to ``goal`` along its own fingers: ``back`` behind the goal on
    the fingers' line while the hand is off that line, closing in as the sideways error shrinks, so
    open fingers arrive either side of a block instead of knocking it over (0.13 m: the fingertips
    reach 5 cm, a block is up to 5 cm wide)."""
    error = goal - sim.physics.named.data.site_xpos["end_effector"]
    pointing = _hand_pointing(sim)
    sideways = error - np.dot(error, pointing) * pointing
    return goal - min(back, rate * np.linalg.norm(sideways)) * pointing


def _action(xyz, wrist: float = 0.0, grip: float = 0.0) -> np.ndarray:
    return np.array([*xyz, wrist, grip])


def _robodesk_expert_names() -> str:
    return ", ".join(f"robodesk:{task}" for task in _ROBODESK_EXPERTS)


def _expert_push_button(color: str) -> Callable:
    """Over the button at a safe height, then down onto it with closed fingers and on through its
    5 mm of travel (success: its light's joint below -4.53 mm)."""

    def expert(sim, state: dict) -> np.ndarray:
        data = sim.physics.named.data
        ee, button = data.site_xpos["end_effector"], data.xpos[f"{color}_button"]
        top = button[2] + _BUTTON_TOP
        off_center = np.linalg.norm(ee[:2] - button[:2])
        if off_center < 0.015:  # over the button's middle (its radius: 3 cm)
            height = top - 0.03  # aim below the top: the lagging servo presses the button down
        elif off_center < 0.04:
            height = top + 0.02  # nearly over it: come down to just above it
        else:
            height = top + 0.08  # clear the other buttons and the ball on the way
        return _action(_toward(sim, [button[0], button[1], height]), _wrist_toward(sim, vertical=False), -1.0)

    return expert


def _expert_open_slide(sim, state: dict) -> np.ndarray:
    """To the left of the slide's handle (a vertical bar), passing in front of it when the hand
    starts to its right, then push it right (success: the slide joint beyond 0.55 of its 0.6 m).

    Pushing the slide moves the hand under 1 mm a step, so the 0.35-0.55 m that success needs takes
    longer than a 500-step episode: the expert opens the slide as far as the episode allows. It
    pushes 2 cm below the bar's middle while turning the wrist all the way (joint 7, which the
    inverse kinematics leave alone), which opens it further: the README's 20 episodes return 239.3
    on average, against 220.1 with the fingers held upright and the bar pushed at its middle."""
    data = sim.physics.named.data
    ee, handle = data.site_xpos["end_effector"], data.site_xpos["slide_handle"]
    beside = handle[0] - 0.045  # bar radius 1.4 cm + half a finger + a margin
    in_line = abs(ee[1] - handle[1]) < 0.015 and abs(ee[2] - handle[2]) < 0.03  # between the bar's two arms
    if ee[0] < handle[0] - 0.02 and in_line:  # against the bar: push
        return _action(_toward(sim, [ee[0] + 1.0, handle[1], handle[2] - 0.02]), 1.0, -1.0)
    if ee[0] < handle[0] - 0.03:
        target = [beside, handle[1], handle[2]]  # left of the bar: straight in
    else:  # right of it: diagonally (each axis at full speed) into a lane 9 cm in front (bar radius, the
        # fingertips' 5 cm, a margin), then left along it
        target = [beside, handle[1] - 0.09, handle[2]]
    return _action(_toward(sim, target), _wrist_toward(sim, vertical=True), -1.0)


def _expert_open_drawer(sim, state: dict) -> np.ndarray:
    """Hook the fingertips behind the handle's bar and pull; once the drawer's inside is out from
    under the desk top (or the bar stops coming), hook them behind the front wall from inside the
    drawer, 20 cm to the side, and pull on (success: the drawer joint below -0.2).

    The second hook exists because the bar cannot be pulled that close to the robot: the elbow
    reaches its joint limit, which the package's inverse kinematics ignore. The same limit can stop
    the hand on its way down to the bar from some starts, and pulling moves the hand ~0.45 mm a
    step, so most 500-step episodes end with the drawer part open. The action sets where the hand goes,
    not how it points (the package's inverse kinematics solve for position alone), so a hand that starts
    leaning away from the robot cannot be turned to reach the bar with the elbow bent less."""
    data = sim.physics.named.data
    ee, tips, drawer = data.site_xpos["end_effector"], _fingertips(sim), data.xpos["drawer"]
    opened = -float(data.qpos["drawer_joint"][0])
    if opened > state.get("opened", 0.0) + 1e-3:
        state["opened"], state["stalled"] = opened, 0
    if opened > 0.065 or state.get("stalled", 0) > 30:
        state["hook"] = "wall"  # 6.5 cm out: 3 cm of the inside clear of the desk top
    if state.get("hook") == "wall":
        surface = drawer + [0.2, _DRAWER_WALL_Y, 0.03]  # clear of the side wall (x 0.22), 1.5 cm below the top
    else:
        # the bar's back (radius 1.4 cm), 4.5 cm right of its middle: clear of the arms at x 0.082
        surface = drawer + _DRAWER_BAR + [0.045, 0.014, 0.0]
    hook = surface + [0.0, 0.02, 0.0]  # fingertips 2 cm behind the face they pull on
    hover = _DESK_TOP_Z - 0.03  # fingertips above the bar (top 0.68) and the drawer's walls (0.705)
    if abs(tips[0] - hook[0]) < 0.02 and tips[1] > surface[1] and tips[2] < hook[2] + 0.015:
        tip_target = [hook[0], tips[1] - 0.05, hook[2]]  # hooked: pull
        state["stalled"] = state.get("stalled", 0) + 1
    elif np.linalg.norm(tips[:2] - hook[:2]) < 0.015:
        tip_target = hook  # above the hook: down
    elif tips[2] > hover - 0.02:
        tip_target = [hook[0], hook[1], hover]  # over to the hook
    else:
        tip_target = [tips[0], tips[1], hover]  # up first
    return _action(_toward(sim, np.asarray(tip_target) - (tips - ee)), 0.0, -1.0)


def _expert_block_off_table(block: str) -> Callable:
    """Grasp the block from behind along the fingers, lift it above the other blocks, carry it over
    the desk's front edge and let go (success: the block below z 0.6, the other two not moved). The
    front edge, not the right one: at the blocks' depth the arm cannot reach past the right edge."""

    def expert(sim, state: dict) -> np.ndarray:
        data = sim.physics.named.data
        ee, center, size = data.site_xpos["end_effector"], data.xpos[block].copy(), _half_size(sim, block)
        if center[2] < _DESK_TOP_Z - 0.05:
            return _action([0.0, 0.0, 0.0], 0.0, 1.0)  # off the table: done, keep still
        grasp = center + [0.0, 0.0, size[2] - 0.05]  # the fingers' middle 5 cm below its top
        closed = state.get("closed", 0)
        if closed >= _GRIP_STEPS and np.linalg.norm(grasp - ee) > 0.04:
            closed = 0  # dropped or knocked away: grasp again
        if not closed and np.linalg.norm(grasp - ee) > 0.012:
            return _action(_toward(sim, _along_fingers(sim, grasp)), _wrist_toward(sim, vertical=False), 1.0)
        state["closed"] = closed + 1
        if state["closed"] < _GRIP_STEPS:
            return _action(_toward(sim, grasp), 0.0, -1.0)
        target = [ee[0], _DESK_FRONT_Y - 0.1, sim.original_pos[block][2] + (size[2] - 0.05) + _LIFT]
        for other in ("flat_block", "upright_block", "ball"):
            where, half = data.xpos[other], _half_size(sim, other)
            in_the_way = (other != block and center[1] > where[1]  # still behind it...
                          and abs(center[0] - where[0]) < size[0] + half[0] + 0.015  # ...in line with it...
                          and center[2] - size[2] < where[2] + half[2] + 0.015)  # ...and not above it yet
            if in_the_way:
                target[1] = max(target[1], where[1] + half[1] + size[1] + 0.015)
        over_edge = center[1] < _DESK_FRONT_Y - 0.01
        return _action(_toward(sim, target), 0.0, 1.0 if over_edge else -1.0)

    return expert


_ROBODESK_EXPERTS = {  # the paper's four RoboDesk targets
    "open_slide": _expert_open_slide,
    "push_green": _expert_push_button("green"),
    "open_drawer": _expert_open_drawer,
    "upright_block_off_table": _expert_block_off_table("upright_block"),
}


class RoboDeskEnv(Env):
    """RoboDesk 1.0.0: 5-d actions, dense reward in [0, 1], the task's own success."""

    has_success = True

    def __init__(self, task: str, seed: int, render: str, max_steps: int | None):
        mujoco, robodesk = _mujoco(), _import_robodesk()
        # episode_length=None: the time limit is ours (max_steps), not the package's.
        self._sim = robodesk.RoboDesk(task=task, reward="dense", action_repeat=1, episode_length=None)
        # The package renders a throwaway camera inside every reset and step
        # (~400 ms each); we render once per step with our persistent camera.
        self._sim._get_obs = lambda: None
        self._rng = np.random.RandomState(seed)
        self._task, self._expert_state = task, {}
        view = mujoco.MjvCamera()  # the free camera of RoboDesk.render()
        view.type = mujoco.mjtCamera.mjCAMERA_FREE
        view.distance, view.azimuth, view.elevation = 1.8, 90, -60
        view.lookat[:] = (0, 0.535, 1.1)
        physics = self._sim.physics
        camera = self._open_camera(physics.model.ptr, physics.data.ptr, 120, view, render == "fast",
                                   finish=_robodesk_finish)
        super().__init__(f"robodesk:{task}", 5, 1, max_steps or 500, render, camera)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (the RoboDesk experts above, from the
        simulator's state); an EnvError for a task that has none."""
        expert = _ROBODESK_EXPERTS.get(self._task)
        if expert is None:
            raise EnvError(f"{self.name} has no scripted expert; RoboDesk's experts are for {_robodesk_expert_names()}")
        return np.clip(expert(self._sim, self._expert_state), -1.0, 1.0)

    def _reseed(self, seed):
        self._rng = np.random.RandomState(seed)

    def _reset_sim(self):
        with _global_numpy_rng(self._rng):
            self._sim.reset()
        # The package stores views into physics memory, so "did the block move"
        # would compare each block with itself; keep the positions at reset.
        self._sim.original_pos = {key: np.array(pos) for key, pos in self._sim.original_pos.items()}
        self._expert_state = {}  # what an expert remembers within an episode (its hook, its grip)

    def _step_sim(self, action):
        _, reward, _, _ = self._sim.step(action)
        return float(reward), False

    def _success(self):
        return bool(self._sim._get_task_reward(self._sim.task, "success"))

    def _free_sim(self):
        _free_robodesk(self._sim)


# The paper's modified DMC tasks: stock task + edits of dm_control's own XML.
# Gravity keeps |g| and tilts it by 15 degrees; the tracking camera is rolled to match.
_DMC_VARIANTS = {
    "walker_uphill": ("walker", "walk", {"gravity": (-2.54, 0, -9.47), "roll": -15}),
    "walker_downhill": ("walker", "walk", {"gravity": (2.54, 0, -9.47), "roll": 15}),
    "walker_nofoot": ("walker", "walk", {"shrink": "right_foot"}),
    "cheetah_uphill": ("cheetah", "run", {"gravity": (-2.54, 0, -9.47), "roll": -15}),
    "cheetah_downhill": ("cheetah", "run", {"gravity": (2.54, 0, -9.47), "roll": 15}),
    "cheetah_nopaw": ("cheetah", "run", {"shrink": "ffoot"}),
}
_DMC_ACTION_REPEAT = 2
_DMC_TIME_LIMIT = 1000  # control steps, as in DreamerV2 / V-D4RL


def _roll_camera(camera: ET.Element, degrees: float) -> None:
    """Turn an MJCF camera about its own viewing axis, keeping where it points."""
    mujoco = _mujoco()
    base = np.zeros(4)
    if camera.get("quat"):
        base[:] = np.array(camera.get("quat").split(), dtype=float)
        base /= np.linalg.norm(base)
    else:  # the suite's XMLs use degrees and the default "xyz" Euler sequence
        mujoco.mju_euler2Quat(base, np.radians(np.array(camera.get("euler", "0 0 0").split(), dtype=float)), "xyz")
    half = np.radians(degrees) / 2
    rolled = np.zeros(4)
    mujoco.mju_mulQuat(rolled, base, np.array([np.cos(half), 0.0, 0.0, np.sin(half)]))
    camera.attrib.pop("euler", None)
    camera.set("quat", " ".join(f"{q:.9f}" for q in rolled))


def _modified_dmc_xml(xml: str | bytes, gravity=None, roll: float = 0.0, shrink: str | None = None) -> str:
    """dm_control's model XML with the paper's edits (all variants: floor half-length 1000)."""
    root = ET.fromstring(xml)
    floor = root.find("./worldbody/geom[@type='plane']")
    floor.set("size", " ".join(["1000"] + floor.get("size").split()[1:]))
    if gravity is not None:
        root.find("option").set("gravity", " ".join(str(g) for g in gravity))
    if roll:
        _roll_camera(root.find(".//camera[@name='side']"), roll)
    if shrink is not None:  # a vanishing foot; its actuator stays, so the action size is kept
        root.find(f".//geom[@name='{shrink}']").set("size", "0.001 0.001")
    return ET.tostring(root, encoding="unicode")


class DMCEnv(Env):
    """DeepMind Control Suite task (stock or modified), action repeat 2, 64x64 camera 0."""

    def __init__(self, task: str, seed: int, render: str, max_steps: int | None):
        with _gl_errors():
            from dm_control import suite
        if task in _DMC_VARIANTS:
            domain, stock_task, edits = _DMC_VARIANTS[task]
        else:
            (domain, stock_task), edits = _dmc_tasks()[task], None
        # The time limit is ours (max_steps); dm_control would otherwise auto-reset.
        kwargs = {"random": seed, "time_limit": float("inf")}
        self._sim = suite.load(domain, stock_task, task_kwargs=kwargs)
        if edits is not None:
            xml, assets = getattr(suite, domain).get_model_and_assets()
            self._sim.physics.reload_from_xml_string(_modified_dmc_xml(xml, **edits), assets)
        physics = self._sim.physics
        camera = self._open_camera(physics.model.ptr, physics.data.ptr, IMAGE_SIZE, 2 if domain == "quadruped" else 0,
                                   render == "fast")  # DreamerV2's camera choice
        action_size = self._sim.action_spec().shape[0]
        default_steps = _DMC_TIME_LIMIT // _DMC_ACTION_REPEAT
        super().__init__(f"dmc:{task}", action_size, _DMC_ACTION_REPEAT, max_steps or default_steps, render, camera)

    def _reseed(self, seed):
        self._sim.task.random.seed(seed)

    def _reset_sim(self):
        self._sim.reset()

    def _step_sim(self, action):
        time_step = self._sim.step(action)
        return float(time_step.reward or 0.0), time_step.last()  # with no time limit, last() means terminal

    def _free_sim(self):
        self._sim.physics.free()


@functools.cache
def _dmc_tasks() -> dict[str, tuple[str, str]]:
    """``domain_task`` -> (domain, task) for the stock suite."""
    with _gl_errors():
        from dm_control import suite
    return {f"{domain}_{task}": (domain, task) for domain, task in suite.ALL_TASKS}


@functools.cache
def _tasks(family: str) -> tuple[str, ...]:
    """Valid task names of one family, read from the installed packages."""
    if family == "metaworld":
        with _gl_errors():
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        return tuple(sorted(name.removesuffix("-v3") for name in ALL_V3_ENVIRONMENTS))
    if family == "robodesk":
        # The task list lives on instances only; build one and free it.
        sim = _import_robodesk().RoboDesk()
        _free_robodesk(sim)
        return tuple(sim.all_tasks)
    return tuple(sorted([*_dmc_tasks(), *_DMC_VARIANTS]))


def list_envs() -> dict[str, list[str]]:
    """Family -> valid task names (use as ``family:task``)."""
    return {family: list(_tasks(family)) for family in FAMILIES}


_ENV_CLASSES = {"metaworld": MetaWorldEnv, "robodesk": RoboDeskEnv, "dmc": DMCEnv}


def check_env_name(name: str) -> tuple[str, str]:
    """Split ``family:task`` and check both parts; an EnvError lists the valid names."""
    family, _, task = str(name).partition(":")
    if family not in FAMILIES or not task:
        raise EnvError(f"unknown environment {name!r}: use family:task with family one of {', '.join(FAMILIES)} "
                       f"(e.g. metaworld:window-close)")
    if task not in _tasks(family):
        raise EnvError(f"unknown {family} task {task!r}; valid: {', '.join(_tasks(family))}")
    return family, task


def has_expert(env_name: str) -> bool:
    """Whether ``family:task`` has a scripted expert, i.e. whether ``collect(..., policy="scripted")``
    and ``expert_action()`` work: Meta-World tasks with a metaworld.policies policy and the RoboDesk
    tasks of _ROBODESK_EXPERTS; DMC has none."""
    family, task = check_env_name(env_name)
    if family == "metaworld":
        with _gl_errors():
            from metaworld.policies import ENV_POLICY_MAP
        return f"{task}-v3" in ENV_POLICY_MAP
    return family == "robodesk" and task in _ROBODESK_EXPERTS


@functools.cache
def action_size(name: str) -> int:
    """Action dimensions of ``family:task`` without rendering anything."""
    family, task = check_env_name(name)
    if family == "metaworld":
        return 4
    if family == "robodesk":
        return 5
    from dm_control import suite
    domain, base = _DMC_VARIANTS[task][:2] if task in _DMC_VARIANTS else _dmc_tasks()[task]
    return int(suite.load(domain, base).action_spec().shape[0])


def make_env(name: str, seed: int = 0, render: str = "default", max_steps: int | None = None) -> Env:
    """Create ``family:task`` (see list_envs()).

    render: "default" (the look the benchmarks define) or "fast" (no shadows,
    reflections or multisampling). max_steps: episode length in agent steps
    (after action repeat); default 500 for every family.
    """
    family, task = check_env_name(name)
    if render not in RENDERS:
        raise EnvError(f"render must be one of {', '.join(RENDERS)}, got {render!r}")
    if max_steps is not None and (not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
        raise EnvError(f"max_steps must be a positive integer, got {max_steps!r}")
    return _ENV_CLASSES[family](task, seed, render, None if max_steps is None else int(max_steps))


# ---------------------------------------------------------------------------
# Episodes on disk
# ---------------------------------------------------------------------------


def atomic_write(path, write: Callable) -> None:
    """Write via a temporary file in the same folder, flushed to disk, and os.replace.

    A killed process (or a lost machine) then leaves either the old file or the
    new one, never a half-written one (the temporary name, .<name>.<hex>.tmp,
    matches no *.npz, dataset.json or checkpoint).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # open() keeps the umask's permissions
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # open() itself may have failed (read-only folder, full disk)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # the rename itself on disk: a lost machine keeps the new file
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _as_flags(values: np.ndarray, key: str, where: str) -> np.ndarray:
    """bool, or 0/1 numbers (DreamerV2 and V-D4RL store flags as uint8, Meta-World's success is a float), as bool."""
    if values.dtype == bool:
        return values
    if not np.issubdtype(values.dtype, np.number) or not np.isin(values, (0, 1)).all():
        raise DatasetError(f"{where}: {key} must be bool or 0/1 numbers, got {values.dtype}")
    return values.astype(bool)


def _check_episode(episode: dict, where: str = "episode") -> dict:
    """Validate an episode and return it with canonical dtypes.

    Layout (N = number of time steps, the reset frame included): image uint8
    (N, H, W, 3); action float (N, A), action[t] led into image[t] (zeros at
    t=0, by convention only: the world model resets at is_first, the action
    with the state, so action[0] is never read); reward, discount float (N,);
    is_first, is_last, is_terminal bool (N,) (either derived from the other when
    absent, as DreamerV2's own replay folders lack discount and V-D4RL's lack
    is_terminal; discount in [0, 1] and 0 exactly where is_terminal, which only
    the last step can be); optional success.
    Other keys are dropped. ``where`` (usually the file) starts every error message.
    """
    derivable = ("discount", "is_terminal") if "discount" in episode or "is_terminal" in episode else ()
    missing = [key for key in EPISODE_KEYS if key not in episode and key not in derivable]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
    out = {key: np.asarray(episode[key]) for key in (*EPISODE_KEYS, "success") if key in episode}
    if "discount" not in out:
        out["discount"] = (~_as_flags(out["is_terminal"], "is_terminal", where)).astype(np.float32)
    image = out["image"]
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3 or 0 in image.shape[1:3]:
        raise DatasetError(f"{where}: image must be uint8 (N, H, W, 3), got {image.dtype} {image.shape}")
    for key, ndim in (("action", 2), ("reward", 1), ("discount", 1)):
        if not np.issubdtype(out[key].dtype, np.floating) or out[key].ndim != ndim or 0 in out[key].shape[1:]:
            shape = "(N, A), A >= 1" if ndim == 2 else "(N,)"
            raise DatasetError(f"{where}: {key} must be float {shape}, got {out[key].dtype} {out[key].shape}")
        if not np.isfinite(out[key]).all():
            raise DatasetError(f"{where}: {key} contains NaN or inf")
        out[key] = out[key].astype(np.float32, copy=False)
    if "is_terminal" not in out:
        out["is_terminal"] = out["discount"] == 0
    for key in FLAG_KEYS:
        if key in out:
            if out[key].ndim != 1:
                raise DatasetError(f"{where}: {key} must have shape (N,), got {out[key].shape}")
            out[key] = _as_flags(out[key], key, where)
    lengths = {key: len(value) for key, value in out.items()}
    if len(set(lengths.values())) != 1:
        raise DatasetError(f"{where}: arrays have unequal lengths {lengths}")
    if lengths["image"] < 2:
        raise DatasetError(f"{where}: {lengths['image']} step(s); an episode needs its reset frame and at least one "
                           "transition")
    for key, at in (("is_first", 0), ("is_last", lengths["image"] - 1)):
        marked = np.flatnonzero(out[key]).tolist()
        if marked != [at]:
            raise DatasetError(f"{where}: {key} must be True at step {at} only, found at steps {marked[:5]}"
                               f"{'...' if len(marked) > 5 else ''}")
    if np.abs(out["reward"]).max() > MAX_REWARD:
        raise DatasetError(f"{where}: rewards up to {np.abs(out['reward']).max():.3g} in magnitude, beyond "
                           f"{MAX_REWARD:g}; the benchmarks give at most 10 a step: rescale them")
    if ((out["discount"] < 0) | (out["discount"] > 1)).any():
        raise DatasetError(f"{where}: discount must lie in [0, 1]")
    if not np.array_equal(out["is_terminal"], out["discount"] == 0):
        raise DatasetError(f"{where}: is_terminal and discount == 0 must mark the same steps (true terminations)")
    if out["is_terminal"][:-1].any():
        raise DatasetError(f"{where}: is_terminal at step {int(out['is_terminal'].argmax())}: only the last step "
                           "of an episode can be terminal")
    return out


def save_episode(directory, episode: dict) -> pathlib.Path:
    """Validate and write one episode as ``{YYYYmmddTHHMMSS}-{uuid}-{N}.npz`` (atomic)."""
    episode = _check_episode(episode)
    timestamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")  # UTC: never goes back
    path = pathlib.Path(directory) / f"{timestamp}-{uuid.uuid4().hex}-{len(episode['reward'])}.npz"
    atomic_write(path, lambda file: np.savez_compressed(file, **episode))
    return path


def _read_npz(path, keys=None) -> dict:
    """The arrays of an .npz file, or only `keys`; any failure is a DatasetError that names the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in (data.files if keys is None else keys)}
    except Exception as exc:  # zip, zlib, pickle, OS errors and a missing key all mean an unreadable file
        raise DatasetError(f"{path}: not a readable .npz episode ({type(exc).__name__}: {exc})") from exc


def load_episode(path) -> dict:
    """Read and validate one episode file (lengths come from the arrays, not the name)."""
    return _check_episode(_read_npz(path), str(path))


def episode_length(path) -> int:
    """Time steps in an episode file, from its reward array alone (the images stay on disk)."""
    return len(_read_npz(path, ["reward"])["reward"])


def episode_paths(directory) -> list[pathlib.Path]:
    """Episode files of a folder, oldest first.

    Names start with a timestamp in seconds (UTC, so a clock set back for
    daylight saving does not reorder them); within one second the
    modification time orders the episodes one process wrote.
    """
    return sorted(pathlib.Path(directory).glob("*.npz"),
                  key=lambda path: (path.name[:15], path.stat().st_mtime_ns, path.name))


def iter_dataset(directory, action_size: int | None = None, image_size: int = IMAGE_SIZE, seq_len: int = 1):
    """Load and validate the episodes of a folder one at a time, oldest first; any problem is a DatasetError.
    Only one episode is in memory at a time, so a dataset larger than RAM streams into a disk-backed Replay.
    A dataset that is usable but odd is said so once, at the end: actions outside [-1, 1] (clipped, as the
    environments clip them) and episodes shorter than a training window of ``seq_len`` (windows then span
    episodes, is_first marking the seams)."""
    directory = pathlib.Path(directory)
    try:
        os.stat(directory)
    except OSError as exc:
        reason = "a symbolic link that loops" if exc.errno == errno.ELOOP else "no such folder"
        raise DatasetError(f"{directory}: {reason}") from None
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a folder")
    paths = episode_paths(directory)
    if not paths:
        raise DatasetError(f"{directory}: no episodes (*.npz files) in this folder")
    steps, clipped, short, largest = 0, 0, 0, 0.0
    first = None  # without action_size, the first episode's: one folder, one action space
    for path in paths:
        episode = load_episode(path)
        found = episode["action"].shape[1]
        if action_size is not None and found != action_size:
            raise DatasetError(f"{path}: action size {found}, expected {action_size}: was this dataset recorded on "
                               "another environment than the target?")
        first = first or (path, found)
        if found != first[1]:
            raise DatasetError(f"{path}: action size {found}, where {first[0].name} has {first[1]}: a folder holds "
                               "the episodes of one environment")
        if episode["image"].shape[1:3] != (image_size, image_size):
            raise DatasetError(f"{path}: image size {episode['image'].shape[1:3]}, expected {(image_size, image_size)}")
        outside = np.abs(episode["action"]).max()
        if outside > 1:
            clipped, largest = clipped + 1, max(largest, float(outside))
            episode["action"] = np.clip(episode["action"], -1.0, 1.0)
        short += len(episode["reward"]) < seq_len
        steps += len(episode["reward"])
        yield episode
    if steps < seq_len:
        raise DatasetError(f"{directory}: {steps} steps in all, fewer than one training window of {seq_len} "
                           "(--seq-len)")
    if clipped:
        print(f"note: {directory}: actions of {clipped} episode(s) lie outside [-1, 1] (up to {largest:.3g}); "
              f"clipped, as the environments clip them")
    if short:
        print(f"note: {directory}: {short} of {len(paths)} episodes are shorter than a training window of {seq_len} "
              f"steps; windows span episodes (is_first marks the seams)")


def load_dataset(directory, action_size: int | None = None, image_size: int = IMAGE_SIZE) -> list[dict]:
    """Every episode of a folder, loaded and validated (see iter_dataset)."""
    return list(iter_dataset(directory, action_size, image_size))


def write_dataset_info(directory, info: dict) -> None:
    """Write ``dataset.json`` (how the episodes beside it were made) atomically."""
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic_write(pathlib.Path(directory) / DATASET_INFO, lambda file: file.write(text.encode()))


def read_dataset_info(directory) -> dict | None:
    """The folder's ``dataset.json`` as a dict, or None when there is none."""
    path = pathlib.Path(directory) / DATASET_INFO
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: must hold a JSON object (how the episodes were made), not {type(info).__name__}")
    if info.get("render") not in (None, *RENDERS):
        raise DatasetError(f"{path}: render {info['render']!r} is not one of {', '.join(RENDERS)}")
    return info


# ---------------------------------------------------------------------------
# Replay: the sequence sampler
# ---------------------------------------------------------------------------


class DiskImages:
    """One episode's images in a replay's spill file: shape and dtype like an array, read on demand.

    Reads go through the OS page cache with pread, so recently used images stay fast while the process's
    own memory holds none of them (a memory map would count every page it touched)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, file, offset: int, shape: tuple):
        self.file, self.offset, self.shape = file, offset, shape
        self.frame_bytes = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (count, H, W, C), a contiguous block, with frames start .. start + count - 1."""
        view, position = memoryview(out).cast("B"), self.offset + start * self.frame_bytes
        while len(view):
            count = os.preadv(self.file.fileno(), [view], position)
            if count <= 0:
                raise DatasetError(f"replay spill file {self.file.name}: short read at byte {position}")
            view, position = view[count:], position + count

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.uint8)
        self.read_into(0, out)
        return out if dtype is None else out.astype(dtype)


class Replay:
    """Episodes as stored (uint8 images), sampled as (B, T) windows.

    The episodes are treated as one circular stream: a window starts at a
    uniformly drawn time step and may run past its episode's end into the next
    episode's start, where is_first marks the seam. Episodes shorter than T
    therefore work. With a ``directory`` the replay loads the episodes already
    there (how a killed run resumes) and add() saves new ones to it. The oldest
    episodes are dropped beyond ``capacity`` time steps.

    With ``spill_dir`` the images (12 KB of the 12.3 KB a step takes) go to an
    anonymous temporary file in that folder, deleted when the replay is, and are
    read back per window: 10^6 steps need 12 GB of disk there, not of RAM. The
    file only grows; the steps of dropped episodes stay in it unused.
    """

    def __init__(self, directory=None, capacity: int = 2_000_000, spill_dir=None):
        self.directory = None if directory is None else pathlib.Path(directory)
        self.capacity = capacity
        self.spill_dir = None if spill_dir is None else pathlib.Path(spill_dir)
        self._spill, self._spill_bytes = None, 0  # the file opens with the first episode
        self._episodes: list[dict] = []
        self._starts = np.zeros(0, np.int64)  # stream index of each episode's first step
        self.num_steps = 0  # time steps held (reset frames included)
        self.closed = False
        if self.directory is not None and self.directory.is_dir():
            self._load_newest()

    def close(self) -> None:
        """Delete the spill file now (it also goes when the replay is garbage-collected or the process ends) and
        let go of the episodes; the replay cannot be used after it."""
        if self._spill is not None:
            self._spill.close()
        self._episodes, self._starts, self.num_steps, self.closed = [], np.zeros(0, np.int64), 0, True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Replay was closed (close() frees its episodes and deletes its spill file); "
                               "make a new Replay, which reloads a folder's episodes")

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def _load_newest(self) -> None:
        """Load the newest episodes that fit the capacity, oldest first, one at a time: with spill_dir only one
        episode's images are ever in memory."""
        chosen, steps = [], 0
        for path in reversed(episode_paths(self.directory)):
            steps += episode_length(path)
            if steps > self.capacity and chosen:
                break
            chosen.append(path)
        for path in reversed(chosen):
            self._append(load_episode(path), str(path))

    def add(self, episode: dict, save: bool = True) -> None:
        """Add one episode; with save=True also write it to ``directory``."""
        self._check_open()
        if save and self.directory is None:
            raise ValueError("Replay.add(save=True) needs a directory; pass save=False or Replay(directory)")
        episode = _check_episode(episode)
        if save:
            save_episode(self.directory, episode)
        self._append(episode, "episode")

    def _append(self, episode: dict, where: str) -> None:
        if self._episodes:
            first = self._episodes[0]
            for key in ("image", "action"):
                if episode[key].shape[1:] != first[key].shape[1:]:
                    raise DatasetError(f"{where}: {key} shape {episode[key].shape[1:]} differs from the "
                                       f"replay's {first[key].shape[1:]}")
        if self.spill_dir is not None:
            episode = {**episode, "image": self._spill_images(episode["image"])}
        self._episodes.append(episode)
        self.num_steps += len(episode["reward"])
        while self.num_steps > self.capacity and len(self._episodes) > 1:
            self.num_steps -= len(self._episodes.pop(0)["reward"])
        lengths = [len(e["reward"]) for e in self._episodes]
        self._starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)

    def _spill_images(self, images: np.ndarray) -> DiskImages:
        if self._spill is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill = tempfile.TemporaryFile(dir=self.spill_dir, prefix="replay-images-")
        images = np.ascontiguousarray(images, np.uint8)
        self._spill.seek(self._spill_bytes)
        self._spill.write(memoryview(images).cast("B"))
        self._spill.flush()
        stored = DiskImages(self._spill, self._spill_bytes, images.shape)
        self._spill_bytes += images.nbytes
        return stored

    def sample(self, batch: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A dict of (batch, length, ...) arrays for EPISODE_KEYS, dtypes as stored: ``batch`` windows starting
        anywhere in the replay, running on into the following episodes."""
        self._check_open()
        if not self._episodes:
            raise ValueError("cannot sample from an empty replay")
        starts = rng.integers(0, self.num_steps, size=batch)
        first = self._episodes[0]
        out = {key: np.empty((len(starts), length, *first[key].shape[1:]), first[key].dtype) for key in EPISODE_KEYS}
        for row, start in enumerate(starts):
            self._copy_window(out, row, int(start), length)
        return out

    def _copy_window(self, out: dict, row: int, start: int, length: int) -> None:
        index = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset, filled = start - int(self._starts[index]), 0
        while filled < length:
            episode = self._episodes[index]
            count = min(len(episode["reward"]) - offset, length - filled)
            for key in EPISODE_KEYS:
                if isinstance(episode[key], DiskImages):
                    episode[key].read_into(offset, out[key][row, filled:filled + count])
                else:
                    out[key][row, filled:filled + count] = episode[key][offset:offset + count]
            filled += count
            index, offset = (index + 1) % len(self._episodes), 0


# ---------------------------------------------------------------------------
# Collecting datasets
# ---------------------------------------------------------------------------


def run_episode(env: Env, act: Callable[[dict], np.ndarray]) -> dict:
    """Run one episode with ``act(obs) -> action`` and return it in the on-disk layout."""
    obs = env.reset()
    steps = [(obs, np.zeros(env.action_size, np.float32))]
    while not obs["is_last"]:
        action = np.clip(np.asarray(act(obs), np.float32), -1.0, 1.0)
        obs = env.step(action)
        steps.append((obs, action))
    return episode_from_steps(steps)


def episode_from_steps(steps: list[tuple[dict, np.ndarray]]) -> dict:
    """(observation, action that led into it) pairs, reset first, -> the on-disk episode layout."""
    obs = steps[-1][0]
    episode = {"image": np.stack([o["image"] for o, _ in steps]),
               "action": np.stack([a for _, a in steps]),
               "reward": np.array([o["reward"] for o, _ in steps], np.float32)}
    for key in FLAG_KEYS:
        if key in obs:
            episode[key] = np.array([o[key] for o, _ in steps], bool)
    episode["discount"] = (~episode["is_terminal"]).astype(np.float32)
    return episode


def _scripted_policy(env: Env, epsilon: float, rng: np.random.Generator, hold: int = 10) -> Callable:
    """The scripted expert, replaced by a random action (held ``hold`` steps) in
    a fraction ``epsilon`` of the blocks, so returns spread from random to expert."""
    state = {"t": 0, "random": None}

    def act(obs):
        if state["t"] % hold == 0:
            state["random"] = rng.uniform(-1, 1, env.action_size) if rng.random() < epsilon else None
        state["t"] += 1
        return env.expert_action() if state["random"] is None else state["random"]

    return act


def collect(env_name: str, policy: str, episodes: int, out, seed: int = 0, render: str = "default",
            max_steps: int | None = None, epsilon: tuple[float, float] = (0.5, 1.0)) -> dict:
    """Collect ``episodes`` episodes into the empty folder ``out`` and write dataset.json.

    policy: "random" (uniform actions, any env) or "scripted" (the task's
    scripted expert where has_expert(): Meta-World's metaworld.policies, the
    RoboDesk experts of this file; each episode draws its epsilon uniformly
    from ``epsilon``).
    The episodes go to a hidden folder beside ``out`` that becomes ``out`` when
    complete: a killed collection leaves no partial dataset, and the next one
    starts over. Returns (and prints) a summary: episodes, steps, return
    mean/min/max, success rate.
    """
    from tqdm import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    if policy not in ("random", "scripted"):
        raise EnvError(f"unknown policy {policy!r}; valid: random, scripted")
    if policy == "scripted" and not has_expert(env_name):
        raise EnvError(f"{env_name} has no scripted expert (Meta-World tasks and {_robodesk_expert_names()} "
                       f"have one); valid policies for it: random")
    if not 0.0 <= epsilon[0] <= epsilon[1] <= 1.0:
        raise EnvError(f"epsilon must be a range inside [0, 1], got {epsilon}")
    given, out = out, pathlib.Path(os.path.realpath(out))  # a link's target, which the finished folder replaces
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{given}: a file, not a folder; collect into a new folder")
    if out == pathlib.Path(os.path.realpath(os.getcwd())):
        raise DatasetError(f"{given}: the current folder, which the finished dataset would replace; collect into a "
                           f"new folder")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{given}: not an empty folder; collect into a new folder")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    returns, successes, steps = [], [], 0
    with make_env(env_name, seed=seed, render=render, max_steps=max_steps) as env, \
            tqdm(total=episodes, desc=env_name, unit="episode") as bar:
        for _ in range(episodes):
            if policy == "scripted":
                act = _scripted_policy(env, rng.uniform(*epsilon), rng)
            else:
                act = lambda obs: rng.uniform(-1, 1, env.action_size)  # noqa: E731
            episode = run_episode(env, act)
            save_episode(partial, episode)
            returns.append(float(episode["reward"].sum()))
            steps += len(episode["reward"]) - 1
            shown = {"return": f"{returns[-1]:.1f}"}
            if "success" in episode:
                successes.append(bool(episode["success"].any()))
                shown["success"] = "yes" if successes[-1] else "no"
            bar.set_postfix(shown)
            bar.update(1)
        action_size, episode_steps = env.action_size, env.max_steps
    summary = {
        "episodes": len(returns), "steps": steps,
        "mean_return": float(np.mean(returns)), "min_return": min(returns), "max_return": max(returns),
        "success_rate": float(np.mean(successes)) if successes else None,
    }
    write_dataset_info(partial, {"env": env_name, "render": render, "policy": policy, "seed": seed,
                                 "epsilon": list(epsilon) if policy == "scripted" else None,
                                 "action_size": action_size, "max_steps": episode_steps, **summary})
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(partial, out)
    print(json.dumps(summary))
    return summary


def collect_once(env_name: str, policy: str, episodes: int, out, **kwargs) -> None:
    """``collect`` into ``out`` unless it holds a dataset already. Processes that need the same one at the same
    time take turns under a lock file beside it: the first builds it, the others wait and read it."""
    out = pathlib.Path(out)
    if read_dataset_info(out) is not None:  # built already: read it, even from a read-only folder
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out.parent)
    with locked(out.parent / f".{out.name}.lock", f"waiting for another process that is building {out}"):
        if read_dataset_info(out) is None:
            if out.exists():
                raise DatasetError(f"{out}: a dataset folder without its {DATASET_INFO} (altered, or not made by "
                                   f"collect); delete it and it is built again")
            print(f"building a dataset of {episodes} {env_name} episodes ({policy} policy) in {out}")
            collect(env_name, policy, episodes, out, **kwargs)


@contextlib.contextmanager
def locked(path, waiting: str | None = None, wait: bool = True):
    """An exclusive lock on a lock file, removed when released; yields False instead of waiting when wait is False.
    A holder removes the file, so a lock taken on a file that is gone is taken again on the path's new one."""
    while True:
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if waiting:
                    print(waiting)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino != os.fstat(lock.fileno()).st_ino:
                    continue
            except FileNotFoundError:
                continue
            try:
                yield True
            finally:
                os.unlink(path)
            return


def remove_stale_builds(folder) -> None:
    """Lock files and half-built datasets (.partial) a killed build left in ``folder``, where no build holds them."""
    for lock in pathlib.Path(folder).glob(".*.lock"):
        with locked(lock, wait=False) as free:
            if free:
                shutil.rmtree(lock.with_name(lock.name.removesuffix(".lock") + ".partial"), ignore_errors=True)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def evaluate_expert(env_name: str, episodes: int = 20, seed: int = 0, render: str = "default",
                    max_steps: int | None = None) -> dict:
    """Run the scripted expert alone (epsilon 0) for ``episodes`` episodes, episode i reset with seed
    ``seed + i``, and return (and print) its success rate, mean return and mean steps to the first
    success (None when no episode succeeded). An episode succeeds when any of its steps does."""
    from tqdm import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    if not has_expert(env_name):
        raise EnvError(f"{env_name} has no scripted expert (Meta-World tasks and {_robodesk_expert_names()} have one)")
    returns, first_success, begin = [], [], time.perf_counter()
    with make_env(env_name, seed=seed, render=render, max_steps=max_steps) as env, \
            tqdm(total=episodes, desc=f"{env_name} expert", unit="episode") as bar:
        for episode in range(episodes):
            obs, total, first, step = env.reset(seed=seed + episode), 0.0, None, 0
            while not obs["is_last"]:
                obs, step = env.step(env.expert_action()), step + 1
                total += obs["reward"]
                if first is None and obs.get("success"):
                    first = step
            returns.append(total)
            first_success.append(first)
            bar.set_postfix({"return": f"{total:.1f}", "success": "no" if first is None else f"step {first}"})
            bar.update(1)
        episode_steps = env.max_steps
    reached = [step for step in first_success if step is not None]
    summary = {
        "env": env_name, "render": render, "seed": seed, "episodes": episodes, "max_steps": episode_steps,
        "success_rate": float(np.mean([step is not None for step in first_success])),
        "mean_return": float(np.mean(returns)),
        "mean_steps_to_success": float(np.mean(reached)) if reached else None,
        "seconds": round(time.perf_counter() - begin, 1),
        "returns": [round(r, 2) for r in returns], "steps_to_success": first_success,
    }
    print(json.dumps(summary))
    return summary


def bench(steps: int = 100, names=BENCH_ENVS) -> None:
    """Print environment steps per second (step + render) with each render setting."""
    rng = np.random.default_rng(0)
    for name in names:
        for render in RENDERS:
            with make_env(name, render=render, max_steps=steps) as env:
                env.reset()
                begin = time.perf_counter()
                for _ in range(steps):
                    env.step(rng.uniform(-1, 1, env.action_size))
                rate = steps / (time.perf_counter() - begin)
            print(f"{name:24s} {render:8s} {rate:8.1f} steps/s", flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of usage + error, and no flag abbreviations."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"  # how argparse names the type in its error


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise ValueError(text)
    return value


_seed.__name__ = "seed (an integer in [0, 2**32))"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="envs.py", description="CoWorld environments and offline data.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    make = commands.add_parser("collect", help="collect an offline dataset")
    make.add_argument("--env", required=True, help="family:task, e.g. metaworld:window-close")
    make.add_argument("--policy", required=True, choices=("random", "scripted"))
    make.add_argument("--episodes", required=True, type=_positive_int)
    make.add_argument("--out", required=True, help="new folder for the episodes")
    make.add_argument("--seed", type=_seed, default=0)
    make.add_argument("--render", choices=RENDERS, default="default")
    make.add_argument("--max-steps", type=_positive_int, default=None)
    check = commands.add_parser("expert", help="success rate, mean return and steps to success of a scripted expert")
    check.add_argument("--env", required=True, help="family:task with a scripted expert, e.g. robodesk:open_slide")
    check.add_argument("--episodes", type=_positive_int, default=20)
    check.add_argument("--seed", type=_seed, default=0, help="episode i is reset with seed S + i")
    check.add_argument("--render", choices=RENDERS, default="default")
    check.add_argument("--max-steps", type=_positive_int, default=None)
    speed = commands.add_parser("bench", help="print steps per second of a task per family and the modified DMC")
    speed.add_argument("--steps", type=_positive_int, default=100)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "expert" and args.seed + args.episodes > 2 ** 32:
            raise EnvError(f"--seed {args.seed}: episode i is reset with seed {args.seed} + i, and seeds lie in "
                           f"[0, 2**32); lower --seed or --episodes")
        if args.command == "collect":
            collect(args.env, args.policy, args.episodes, args.out, seed=args.seed,
                    render=args.render, max_steps=args.max_steps)
        elif args.command == "expert":
            evaluate_expert(args.env, args.episodes, seed=args.seed, render=args.render, max_steps=args.max_steps)
        else:
            bench(args.steps)
    except (EnvError, DatasetError, OSError) as exc:
        print(f"envs.py: error: {error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a collection leaves nothing behind (its hidden .partial folder goes next time)
        print("envs.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
