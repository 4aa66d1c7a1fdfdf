"""Did a student learn its teacher's policy? Issue 25's CPU measure, for any teacher and student the scripts load.

    python reincarnate_utils/experiments/learning_check.py TEACHER STUDENT [--env-id Pong-v5] [--states 2000]

Held-out states: the teacher plays (epsilon 0.001, Dopamine's evaluation setting) on envs seeded apart from the
training ones; on each state the student's greedy action is compared with the teacher's. Prints one JSON line:
the agreement rate, the rate a constant policy reaches (the teacher's most frequent action's share: the chance level
to beat), and the student's Dopamine-protocol score (whole episodes until --eval-steps agent steps).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import teacher_utils as tu  # noqa: E402
from reincarnate.evaluation import evaluate  # noqa: E402
from qdagger_dqn_atari_jax import make_act  # noqa: E402  (the scripts' epsilon-greedy act)


@dataclasses.dataclass
class Check:
    teacher: str
    """the teacher: any source load_teacher reads (a run folder, a Dopamine checkpoint, hf://...)"""
    student: str
    """the student: a finished run folder of either script (it loads as a teacher)"""
    env_id: str = "Pong-v5"
    states: int = 2_000
    """held-out teacher states to compare on"""
    eval_steps: int = 10_000
    """the student's score: whole episodes until this many agent steps (Dopamine's protocol); 0 skips it"""
    num_envs: int = 8
    max_episode_steps: int = 27_000
    """the cap of the score's episodes (Dopamine: 27,000 agent steps)"""
    seed: int = 12_345
    """seeds the held-out envs (apart from the scripts' seeds)"""


def learning_check(c: Check) -> dict:
    envs = tu.make_teacher_envs(c.env_id, c.num_envs, seed=c.seed)
    teacher, student = tu.load_teacher(c.teacher, num_actions=envs.num_actions), tu.load_teacher(c.student, num_actions=envs.num_actions)
    teacher_q, student_q = jax.jit(teacher.q_values), jax.jit(student.q_values)
    act_teacher, key = make_act(teacher.q_values), jax.random.PRNGKey(c.seed)
    obs, _ = envs.reset()
    agree, teacher_actions = 0, []
    while len(teacher_actions) < c.states:
        a_t = np.asarray(teacher_q(teacher.params, obs)).argmax(-1)
        agree += int((np.asarray(student_q(student.params, obs)).argmax(-1) == a_t).sum())
        teacher_actions.extend(a_t.tolist())
        actions, _, key = act_teacher(teacher.params, obs, key, 0.001)
        obs, *_ = envs.step(np.asarray(actions))
    envs.close()
    counts = np.bincount(teacher_actions, minlength=envs.num_actions)
    out = {"states": len(teacher_actions), "agreement": agree / len(teacher_actions), "constant_policy_agreement": counts.max() / counts.sum()}
    if c.eval_steps:
        envs = tu.make_teacher_envs(c.env_id, c.num_envs, seed=c.seed + 1, **{**student.env_kwargs, "max_episode_steps": c.max_episode_steps})
        returns, _, steps = evaluate(make_act(student.q_values), student.params, envs, c.eval_steps, 0.001, jax.random.PRNGKey(c.seed + 1))
        envs.close()
        out |= {"student_score": float(np.mean(returns)) if returns else None, "episodes": len(returns), "eval_agent_steps": steps}
    return out


if __name__ == "__main__":
    import tyro

    print(json.dumps(learning_check(tyro.cli(Check))))
