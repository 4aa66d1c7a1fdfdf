"""reincarnate_utils/experiments/learning_check.py, issue 25's measure of a student's learning, on the fixture teachers
(random networks: they show the measure works, not learning, which needs the trained teacher issue 25 makes on a GPU)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "reincarnate_utils" / "experiments"))

from learning_check import Check, learning_check  # noqa: E402


def test_a_teacher_agrees_with_itself_and_the_chance_level_is_its_most_frequent_action(fixture_copy):
    teacher = str(fixture_copy("teacher_tf"))
    same = learning_check(Check(teacher=teacher, student=teacher, env_id="Breakout-v5", states=160, eval_steps=200, num_envs=4,
                                max_episode_steps=100))
    assert same["states"] == 160 and same["agreement"] == 1.0
    # A random network presses one action almost everywhere: the level a student must beat is that action's share,
    # not 1 / 4; it is why a random fixture cannot show learning.
    assert 0.9 < same["constant_policy_agreement"] <= 1.0
    assert same["episodes"] >= 1 and same["eval_agent_steps"] >= 200 and same["student_score"] is not None
    other = learning_check(Check(teacher=teacher, student=str(fixture_copy("teacher_jax_linen")), env_id="Breakout-v5", states=160,
                                 eval_steps=0, num_envs=4))
    assert "student_score" not in other and other["states"] == 160  # --eval-steps 0: no score, the agreement alone
