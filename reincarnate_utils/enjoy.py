#!/usr/bin/env python
"""Watch and score a trained agent: evaluate any agent ``teacher_utils.load_teacher`` accepts on the envs it
was trained on, with Dopamine's evaluation protocol, and optionally film its first episode in colour.

    python reincarnate_utils/enjoy.py runs/<run_name> --capture-video
    python -m reincarnate_utils.enjoy /data/DQN_400/Breakout/1 --env-id Breakout-v5 --iteration 199

Output: one line per episode (return, length), then a summary line (mean +- std over the episodes, agent
steps, the game's random score and the human-normalized score).  Errors are one ``error:`` line, exit 1.

The film (``--capture-video``) shows the game as a person sees it: the full 210x160 RGB screen, not the
agent's 84x84 grey stack.  envpool is deterministic given its seed and the actions (sticky actions
included), so the actions env 0 took in its first evaluation episode are recorded and replayed in a second
envpool env with the same seed and settings except ``img_height=210, img_width=160, gray_scale=False,
stack_num=1`` (envpool's RGB observation is channel-first, (3, 210, 160), transposed here to (210, 160, 3)).
Each frame is, like the agent's, the max of the last two emulator frames of its 4-frame skip.  The replay's
rewards are checked against the evaluation's; a divergence is reported in one warning line.

Frame count: the film holds the reset frame and then the frame after each action, so an episode of L agent
steps gives L + 1 frames (at 15 fps: 60 Hz / frame skip 4), capped at ``--video-max-frames`` (default
4,500 frames = 5 minutes).  Frames are streamed to the encoder one at a time, so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Sequence

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # `python reincarnate_utils/enjoy.py`: the training scripts and teacher_utils live in the root
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import tyro  # noqa: E402

import teacher_utils as tu  # noqa: E402

DESCRIPTION = (
    "Evaluate a trained agent (a Dopamine DQN checkpoint, a run folder saved by qdagger_*_atari_jax.py with "
    "--save-model, a CleanRL dqn_atari_jax.py model or an hf://owner/repo/file address) on the Atari envs it was "
    "trained on, with Dopamine's evaluation protocol (whole episodes until --eval-steps agent steps, every started "
    "episode counted, epsilon 0.001), print each episode's return and length and a summary with the random and "
    "human-normalized scores, and with --capture-video film its first episode in colour (the full 210x160 screen).\n\n"
    "Example: python reincarnate_utils/enjoy.py runs/Breakout-v5__qdagger_dqn_atari_jax__qdagger__1__1700000000 --capture-video"
)

SCREEN = (210, 160)
"""The Atari screen (height, width): what envpool gives with these sizes is the emulator's frame, unresized."""
VIDEO_FPS = 15
"""60 Hz emulator frames / frame skip 4."""


@dataclasses.dataclass
class Args:
    source: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="SOURCE")]]
    """the agent: a Dopamine run folder, checkpoints/ folder, ckpt.<N> file, tf_ckpt-<N> prefix or gs:// address; a run folder of our scripts (runs/<run_name>/) or its model file; a CleanRL .cleanrl_model file or hf://<owner>/<repo>/<file>"""
    env_id: str | None = None
    """envpool Atari id (Breakout-v5); default: the env id of a run folder of our scripts (required for any other agent)"""
    eval_steps: int = 125_000
    """agent steps of evaluation (Dopamine's 125,000): episodes are played whole until this many steps have passed"""
    eval_episodes: int | None = None
    """stop starting new episodes after this many (default: no cap; the step budget decides)"""
    num_envs: int = 1
    """parallel envs (1: Dopamine's exact sequence of episodes; env i is seeded seed + i)"""
    epsilon: float = 0.001
    """probability of a random action (Dopamine's evaluation epsilon)"""
    seed: int = 1
    """seed of the envs and of the epsilon-greedy choices"""
    max_episode_steps: int | None = None
    """cap on an episode's agent steps (default: the run's own for our runs, else 27,000 = 30 minutes of play)"""
    iteration: int | None = None
    """Dopamine iteration to load (default: the latest complete checkpoint); not for single model files"""
    capture_video: bool = False
    """film env 0's first episode in colour (the full 210x160 RGB screen) as an mp4 at 15 fps: the reset frame, then one frame per agent step (L steps: L + 1 frames)"""
    video_path: str | None = None
    """where the mp4 goes (default videos/<source name>-<env id>.mp4)"""
    video_max_frames: int = 4_500
    """film at most this many frames (4,500 = 5 minutes at 15 fps); a longer episode is cut, and the output says so"""


class EnjoyError(tu.TeacherError):
    """A problem with the command line or its inputs, reported in one line."""


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
_GENERIC = re.compile(r"checkpoints|\d+|(tf_)?ckpt[.-]\d+.*")


def source_name(source: str) -> str:
    """A short file-name-safe name of a source: the last meaningful part of its path or address
    (``.../DQN_400/Breakout/1`` -> ``Breakout-1``, ``runs/foo/`` -> ``foo``, ``hf://o/repo/m.cleanrl_model`` -> ``repo``)."""
    s = str(source).rstrip("/")
    if s.startswith("hf://"):
        parts = s[len("hf://"):].split("/")
        name = parts[1].split("@")[0] if len(parts) > 1 else parts[0]
    else:
        parts = [p for p in re.split(r"[/\\]", s.split("://", 1)[-1]) if p not in ("", ".", "..")]
        kept: list[str] = []
        for p in reversed(parts):
            p = p[: -len(tu.MODEL_SUFFIX)] if p.endswith(tu.MODEL_SUFFIX) else p
            if p == "checkpoints":
                continue
            kept.insert(0, p)
            if not _GENERIC.fullmatch(p):
                break
        name = "-".join(kept) or "agent"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _game_hint(source: str) -> str:
    """``e.g. --env-id Breakout-v5``, with the game named in the source's path when there is one."""
    for part in reversed(re.split(r"[/\\@]", str(source))):
        if part in tu.ATARI_SCORES:
            return f"--env-id {part}-v5"
    return "e.g. --env-id Breakout-v5"


class _FirstEpisodeRecorder:
    """Wraps the evaluation envs: keeps the actions env 0 takes in its first episode and the rewards it gets."""

    def __init__(self, envs: tu.DopamineAtariEnvs):
        self._envs = envs
        self.actions: list[int] = []
        self.rewards: list[float] = []
        self.finished = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._envs, name)

    def reset(self, **kwargs: Any):
        return self._envs.reset(**kwargs)

    def step(self, actions):
        out = self._envs.step(actions)
        if not self.finished:
            _, _, terminated, truncated, info = out
            self.actions.append(int(np.asarray(actions)[0]))
            self.rewards.append(float(info["reward"][0]))
            self.finished = bool(terminated[0] or truncated[0])
        return out


@dataclasses.dataclass
class Film:
    path: Path
    frames: int
    steps: int
    """Agent steps replayed (frames - 1)."""
    cut: bool
    """The episode was longer than the film."""
    diverged_at: int | None
    """The first replayed step whose reward (or episode end) differs from the evaluation's, if any."""
    replay_rewards: list[float]


def replay_env_kwargs(env_kwargs: dict, max_episode_steps: int) -> dict:
    """The evaluation envs' settings with the full-size RGB screen as the observation."""
    return {**env_kwargs, "max_episode_steps": max_episode_steps, "img_height": SCREEN[0], "img_width": SCREEN[1],
            "gray_scale": False, "stack_num": 1, "zero_stack_start": False}


def film_episode(env_id: str, seed: int, env_kwargs: dict, max_episode_steps: int, actions: Sequence[int],
                 rewards: Sequence[float], path: Path, max_frames: int, episode_ended: bool = True) -> Film:
    """Replay ``actions`` in an RGB envpool env seeded like env 0 of the evaluation, streaming its frames to ``path``.
    ``rewards`` are the evaluation's for those actions; ``episode_ended``: the last action ended the episode there."""
    import imageio.v2 as imageio

    n = min(len(actions), max_frames - 1)
    env = tu.make_teacher_envs(env_id, 1, seed, **replay_env_kwargs(env_kwargs, max_episode_steps))
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.stem}.part{path.suffix}")  # renamed when complete: no half-written film at `path`
    diverged_at, replay_rewards = None, []
    try:
        with warnings.catch_warnings():
            # imageio-ffmpeg starts ffmpeg with subprocess (fork and exec at once): JAX's os.fork warning does not apply.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            # macro_block_size=1: no padding to 224x160, the exact screen (yuv420p needs even sizes: 210 and 160 are).
            with imageio.get_writer(part, fps=VIDEO_FPS, macro_block_size=1, ffmpeg_log_level="error") as writer:
                obs, _ = env.reset()
                writer.append_data(np.ascontiguousarray(obs[0].transpose(1, 2, 0)))  # (3, 210, 160) -> (210, 160, 3)
                for t in range(n):
                    obs, _, terminated, truncated, info = env.step(np.asarray([actions[t]], np.int32))
                    writer.append_data(np.ascontiguousarray(obs[0].transpose(1, 2, 0)))
                    r = float(info["reward"][0])
                    replay_rewards.append(r)
                    ended, should_end = bool(terminated[0] or truncated[0]), episode_ended and t == len(actions) - 1
                    if diverged_at is None and (r != rewards[t] or ended != should_end):
                        diverged_at = t
                    if ended:
                        break
        os.replace(part, path)
    finally:
        env.close()
        if part.exists():
            part.unlink()
    steps = len(replay_rewards)
    return Film(path, steps + 1, steps, n < len(actions), diverged_at, replay_rewards)


def _check(args: Args) -> None:
    for name, value, least in (("--eval-steps", args.eval_steps, 1), ("--num-envs", args.num_envs, 1),
                               ("--video-max-frames", args.video_max_frames, 2)):
        if value < least:
            raise EnjoyError(f"{name} must be >= {least}, got {value}")
    if args.eval_episodes is not None and args.eval_episodes < 1:
        raise EnjoyError(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        raise EnjoyError(f"--max-episode-steps must be >= 1, got {args.max_episode_steps}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise EnjoyError(f"--epsilon must be in [0, 1], got {args.epsilon}")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def enjoy(args: Args) -> dict:
    """Evaluate (and film) an agent; prints as it goes, returns what it printed as numbers."""
    import jax

    import qdagger_dqn_atari_jax as dqn
    from reincarnate.evaluation import evaluate, summary

    _check(args)
    if args.env_id is not None:
        tu.check_env_id(args.env_id)  # before loading: a typo should not wait for a download
    ckpt = tu.load_teacher(args.source, iteration=args.iteration)
    run_env = (ckpt.student_args or {}).get("env_id")
    env_id = args.env_id or run_env
    if env_id is None:
        raise EnjoyError(f"--env-id is required: {args.source} is a {ckpt.kind} checkpoint, which does not record its game; "
                         f"pass the game it was trained on, {_game_hint(args.source)}")
    tu.check_env_id(env_id)
    max_episode_steps = int(args.max_episode_steps or ckpt.env_kwargs.get("max_episode_steps", tu.DOPAMINE_ENV_KWARGS["max_episode_steps"]))
    env_kwargs = {**ckpt.env_kwargs, "max_episode_steps": max_episode_steps}

    envs = tu.make_teacher_envs(env_id, args.num_envs, args.seed, **env_kwargs)
    try:
        if envs.num_actions != ckpt.num_actions:
            trained = f" (it was trained on {run_env})" if run_env else ""
            raise EnjoyError(f"the agent has {ckpt.num_actions} actions but {env_id} has {envs.num_actions}{trained}: "
                             f"pass the env id of the game it was trained on with --env-id")
        overrides = ", ".join(f"{k}={v!r}" for k, v in env_kwargs.items())
        print(f"agent: {ckpt.kind} {ckpt.architecture} ({ckpt.num_actions} actions) from {ckpt.path}"
              + (f", iteration {ckpt.iteration}" if ckpt.iteration is not None else ""))
        print(f"env: {env_id}, {args.num_envs} env(s), seed {args.seed}, epsilon {args.epsilon:g}, Dopamine's protocol with {overrides}")
        recorder = _FirstEpisodeRecorder(envs)
        act = dqn.make_act(ckpt.q_values)
        params = jax.device_put(ckpt.params)
        returns, lengths, steps = evaluate(act, params, recorder, args.eval_steps, args.epsilon, jax.random.PRNGKey(args.seed),
                                           desc="enjoy", max_episodes=args.eval_episodes)
    finally:
        envs.close()

    for i, (r, n) in enumerate(zip(returns, lengths), 1):
        print(f"episode {i}: return {r:g}, length {n}")
    line = summary(env_id, returns, steps)
    try:
        rnd = tu.random_score(env_id)
    except tu.EnvIdError:
        rnd = None
    hns = tu.human_normalized_score(env_id, float(np.mean(returns))) if returns and rnd is not None else None
    line += f"; random score {rnd:g}" if rnd is not None else "; random score n/a (not one of the Atari-57)"
    if hns is not None:
        line += f"; human-normalized score {hns:.3f}"
    print(line)
    result = dict(env_id=env_id, returns=returns, lengths=lengths, steps=steps, random_score=rnd, human_normalized_score=hns,
                  actions=recorder.actions, rewards=recorder.rewards, film=None)

    if args.capture_video:
        path = Path(args.video_path or os.path.join("videos", f"{source_name(args.source)}-{env_id}.mp4"))
        if not recorder.actions:
            print("warning: no episode was played, so there is nothing to film")
            return result
        try:
            film = film_episode(env_id, args.seed, ckpt.env_kwargs, max_episode_steps, recorder.actions, recorder.rewards,
                                path, args.video_max_frames, recorder.finished)
        except tu.TeacherError:
            raise
        except OSError as e:
            raise EnjoyError(f"cannot write the video {path} ({e.strerror or e}); pick another --video-path") from None
        except (ValueError, RuntimeError, ImportError) as e:  # no ffmpeg, or an extension imageio cannot encode
            raise EnjoyError(f"cannot encode the video {path} ({type(e).__name__}: {e}); use a .mp4 --video-path and "
                             f"pip install imageio-ffmpeg") from None
        note = (f", cut at --video-max-frames {args.video_max_frames} (the episode has {len(recorder.actions)} steps)"
                if film.cut else "")
        ep = f"return {sum(recorder.rewards):g}, length {len(recorder.actions)}" + ("" if recorder.finished else " so far")
        print(f"video: {film.path}: env 0's first episode ({ep}), {film.frames} frames (reset + {film.steps} steps), "
              f"{SCREEN[0]}x{SCREEN[1]} RGB at {VIDEO_FPS} fps{note}")
        if film.diverged_at is not None:
            t = film.diverged_at
            print(f"warning: the replay for the video diverged from the evaluated episode at step {t + 1} "
                  f"(reward {film.replay_rewards[t]:g} vs {recorder.rewards[t]:g}, or an early episode end): "
                  f"the film may not show the episode that was scored")
        elif not recorder.finished:
            print("warning: the evaluation stopped before the filmed episode ended; the film shows it up to there")
        result["film"] = film
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(Args, args=list(sys.argv[1:] if argv is None else argv), description=DESCRIPTION)
    try:
        enjoy(args)
    except tu.TeacherError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
