"""reincarnate_utils/enjoy.py: evaluate any agent on the envs it was trained on and film its first episode in colour.

- the Dopamine TF fixture teacher (a random 4-action network), run as a script: the printed episodes and summary,
  and the mp4 read back (frame count = episode length + 1 for the reset frame, 210x160 RGB, colour);
- a run folder as qdagger_dqn_atari_jax.py --save-model writes it (args.json + model + q_probe.npz, built here with
  the script's own make_student and flax.serialization.to_bytes), run as a module: its own env id and episode cap;
- the RGB replay behind the film reproduces the evaluated episode's rewards and end (several envs, natural game over;
  a CleanRL model's no-op starts and FIRE reset), the film is cut at --video-max-frames, and a divergence is detected;
- errors (missing source, wrong or unknown --env-id, no --env-id) are one `error:` line and exit 1.

CPU, offline, no training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax
import imageio.v2 as imageio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdagger_dqn_atari_jax as dqn
from reincarnate_utils import enjoy

# Reading an mp4 (and running the CLI) starts a subprocess from this JAX process: fork and exec at once, no deadlock.
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "reincarnate_utils" / "enjoy.py"
ENV = "Breakout-v5"


def run_cli(args: list[str], cwd: Path, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "reincarnate_utils.enjoy"] if module else [sys.executable, str(SCRIPT)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def read_video(path: Path) -> np.ndarray:
    with imageio.get_reader(path) as r:
        assert r.get_meta_data()["fps"] == enjoy.VIDEO_FPS
        return np.stack([frame for frame in r.iter_data()])  # list(r) would trust len(r), which is inf here


def episodes(stdout: str) -> list[tuple[float, int]]:
    return [(float(r), int(n)) for r, n in re.findall(r"^episode \d+: return (\S+), length (\d+)$", stdout, re.M)]


def assert_colour_film(path: Path, frames: int) -> None:
    video = read_video(path)
    assert video.shape == (frames, 210, 160, 3)  # exact size: no padding to a multiple of 16
    assert (video[..., 0].astype(int) != video[..., 1]).any()  # colour, not grey
    assert video[-1].std() > 0  # a picture, not a blank frame


# ----------------------------------------------------------------------------
# A Dopamine checkpoint, run as a script
# ----------------------------------------------------------------------------
def test_dopamine_teacher_script_prints_episodes_and_films_the_first(fixture_copy, tmp_path):
    p = run_cli([fixture_copy("teacher_tf"), "--env-id", ENV, "--max-episode-steps", 60, "--eval-steps", 100, "--capture-video"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # Episodes of 60 steps, counted whole: the budget of 100 steps ends inside the second one.
    eps = episodes(p.stdout)
    assert [n for _, n in eps] == [60, 60]
    mean = np.mean([r for r, _ in eps])
    summary = next(line for line in p.stdout.splitlines() if line.startswith(f"{ENV}: mean return"))
    assert f"mean return {mean:.1f} +- " in summary and "over 2 episodes (120 agent steps)" in summary
    assert "random score 1.7" in summary
    assert f"human-normalized score {(mean - 1.7) / (30.5 - 1.7):.3f}" in summary
    # Default path videos/<source name>-<env id>.mp4 (relative to the working folder); reset frame + 60 steps.
    film = tmp_path / "videos" / f"teacher_tf-{ENV}.mp4"
    assert f"video: videos/teacher_tf-{ENV}.mp4: env 0's first episode" in p.stdout and "61 frames (reset + 60 steps)" in p.stdout
    assert_colour_film(film, 61)
    assert "warning" not in p.stdout and "Traceback" not in p.stderr
    assert not list((tmp_path / "videos").glob("*.part*"))


def test_help_opens_with_a_description_and_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        enjoy.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    head = out.split("╭")[0]
    assert "Evaluate a trained agent" in head and "Example: python reincarnate_utils/enjoy.py" in head
    for flag in ("--env-id", "--eval-steps", "--eval-episodes", "--num-envs", "--epsilon", "--seed", "--max-episode-steps",
                 "--capture-video", "--video-path", "--video-max-frames", "--iteration"):
        assert flag in out


# ----------------------------------------------------------------------------
# A run folder of qdagger_dqn_atari_jax.py, run as a module
# ----------------------------------------------------------------------------
def write_dqn_run(folder: Path, max_episode_steps: int) -> Path:
    """A run folder as `qdagger_dqn_atari_jax.py --save-model` leaves it, with random params of the script's own network."""
    args = dqn.Args(env_id=ENV, network="nature", save_model=True, max_episode_steps=max_episode_steps, seed=3)
    student = dqn.make_student(args.network, 4)
    shapes = jax.eval_shape(student.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 4, 84, 84), jnp.uint8))
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) / np.sqrt(max(np.prod(x.shape[:-1]), 20))).astype(np.float32), shapes)
    obs = rng.integers(0, 256, (4, 4, 84, 84), dtype=np.uint8)
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    (folder / f"{args.exp_name}.cleanrl_model").write_bytes(flax.serialization.to_bytes(params))
    np.savez(folder / "q_probe.npz", obs=obs, q=np.asarray(student.apply(params, obs)))
    return folder


def test_run_folder_plays_its_own_game_and_cap_as_a_module(tmp_path):
    run = write_dqn_run(tmp_path / "runs" / f"{ENV}__qdagger_dqn_atari_jax__qdagger__3__1", max_episode_steps=40)
    video = tmp_path / "film" / "run.mp4"
    p = run_cli([run, "--eval-steps", 50, "--capture-video", "--video-path", video], cwd=ROOT, module=True)
    assert p.returncode == 0, p.stderr
    assert "agent: student dopamine-nature-dqn (4 actions)" in p.stdout
    assert f"env: {ENV}, 1 env(s)" in p.stdout and "max_episode_steps=40" in p.stdout  # the run's env id and episode cap
    eps = episodes(p.stdout)
    assert len(eps) >= 2 and sum(n for _, n in eps[:-1]) < 50 <= sum(n for _, n in eps)
    assert all(n <= 40 for _, n in eps)
    first = int(re.search(r"env 0's first episode \(return \S+, length (\d+)\), (\d+) frames", p.stdout).group(1))
    assert first == eps[0][1]
    assert_colour_film(video, first + 1)


# ----------------------------------------------------------------------------
# The replay behind the film
# ----------------------------------------------------------------------------
def test_replay_reproduces_the_evaluated_episode(fixture_copy, tmp_path, capsys):
    # Random actions (epsilon 1) over two envs until a natural game over: rewards, sticky actions, and env 0 of several.
    args = enjoy.Args(source=str(fixture_copy("teacher_tf")), env_id=ENV, eval_steps=1, num_envs=2, epsilon=1.0, seed=2,
                      capture_video=True, video_path=str(tmp_path / "full.mp4"))
    result = enjoy.enjoy(args)
    film = result["film"]
    n = len(result["actions"])
    assert n in result["lengths"] and sum(result["rewards"]) in result["returns"]
    assert sum(result["rewards"]) > 0 and n < 27_000  # some reward, and the game ended (not the cap)
    assert film.diverged_at is None and not film.cut
    assert film.replay_rewards == result["rewards"]  # the RGB replay scored exactly what was evaluated, step by step
    assert film.frames == n + 1
    assert_colour_film(tmp_path / "full.mp4", n + 1)
    out = capsys.readouterr().out
    assert "warning" not in out

    # Cut at --video-max-frames: the first frames of the same episode, and the output says so.
    short = dataclasses.replace(args, video_path=str(tmp_path / "short.mp4"), video_max_frames=20)
    cut = enjoy.enjoy(short)
    assert cut["actions"] == result["actions"] and cut["film"].cut and cut["film"].frames == 20
    assert cut["film"].replay_rewards == result["rewards"][:19] and cut["film"].diverged_at is None
    assert f"cut at --video-max-frames 20 (the episode has {n} steps)" in capsys.readouterr().out
    full, part = read_video(tmp_path / "full.mp4"), read_video(tmp_path / "short.mp4")
    assert part.shape == (20, 210, 160, 3)
    assert np.abs(full[:20].astype(int) - part).mean() < 2  # the same pictures (up to the lossy encoding)

    # A replay that does not match is noticed: other rewards, or another seed's game.
    actions, rewards = result["actions"], list(result["rewards"])
    k = int(np.flatnonzero(rewards)[0])
    rewards[k] += 1
    bad = enjoy.film_episode(ENV, 2, {}, 27_000, actions, rewards, tmp_path / "bad.mp4", 4_500)
    assert bad.diverged_at == k
    other = enjoy.film_episode(ENV, 99, {}, 27_000, actions, result["rewards"], tmp_path / "other.mp4", 4_500)
    assert other.diverged_at is not None


def test_cleanrl_model_replays_with_its_noop_starts_and_fire_reset(tmp_path):
    # CleanRL's settings draw up to 30 no-ops at reset from the env's seed: the replay must draw the same ones.
    import teacher_utils as tu

    net = tu.CleanRLQNetwork(4)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 84, 84), jnp.uint8))
    model = tmp_path / "dqn_atari_jax.cleanrl_model"
    model.write_bytes(flax.serialization.to_bytes(params))
    args = enjoy.Args(source=str(model), env_id=ENV, eval_steps=10_000, eval_episodes=1, epsilon=0.5, seed=4,
                      capture_video=True, video_path=str(tmp_path / "cleanrl.mp4"))
    result = enjoy.enjoy(args)
    assert len(result["returns"]) == 1  # --eval-episodes caps the episodes before the step budget does
    assert sum(result["rewards"]) > 0 and result["film"].diverged_at is None
    assert result["film"].replay_rewards == result["rewards"]
    assert result["film"].frames == result["lengths"][0] + 1


# ----------------------------------------------------------------------------
# Errors: one line, exit 1
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["{missing}", "--env-id", ENV], "does not exist"),
        (["{teacher}", "--env-id", "Pong-v5"], "the agent has 4 actions but Pong-v5 has 6"),
        (["{teacher}", "--env-id", "Breakot-v5"], "did you mean Breakout-v5"),
        (["{teacher}"], "--env-id is required"),
        (["{teacher}", "--env-id", ENV, "--num-envs", "0"], "--num-envs must be >= 1"),
    ],
)
def test_errors_are_one_line(fixture_copy, tmp_path, capsys, argv, expected):
    fill = {"missing": str(tmp_path / "no_such_run"), "teacher": str(fixture_copy("teacher_tf"))}
    code = enjoy.main([a.format(**fill) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err and "episode" not in out


def test_error_exit_code_from_the_script(tmp_path):
    p = run_cli([tmp_path / "nothing_here", "--env-id", ENV], cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_source_names():
    assert enjoy.source_name("/data/DQN_400/Breakout/1") == "Breakout-1"
    assert enjoy.source_name("/data/DQN_400/Breakout/1/checkpoints/") == "Breakout-1"
    assert enjoy.source_name("runs/my_run/") == "my_run"
    assert enjoy.source_name("runs/my_run/qdagger_dqn_atari_jax.cleanrl_model") == "qdagger_dqn_atari_jax"
    assert enjoy.source_name("hf://cleanrl/BreakoutNoFrameskip-v4-dqn_atari_jax-seed1/dqn_atari_jax.cleanrl_model") == "BreakoutNoFrameskip-v4-dqn_atari_jax-seed1"
    assert enjoy.source_name("gs://rl_checkpoints/DQN_400/Pong/2") == "Pong-2"
