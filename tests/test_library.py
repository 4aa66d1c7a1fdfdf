"""The small units of reincarnate/ that the other tests reach only through whole runs: episode bookkeeping, envs a
resumed run restores exactly, the learning call in flight, a phase's steady rate, the buffers' sizes, the shared flags
and a script's entry point."""

import dataclasses
import re
import time
import typing
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

import qdagger_dqn_atari_jax as dqn
import qdagger_rainbow_atari_jax as rainbow
import teacher_utils as tu
from reincarnate import config, speed
from reincarnate.episodes import ActingEnvs, Episodes
from reincarnate.errors import ConfigError
from reincarnate.replay import plan_buffers, replay_bytes
from reincarnate.run import Interrupted, run_script


def test_episodes_skip_the_auto_reset_step_and_list_what_ended():
    ep = Episodes(2)
    live, done = ep.step(np.array([1.0, 2.0]), np.array([False, False]), np.array([False, False]))
    assert live.all() and not done.any() and ep.finished == []
    live, done = ep.step(np.array([3.0, 5.0]), np.array([True, False]), np.array([False, False]))  # env 0 terminates
    assert ep.finished == [(0, 4.0, 2)] and done.tolist() == [True, False]
    # env 0's next step is envpool's reset: not the agent's (its reward is not counted, nor its step)
    live, done = ep.step(np.array([100.0, 1.0]), np.array([False, False]), np.array([False, True]))  # env 1 truncates
    assert live.tolist() == [False, True] and ep.finished == [(1, 8.0, 3)]
    ep.step(np.array([1.0, 100.0]), np.array([False, False]), np.array([False, False]))
    assert ep.ret.tolist() == [1.0, 0.0] and ep.len.tolist() == [1, 0]
    again = Episodes(2, ep.arrays())
    assert again.ret.tolist() == ep.ret.tolist() and again.resetting.tolist() == ep.resetting.tolist()


def test_acting_envs_are_restored_exactly_from_their_arrays():
    """Replaying the recorded actions on fresh envs (same seed) brings back the emulators, sticky-action RNGs and the
    episodes in progress: the next steps are the same as the uninterrupted envs'."""
    make = lambda: tu.make_teacher_envs("Breakout-v5", 2, seed=7, max_episode_steps=30)  # noqa: E731
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 4, (70, 2))
    envs = ActingEnvs(make(), 200, jax.devices()[0], prefix="x_")
    for a in actions[:45]:
        envs.send(a)
        envs.recv()
    saved = {k: np.asarray(v) for k, v in envs.arrays().items()}
    assert saved["x_action_log"].shape == (45, 2) and set(saved) == {"x_action_log", "x_obs", "x_ep_ret", "x_ep_len", "x_resetting"}
    restored = ActingEnvs(make(), 200, jax.devices()[0], saved.__getitem__, prefix="x_")
    assert np.array_equal(restored.obs, envs.obs) and restored.episodes.len.tolist() == envs.episodes.len.tolist()
    for a in actions[45:]:
        envs.send(a)
        restored.send(a)
        (step_a, live_a, done_a), (step_b, live_b, done_b) = envs.recv(), restored.recv()
        for x, y in zip(step_a, step_b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert live_a.tolist() == live_b.tolist() and done_a.tolist() == done_b.tolist()
    assert envs.episodes.finished == restored.episodes.finished
    envs.close()
    restored.close()


def test_the_learning_call_in_flight_lands_its_results_metrics_and_rate():
    pool, rate = ThreadPoolExecutor(1), speed.SteadyRate()
    flight = speed.InFlight(pool, rate)
    flight.launch(lambda s, r, k: (s + 1, r + 2, k + 3, {"loss": 0.5}), 10, 20, 30, n_updates=0, log_step=None, at=8)
    assert flight.land() == (11, 22, 33) and flight.future is None and flight.unlogged == [] and rate.t is None  # nothing learned yet
    flight.launch(lambda s, r, k: (s, r, k, {"loss": 0.25}), 1, 2, 3, n_updates=2, log_step=16, at=16)
    assert flight.land() == (1, 2, 3) and flight.unlogged == [(16, {"loss": 0.25})] and rate.n0 == 16
    pool.shutdown()


def test_steady_rate_counts_from_its_start_and_excludes_pauses(monkeypatch):
    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    rate = speed.SteadyRate()
    assert np.isnan(rate(50))  # nothing timed yet
    rate.start(40)  # t = 100
    rate.start(60)  # a second start changes nothing
    rate.pause(4.0)
    assert rate(100) == pytest.approx((100 - 40) / (110 - 100 - 4))  # t = 110


def test_plan_buffers_by_hand():
    # 1,000 roll-out steps on 4 envs: ceil((1000 + 32) / 4) = 258 rows per env (+ 8 per env for episodes' last frames);
    # a 2,000-row Dopamine stream first; the student's 10,000 transitions as 4 streams of 2,500.
    plan = plan_buffers(2_000, 1_000, 4, 10_000, num_actions=6, online_q_dim=0)
    assert plan.teacher_lengths == [2_000, 258, 258, 258, 258] and plan.online_lengths == [2_500] * 4
    assert plan.teacher_bytes == (2_000 + 4 * 258) * (84 * 84 + 1 + 4 + 1 + 1 + 4 * 6) == replay_bytes(plan.teacher_lengths, 6)
    # a checkpoint's peak: keep + 1 copies of the student's replay beside the teacher data, or of the teacher data alone
    assert plan.checkpoint_bytes(2) == max(2 * plan.teacher_bytes, plan.teacher_bytes + 2 * plan.online_bytes)
    assert plan_buffers(0, 0, 2, 100, 4, 4).teacher_bytes == 0


def test_the_flags_every_student_shares_are_declared_once():
    """RunArgs (what does not change what is learned: a resumed run may change it) and ProtocolArgs (Dopamine's
    protocol, the teacher, the baselines' knobs) are the bases of both scripts' Args; no script redeclares them."""
    assert config.RUNTIME_FLAGS == {f.name for f in dataclasses.fields(config.RunArgs)}
    shared = {f.name for f in dataclasses.fields(config.ProtocolArgs)}
    for script in (dqn, rainbow):
        assert issubclass(script.Args, config.ProtocolArgs)
        own = set(script.Args.__dataclass_fields__) - shared
        assert own and not own & shared and set(vars(script.Args)["__annotations__"]) == own


def test_a_scripts_entry_point_turns_errors_into_one_line_and_interrupts_into_130(capsys):
    def fails(args):
        raise ConfigError("--thing must be > 0 (got -1)")

    def interrupted(args):
        raise Interrupted("SIGINT in phase online: checkpoint written; resume with `python x.py --resume --run-name r`")

    for main, code, line in ((fails, 1, "error: --thing must be > 0 (got -1)"), (interrupted, 130, "interrupted: SIGINT in phase online")):
        with pytest.raises(SystemExit) as exit_:
            run_script(main, lambda: None)
        assert exit_.value.code == code and capsys.readouterr().err.startswith(line)


def numeric_fields(args_cls) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(args_cls)
    out = []
    for f in dataclasses.fields(args_cls):
        kinds = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t in (int, float)]
        if kinds and hints[f.name] is not bool:
            out.append((f.name, kinds[0]))
    return out


@pytest.mark.parametrize("script", [dqn, rainbow], ids=["dqn", "rainbow"])
def test_every_numeric_flag_has_its_range_checked(script):
    """Walks every int and float flag of the script's Args: each has a range (reincarnate/config.py RANGES, or is
    v_min/v_max, checked together), its default passes, and a value just outside is one ConfigError naming the flag."""
    fields = numeric_fields(script.Args)
    assert len(fields) > 40
    defaults = script.Args()
    config.check_args(defaults)
    for name, kind in fields:
        if name in config.UNBOUNDED:
            continue
        assert name in config.RANGES, f"--{name} has no range"
        low, high, low_open, high_open = config.RANGES[name]
        bad = [low - (1 if kind is int else 1e-3)] if not low_open else [low, low - 1]
        if high is not None:
            bad.append(high + (1 if kind is int else 1e-3))
        for value in bad:
            with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')} must be "):
                config.check_args(dataclasses.replace(defaults, **{name: kind(value)}))
    if hasattr(defaults, "v_min"):
        with pytest.raises(ConfigError, match="--v-min must be below --v-max"):
            config.check_args(dataclasses.replace(defaults, v_min=3.0, v_max=-3.0))


def test_the_reported_cases_are_refused():
    """issue 26: a negative learning rate trained by gradient ascent and exited 0; gamma 1.5 was accepted."""
    for changes, flag in ((dict(learning_rate=-0.0001), "--learning-rate must be > 0"), (dict(gamma=1.5), "--gamma must be in [0, 1]"),
                          (dict(online_learning_rate=-1e-4), "--online-learning-rate must be > 0"), (dict(adam_eps=0.0), "--adam-eps must be > 0")):
        with pytest.raises(ConfigError, match=re.escape(flag)):
            config.check_args(dataclasses.replace(dqn.Args(), **changes))


def test_sizes_are_told_in_a_unit_that_shows_the_number(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from reincarnate.run import binary_size, check_output_folder

    assert [binary_size(n) for n in (512, 30 * 2**20, 6.6 * 2**30)] == ["512 B", "30.0 MiB", "6.6 GiB"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(2**30, 2**30 - 30 * 2**20, 30 * 2**20))
    with pytest.raises(tu.RunError, match=r"need 1\.0 GiB on disk but .* has 30\.0 MiB free"):
        check_output_folder(tmp_path / "runs" / "x", 2**30, "the checkpoints")


def test_the_event_log_is_on_disk_up_to_every_record_when_flush_returns(tmp_path):
    """A checkpoint stores the event file's size after a flush and a resume cuts the file there, so every record
    logged before the flush must lie within that size (tensorboardX's flush left queued records out: a run killed
    after its checkpoint lost the last logged step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reincarnate.run import EventLog

    log = EventLog(tmp_path / "run")
    log.text("hyperparameters", "|param|value|\n|-|-|\n|seed|1|")
    for step in range(1, 2001):
        log.scalar("offline/loss", 1.0 / step, step)
    log.flush()
    (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
    cut = tmp_path / "cut" / events.name
    cut.parent.mkdir()
    cut.write_bytes(events.read_bytes()[: events.stat().st_size])  # what a resume keeps, read at once as a kill would
    log.close()
    acc = EventAccumulator(str(cut.parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("offline/loss")] == list(range(1, 2001))
    assert acc.Scalars("offline/loss")[-1].value == pytest.approx(1 / 2000)
    assert acc.Tags()["tensors"] == ["hyperparameters/text_summary"]
