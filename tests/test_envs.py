"""make_teacher_envs: Dopamine's Atari protocol on envpool."""

import numpy as np
import pytest

import teacher_utils as tu


def test_dopamine_settings_and_overrides():
    envs = tu.make_teacher_envs("Breakout-v5", 2, seed=0)
    cfg = envs.config
    assert cfg["repeat_action_probability"] == pytest.approx(0.25)
    assert cfg["noop_max"] == 1
    assert cfg["use_fire_reset"] is False
    assert cfg["episodic_life"] is False
    assert cfg["reward_clip"] is False
    assert cfg["max_episode_steps"] == 27_000
    assert cfg["full_action_space"] is False
    assert (cfg["frame_skip"], cfg["img_height"], cfg["img_width"], cfg["stack_num"]) == (4, 84, 84, 4)
    assert cfg["gray_scale"] and cfg["use_inter_area_resize"]
    assert envs.num_actions == 4  # Breakout's minimal action set
    envs.close()

    envs = tu.make_teacher_envs("Breakout-v5", 1, seed=0, repeat_action_probability=0.0, max_episode_steps=100)
    assert envs.config["repeat_action_probability"] == 0.0
    assert envs.config["max_episode_steps"] == 100
    envs.close()


def test_older_slots_are_zero_at_episode_start_and_after_autoreset():
    # A 6-step cap makes every episode end by truncation, so an auto-reset happens.
    envs = tu.make_teacher_envs("Breakout-v5", 3, seed=1, max_episode_steps=6)
    obs, info = envs.reset()
    assert obs.shape == (3, 4, 84, 84) and obs.dtype == np.uint8

    def real_frames(o):  # slots with any nonzero pixel (an Atari screen is never all black here)
        return [int(o[:, k].reshape(3, -1).max(axis=1).min() > 0) for k in range(4)]

    assert real_frames(obs) == [0, 0, 0, 1]
    seen = [real_frames(obs)]
    for t in range(8):
        obs, reward, terminated, truncated, info = envs.step(np.ones(3, dtype=np.int32))
        seen.append(real_frames(obs))
        if t == 5:
            assert truncated.all() and not terminated.any()
    assert seen[:5] == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    # step 7 is the auto-reset: a fresh episode, older slots zero again.
    assert seen[7] == [0, 0, 0, 1] and seen[8] == [0, 0, 1, 1]
    envs.close()


def test_stack_shifts_frames_oldest_first():
    envs = tu.make_teacher_envs("Breakout-v5", 1, seed=3, repeat_action_probability=0.0)
    obs, _ = envs.reset()
    frames = [obs[0, 3].copy()]
    for _ in range(5):
        obs, *_ = envs.step(np.array([3]))
        frames.append(obs[0, 3].copy())
        k = min(len(frames), 4)
        for j in range(k):
            np.testing.assert_array_equal(obs[0, 3 - j], frames[-1 - j])
    envs.close()


def test_send_then_recv_is_a_step():
    """The scripts split each step into send (the emulators start) and recv, launching device work between them;
    that must give exactly envpool's synchronous step, auto-resets and zeroed stack slots included."""
    a = tu.make_teacher_envs("Breakout-v5", 3, seed=5, max_episode_steps=7)
    b = tu.make_teacher_envs("Breakout-v5", 3, seed=5, max_episode_steps=7)
    np.testing.assert_array_equal(a.reset()[0], b.reset()[0])
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(20):
        actions = rng.integers(0, 4, 3)
        raw = a.envs.step(actions)  # envpool's own synchronous step, then the same zeroing
        expected = (a._zero_old_slots(raw[0], raw[4]["elapsed_step"]), *raw[1:4])
        b.send(actions)
        _ = np.ones((64, 64)) @ np.ones((64, 64))  # other work while the emulators step
        got = b.recv()
        for x, y in zip(expected, got[:4]):
            np.testing.assert_array_equal(x, y)
        ends += int((got[2] | got[3]).sum())
    assert ends >= 3  # auto-resets were crossed
    a.close()
    b.close()


@pytest.mark.parametrize("bad", ["Breakout-v4", "breakout", "BreakoutNoFrameskip-v4", "Ant-v4"])
def test_unknown_env_id_lists_close_matches(bad):
    with pytest.raises(tu.EnvIdError) as e:
        tu.make_teacher_envs(bad, 1, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg
    if bad != "Ant-v4":
        assert "Breakout-v5" in msg


def test_atari_ids_and_game_names():
    ids = tu.atari_env_ids()
    assert "Breakout-v5" in ids and "SpaceInvaders-v5" in ids and "Pong-v5" in ids
    assert all(i.endswith("-v5") for i in ids)
    assert tu.game_from_env_id("SpaceInvaders-v5") == "SpaceInvaders"
    assert tu.game_from_env_id("Breakout-v5") == "Breakout"
    assert tu.game_from_env_id("ALE/MsPacman-v5") == "MsPacman"
