"""The Atari environments and scores: envpool Atari on Dopamine's protocol (:func:`make_teacher_envs`,
:class:`DopamineAtariEnvs`, :data:`DOPAMINE_ENV_KWARGS`) or on CleanRL's (:data:`CLEANRL_ENV_KWARGS`), env ids
(:func:`check_env_id`, :func:`game_from_env_id`), and the reference scores that normalise a return
(:data:`ATARI_SCORES`, :func:`teacher_normalized_score`)."""

from __future__ import annotations

import difflib
import re
from typing import Any

import numpy as np

from reincarnate.errors import EnvIdError, TeacherError


# ----------------------------------------------------------------------------
# Reference scores (Atari-57): G_R for the teacher-normalized score
# ----------------------------------------------------------------------------
# (random, human) per game, bucket CamelCase names. Random scores are those the
# Reincarnating RL code normalises with (Video Pinball's random score is 0 there,
# 16,256.9 in some other tables); human scores are the standard professional
# tester scores (DQN Nature / dqn_zoo).
ATARI_SCORES: dict[str, tuple[float, float]] = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3), "Asteroids": (719.1, 47388.7), "Atlantis": (12850.0, 29028.1),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "BeamRider": (363.9, 16926.5),
    "Berzerk": (123.7, 2630.4), "Bowling": (23.1, 160.7), "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5), "Centipede": (2090.9, 12017.0), "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4), "Defender": (2874.5, 18688.9), "DemonAttack": (152.1, 1971.0),
    "DoubleDunk": (-18.6, -16.4), "Enduro": (0.0, 860.5), "FishingDerby": (-91.7, -38.7),
    "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5),
    "Gravitar": (173.0, 3351.4), "Hero": (1027.0, 30826.4), "IceHockey": (-11.2, 0.9),
    "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MontezumaRevenge": (0.0, 4753.3), "MsPacman": (307.3, 6951.6),
    "NameThisGame": (2292.3, 8049.0), "Phoenix": (761.4, 7242.6), "Pitfall": (-229.4, 6463.7),
    "Pong": (-20.7, 14.6), "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0),
    "Riverraid": (1338.5, 17118.0), "RoadRunner": (11.5, 7845.0), "Robotank": (2.2, 11.9),
    "Seaquest": (68.4, 42054.7), "Skiing": (-17098.1, -4336.9), "Solaris": (1236.3, 12326.7),
    "SpaceInvaders": (148.0, 1668.7), "StarGunner": (664.0, 10250.0), "Surround": (-10.0, 6.5),
    "Tennis": (-23.8, -8.3), "TimePilot": (3568.0, 5229.2), "Tutankham": (11.4, 167.6),
    "UpNDown": (533.4, 11693.2), "Venture": (0.0, 1187.5), "VideoPinball": (0.0, 17667.9),
    "WizardOfWor": (563.5, 4756.5), "YarsRevenge": (3092.9, 54576.9), "Zaxxon": (32.5, 9173.3),
}


def random_score(env_id_or_game: str) -> float:
    """G_R: the random agent's score of a game (env id or CamelCase game)."""
    game = game_from_env_id(env_id_or_game) if re.search(r"-v\d+$", env_id_or_game) else env_id_or_game
    if game not in ATARI_SCORES:
        raise EnvIdError(f"no random score for {game!r}: normalised scores cover the 57 Atari games ({', '.join(list(ATARI_SCORES)[:4])}, ...)")
    return ATARI_SCORES[game][0]


def human_normalized_score(env_id_or_game: str, score: float) -> float:
    """(score - random) / (human - random)."""
    game = game_from_env_id(env_id_or_game) if re.search(r"-v\d+$", env_id_or_game) else env_id_or_game
    rnd, human = ATARI_SCORES[game] if game in ATARI_SCORES else (random_score(game), 0.0)
    return (score - rnd) / (human - rnd)


def teacher_normalized_score(student_score: float, teacher_score: float, random_score: float) -> float:
    """(G_S - G_R) / (G_T - G_R): 1 means the student matches its teacher."""
    if teacher_score <= random_score:
        raise ValueError(f"teacher score {teacher_score:g} is not above the random score {random_score:g}")
    return (student_score - random_score) / (teacher_score - random_score)


# ----------------------------------------------------------------------------
# Atari environments on Dopamine's protocol
# ----------------------------------------------------------------------------
DOPAMINE_ENV_KWARGS: dict[str, Any] = dict(
    repeat_action_probability=0.25,  # sticky actions (Machado et al. 2018)
    noop_max=1,  # no no-op starts; envpool 1.2.5 segfaults on noop_max=0
    use_fire_reset=False,
    episodic_life=False,
    reward_clip=False,  # we log the raw score and clip for learning ourselves
    frame_skip=4,
    img_height=84,
    img_width=84,
    stack_num=4,
    gray_scale=True,
    use_inter_area_resize=True,
    max_episode_steps=27_000,
    full_action_space=False,
)


CLEANRL_ENV_KWARGS: dict[str, Any] = dict(
    repeat_action_probability=0.0,  # NoFrameskip-v4: no sticky actions
    noop_max=30,  # NoopResetEnv(noop_max=30)
    use_fire_reset=True,  # FireResetEnv on games with FIRE
    episodic_life=False,  # see below
    zero_stack_start=False,  # gym's FrameStack repeats the reset frame
)
"""What CleanRL's ``dqn_atari_jax.py`` agents were trained on, as :func:`make_teacher_envs` overrides.

CleanRL wraps ``<Game>NoFrameskip-v4`` (no sticky actions, minimal action set) in
up-to-30 no-op starts, max-and-skip 4, life-loss terminals, FIRE on reset, reward
clipping, an INTER_AREA resize to 84x84, grayscale and a 4-frame stack whose
older slots repeat the reset frame.  Its life-loss terminals only shape its
training targets (it records and reports whole-game returns, counted before that
wrapper), so evaluations and roll-outs here play whole games: ``episodic_life``
stays False.  The episode cap is left to the caller (``max_episode_steps``)."""


def atari_env_ids() -> list[str]:
    """The envpool Atari ids (``Breakout-v5``, ...)."""
    from envpool.registration import registry

    return sorted(i for i, spec in registry.specs.items() if spec[0] == "envpool.atari")


def check_env_id(env_id: str) -> str:
    """Return ``env_id`` if envpool has it as an Atari game, else raise with close matches."""
    candidates = atari_env_ids()
    if env_id in candidates:
        return env_id
    key = env_id.split("/")[-1].replace("NoFrameskip", "").replace("-v4", "-v5")
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "teacher_utils.atari_env_ids() lists them"
    raise EnvIdError(f"unknown Atari env id {env_id!r}: envpool ids look like Breakout-v5; {hint}")


def game_from_env_id(env_id: str) -> str:
    """``"Breakout-v5"`` -> ``"Breakout"`` (the bucket's CamelCase game name)."""
    name = env_id.split("/")[-1]
    name = re.sub(r"(NoFrameskip)?-v\d+$", "", name)
    if not name:
        raise EnvIdError(f"cannot derive a game name from env id {env_id!r}; use an id like Breakout-v5")
    return name[0].upper() + name[1:]


class DopamineAtariEnvs:
    """envpool Atari with Dopamine's state: older stack slots are zero at an
    episode's start (Dopamine's replay pads with zero frames, envpool repeats
    the reset frame).  Gymnasium 5-tuple API; observations (N, 4, 84, 84) uint8.
    envpool auto-resets: the step after a terminated/truncated one returns the
    first observation of a new episode (reward 0, the action ignored).

    ``zero_stack_start=False`` (not an envpool option) keeps envpool's own stacks,
    whose older slots repeat the reset frame, as gym's ``FrameStack`` (CleanRL).
    """

    def __init__(self, env_id: str, num_envs: int, seed: int, zero_stack_start: bool = True, **overrides: Any):
        import envpool

        check_env_id(env_id)
        if num_envs < 1:
            raise TeacherError(f"num_envs must be >= 1, got {num_envs}")
        kwargs = {**DOPAMINE_ENV_KWARGS, **overrides}
        self.stack_num = int(kwargs["stack_num"])
        self.zero_stack_start = bool(zero_stack_start)
        self.envs = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed, **kwargs)
        self.env_id = env_id
        self.num_envs = num_envs
        self.config = dict(self.envs.config)
        self.single_action_space = self.envs.action_space
        self.single_observation_space = self.envs.observation_space
        self.num_actions = int(self.single_action_space.n)

    def _zero_old_slots(self, obs: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        if not self.zero_stack_start:
            return obs
        # A state at episode step t holds min(t + 1, 4) real frames.
        slots = np.arange(self.stack_num)[None, :]
        stale = slots < (self.stack_num - 1 - np.asarray(elapsed)[:, None])
        if stale.any():
            obs[stale] = 0
        return obs

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = self.envs.reset(**kwargs)
        return self._zero_old_slots(obs, info["elapsed_step"]), info

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        self.send(actions)
        return self.recv()

    def send(self, actions: np.ndarray) -> None:
        """The first half of ``step``: the emulators start stepping in envpool's threads and this returns at once,
        so the caller can launch device work meanwhile; ``recv`` waits for the result (always all envs, in order)."""
        self.envs.send(np.asarray(actions))

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.envs.recv()
        return self._zero_old_slots(obs, info["elapsed_step"]), reward, terminated, truncated, info

    def close(self) -> None:
        self.envs.close()


def make_teacher_envs(env_id: str, num_envs: int, seed: int, zero_stack_start: bool = True, **overrides: Any) -> DopamineAtariEnvs:
    """envpool Atari configured as Dopamine trained its DQN teachers.

    Sticky actions 0.25, no no-op starts, no FIRE on reset, no life-loss
    terminals, 27,000-step cap, zeroed older stack slots at episode start.
    ``overrides`` replace any envpool option (e.g.
    ``repeat_action_probability=0.0`` for deterministic comparisons);
    ``zero_stack_start=False`` repeats the reset frame in the older slots
    instead.  A teacher's own settings are ``make_teacher_envs(env_id, n, seed,
    **teacher.env_kwargs)`` (:attr:`TeacherCheckpoint.env_kwargs`).
    """
    return DopamineAtariEnvs(env_id, num_envs, seed, zero_stack_start=zero_stack_start, **overrides)


def normalized_score(student_score: float | None, teacher_score: float | None, random_score: float) -> float | None:
    """The teacher-normalized score, or None where it means nothing: a missing score, or a teacher no better than random."""
    if student_score is None or teacher_score is None or teacher_score <= random_score:
        return None
    return teacher_normalized_score(student_score, teacher_score, random_score)


def env_num_actions(env_id: str) -> int:
    """The action count of an envpool Atari game (its minimal action set), read off a one-env pool."""
    envs = make_teacher_envs(env_id, 1, seed=0)
    try:
        return envs.num_actions
    finally:
        envs.close()
