"""Unit tests of qdagger_dqn_atari_jax.py and what it uses from reincarnate/: the
QDagger loss and update (with and without the teacher), n-step targets, the
schedules (reincarnate/training.py), the frame replay buffer (reincarnate/replay.py,
uniform as the DQN's), the networks, the flag checks (reincarnate/config.py) and the
GPU launch flags a script sets at import.

Expected values are computed here by hand / with plain numpy, independently of
the script's code. The replay tests drive the device replay (through
tests/replay_adapter.py) with synthetic
frames that encode (env, episode, step) in their pixels, through an
envpool-style simulator (auto-reset: the step after an episode end returns the
reset observation and is skipped by the buffer), and check every sampled
transition against a ground truth kept by the simulator.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdagger_dqn_atari_jax as q
import teacher_utils as tu
from reincarnate import config, replay, training
from reincarnate.errors import ConfigError
from replay_adapter import DeviceReplay

N_STEP = 3


# ============================================================================
# helpers: numpy reference math
# ============================================================================
def np_softmax(x):
    x = np.asarray(x, np.float64)
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_kl(p, r):
    """KL(p || r) per row."""
    return np.sum(p * (np.log(p) - np.log(r)), axis=-1)


def np_huber(x, delta=1.0):
    x = np.abs(np.asarray(x, np.float64))
    return np.where(x <= delta, 0.5 * x**2, delta * (x - 0.5 * delta))


# ============================================================================
# 1. QDagger loss
# ============================================================================
def test_distillation_loss_closed_form_and_direction():
    """KL(p_T || p_S) with the teacher FIRST: a 2-action case solved by hand.

    teacher [0, 0] -> p_T = [1/2, 1/2]; student [0, ln 3] (tau = 1) -> p_S = [1/4, 3/4].
    KL(T||S) = 1/2 ln(4/3) = 0.143841; the reverse KL(S||T) = 3/4 ln 1.5 - 1/4 ln 2 = 0.130812.
    """
    teacher = jnp.array([[0.0, 0.0]])
    student = jnp.array([[0.0, math.log(3.0)]])
    forward = 0.5 * math.log(4.0 / 3.0)
    reverse = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    got = float(q.distillation_loss(teacher, student, 1.0))
    assert got == pytest.approx(forward, rel=1e-5)
    assert abs(got - reverse) > 1e-2  # not the reverse direction
    # swapping the arguments gives the reverse KL
    assert float(q.distillation_loss(student, teacher, 1.0)) == pytest.approx(reverse, rel=1e-5)


def test_distillation_loss_temperature_hand_values():
    """tau divides both Q's inside the softmaxes: tau = 0.1 vs 1.0 on the same Q's."""
    teacher = jnp.array([[0.0, 0.0]])
    student = jnp.array([[0.0, math.log(3.0)]])
    # tau = 0.1: p_S = [1, 3^10] / (1 + 3^10); KL = 1/2 ln(1/4 / (p0 p1)) = 1/2 ln((1 + 3^10)^2 / (4 * 3^10))
    hand_01 = 0.5 * math.log((1 + 3**10) ** 2 / (4 * 3**10))
    assert float(q.distillation_loss(teacher, student, 0.1)) == pytest.approx(hand_01, rel=1e-5)
    assert float(q.distillation_loss(teacher, student, 1.0)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # the same KL at tau = 0.1 needs Q's 10x closer: student [0, 0.1 ln 3]
    student_small = jnp.array([[0.0, 0.1 * math.log(3.0)]])
    assert float(q.distillation_loss(teacher, student_small, 0.1)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-4)


def test_distillation_loss_batch_mean_matches_numpy():
    """Batch of 3 with 4 actions: mean over the batch of the per-row KL (numpy reference), tau = 0.1 and 1."""
    teacher = np.array([[1.0, 0.2, -0.3, 0.5], [0.0, 0.1, 0.2, 0.3], [2.0, -1.0, 0.0, 0.4]], np.float32)
    student = np.array([[0.8, 0.4, -0.1, 0.5], [0.3, 0.0, 0.2, 0.1], [1.5, -0.5, 0.2, 0.4]], np.float32)
    for tau in (0.1, 1.0):
        ref = np.mean(np_kl(np_softmax(teacher / tau), np_softmax(student / tau)))
        got = float(q.distillation_loss(jnp.asarray(teacher), jnp.asarray(student), tau))
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_distillation_loss_zero_when_equal_and_nonnegative():
    """KL is 0 when student == teacher and >= 0 for random Q's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 6)).astype(np.float32))
    assert float(q.distillation_loss(x, x, 0.1)) == pytest.approx(0.0, abs=1e-6)
    for _ in range(20):
        t = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32) * 3)
        s = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32) * 3)
        assert float(q.distillation_loss(t, s, 0.1)) >= -1e-6


# shared example for the full loss
Q = np.array([[1.0, 2.0, 3.0], [0.0, 5.0, -1.0]], np.float32)
ACTIONS = np.array([2, 0], np.int32)
TD_TARGET = np.array([3.5, 3.0], np.float32)  # errors: 3 - 3.5 = -0.5 (quadratic), 0 - 3 = -3 (linear)
TEACHER_Q = np.array([[0.5, 2.5, 2.0], [1.0, 1.0, 0.0]], np.float32)


def test_qdagger_dqn_loss_hand_values():
    """L = mean Huber(Q(s,a) - target) + w * KL; Huber by hand incl. the linear branch (|err| = 3)."""
    td_hand = (0.5 * 0.5**2 + (3.0 - 0.5)) / 2  # = (0.125 + 2.5) / 2 = 1.3125
    assert td_hand == pytest.approx(float(np.mean(np_huber(Q[np.arange(2), ACTIONS] - TD_TARGET))))
    tau, w = 0.1, 3.0
    kl_hand = float(np.mean(np_kl(np_softmax(TEACHER_Q / tau), np_softmax(Q / tau))))
    loss, m = q.qdagger_dqn_loss(jnp.asarray(Q), jnp.asarray(ACTIONS), jnp.asarray(TD_TARGET), jnp.asarray(TEACHER_Q),
                                 jnp.float32(w), tau)
    assert float(m["td_loss"]) == pytest.approx(1.3125, rel=1e-6)
    assert float(m["distill_loss"]) == pytest.approx(kl_hand, rel=1e-4)
    assert float(loss) == pytest.approx(1.3125 + w * kl_hand, rel=1e-4)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-7)
    assert float(m["q_values"]) == pytest.approx((3.0 + 0.0) / 2, rel=1e-7)  # mean Q of the taken actions


def test_qdagger_dqn_loss_huber_branches_separately():
    """A batch entirely in the quadratic branch and one entirely in the linear branch."""
    q_small = jnp.array([[0.2, 0.0]])  # err 0.2 - 0.5 = -0.3 -> 0.045
    loss, m = q.qdagger_dqn_loss(q_small, jnp.array([0]), jnp.array([0.5]), q_small, jnp.float32(0.0), 0.1)
    assert float(m["td_loss"]) == pytest.approx(0.045, rel=1e-5)
    q_big = jnp.array([[0.0, -4.0]])  # err -4 - 2 = -6 -> 6 - 0.5 = 5.5
    loss, m = q.qdagger_dqn_loss(q_big, jnp.array([1]), jnp.array([2.0]), q_big, jnp.float32(0.0), 0.1)
    assert float(m["td_loss"]) == pytest.approx(5.5, rel=1e-6)
    assert float(loss) == pytest.approx(5.5, rel=1e-6)


def test_qdagger_dqn_loss_distill_weight_scaling():
    """w = lambda * c: w = 0 -> loss == td_loss; doubling w doubles the distillation part."""
    args = (jnp.asarray(Q), jnp.asarray(ACTIONS), jnp.asarray(TD_TARGET), jnp.asarray(TEACHER_Q))
    l0, m0 = q.qdagger_dqn_loss(*args, jnp.float32(0.0), 0.1)
    l1, m1 = q.qdagger_dqn_loss(*args, jnp.float32(1.5), 0.1)
    l2, m2 = q.qdagger_dqn_loss(*args, jnp.float32(3.0), 0.1)
    assert float(l0) == pytest.approx(float(m0["td_loss"]), rel=1e-7)
    assert float(m0["distill_loss"]) == 0.0  # w = 0: the teacher is not queried, its placeholder Q is not scored
    d1, d2 = float(l1) - float(m1["td_loss"]), float(l2) - float(m2["td_loss"])
    assert d1 > 0
    assert d2 == pytest.approx(2 * d1, rel=1e-5)
    assert d1 == pytest.approx(1.5 * float(m1["distill_loss"]), rel=1e-5)


def test_no_gradient_into_teacher_or_target():
    """jax.grad w.r.t. teacher_q (and td_target) is exactly 0; w.r.t. the student's Q it is not."""
    def f(qv, target, teacher):
        return q.qdagger_dqn_loss(qv, jnp.asarray(ACTIONS), target, teacher, jnp.float32(3.0), 0.1)[0]

    gq, gt, gteach = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(Q), jnp.asarray(TD_TARGET), jnp.asarray(TEACHER_Q))
    assert np.all(np.asarray(gteach) == 0.0)
    assert np.all(np.asarray(gt) == 0.0)
    assert np.abs(np.asarray(gq)).sum() > 1e-3
    # distillation_loss alone: same property
    g_t, g_s = jax.grad(lambda t, s: q.distillation_loss(t, s, 0.1), argnums=(0, 1))(jnp.asarray(TEACHER_Q), jnp.asarray(Q))
    assert np.all(np.asarray(g_t) == 0.0)
    assert np.abs(np.asarray(g_s)).sum() > 1e-3
    # TD part of the gradient on the taken actions: Huber' = clip(err, -1, 1) / B
    g_td = jax.grad(lambda qv: q.qdagger_dqn_loss(qv, jnp.asarray(ACTIONS), jnp.asarray(TD_TARGET), jnp.asarray(TEACHER_Q),
                                                  jnp.float32(0.0), 0.1)[0])(jnp.asarray(Q))
    expected = np.zeros_like(Q)
    expected[0, 2], expected[1, 0] = -0.5 / 2, -1.0 / 2
    np.testing.assert_allclose(np.asarray(g_td), expected, atol=1e-7)


def test_qdagger_dqn_loss_without_teacher_q_has_the_td_loss_and_no_teacher_terms():
    """teacher_q=None (no teacher, or lambda is 0 for good): the same TD (and CQL) loss as with the teacher's Q, and
    the distillation and margin terms 0 even at positive weights, by design: no term reads zeros in place of the
    teacher's Q (which would score a uniform teacher: a KL > 0 and margins toward action 0)."""
    args = (jnp.asarray(Q), jnp.asarray(ACTIONS), jnp.asarray(TD_TARGET))
    weights = dict(distill_weight=jnp.float32(3.0), temperature=0.1, cql_weight=jnp.float32(0.5), margin_weight=jnp.float32(1.0))
    loss_t, m_t = q.qdagger_dqn_loss(*args, jnp.asarray(TEACHER_Q), **weights)
    loss_0, m_0 = q.qdagger_dqn_loss(*args, None, **weights)
    assert float(m_t["distill_loss"]) > 0 and float(m_t["margin_loss"]) > 0  # live with the teacher's Q
    assert float(m_0["distill_loss"]) == 0.0 and float(m_0["margin_loss"]) == 0.0
    assert float(m_0["td_loss"]) == float(m_t["td_loss"]) == pytest.approx(1.3125, rel=1e-6)
    assert float(m_0["cql_loss"]) == float(m_t["cql_loss"]) > 0
    assert float(loss_0) == pytest.approx(float(m_0["td_loss"]) + 0.5 * float(m_0["cql_loss"]), rel=1e-6)
    # zeros in place of the teacher's Q would not be 0: None is not a placeholder for them
    _, m_z = q.qdagger_dqn_loss(*args, jnp.zeros_like(jnp.asarray(TEACHER_Q)), **weights)
    assert float(m_z["distill_loss"]) > 0 and float(m_z["margin_loss"]) > 0
    # the gradient is the TD + CQL one
    g_0 = jax.grad(lambda qv: q.qdagger_dqn_loss(qv, *args[1:], None, **weights)[0])(jnp.asarray(Q))
    g_td = jax.grad(lambda qv: q.qdagger_dqn_loss(qv, *args[1:], None, jnp.float32(0.0), 0.1, cql_weight=jnp.float32(0.5))[0])(jnp.asarray(Q))
    np.testing.assert_array_equal(np.asarray(g_0), np.asarray(g_td))


def make_dqn_update_case(batch_size=4, num_actions=4):
    """A Nature student, its Adam state, a teacher with the batch's cached Q-values of its states, and a batch."""
    import optax

    rng = np.random.default_rng(21)
    args = q.Args()
    student, teacher = q.make_student("nature", num_actions), tu.DopamineNatureDQN(num_actions)
    obs = rng.integers(0, 256, (batch_size, 4, 84, 84), np.uint8)
    params = student.init(jax.random.PRNGKey(0), obs)
    teacher_params = teacher.init(jax.random.PRNGKey(1), obs)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(1e-4, np.float32), eps=args.adam_eps)
    state = training.QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, params), tx=tx)
    batch = replay.Batch(obs=obs, actions=rng.integers(0, num_actions, batch_size).astype(np.int32),
                         returns=rng.uniform(-1, 1, batch_size).astype(np.float32), discounts=np.array([0.99**3, 0.0, 0.99, 0.99**3], np.float32),
                         next_obs=rng.integers(0, 256, (batch_size, 4, 84, 84), np.uint8),
                         teacher_q=np.asarray(teacher.apply(teacher_params, obs)), index=np.arange(batch_size, dtype=np.int32),
                         weights=np.ones(batch_size, np.float32))
    return args, student, teacher, state, teacher_params, batch


def test_update_without_teacher_params_is_the_update_with_the_teacher_terms_weighted_0():
    """make_update's update with teacher_params None (no loss may use the teacher; a replay caching no teacher Q, 0
    columns) gives bit for bit the new params of the update with the teacher at distillation and margin weight 0, and
    logs its teacher terms as 0 even at positive weights; with the teacher at a positive weight the update differs."""
    args, student, teacher, state, teacher_params, batch = make_dqn_update_case()
    update = jax.jit(q.make_update(student, args, teacher.apply))
    no_q = batch._replace(teacher_q=np.zeros((batch.obs.shape[0], 0), np.float32))
    s_none, m_none = update(state, no_q, None, training.coefs(1.0, 3.0, 1e-4, margin=1.0))  # positive weights, no teacher
    s_zero, m_zero = update(state, batch, teacher_params, training.coefs(1.0, 0.0, 1e-4))  # the teacher, weights 0
    s_live, m_live = update(state, batch, teacher_params, training.coefs(1.0, 3.0, 1e-4, margin=1.0))
    for a, b in zip(jax.tree.leaves((s_none.params, s_none.opt_state)), jax.tree.leaves((s_zero.params, s_zero.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m_none["distill_loss"]) == 0.0 and float(m_none["margin_loss"]) == 0.0
    assert float(m_none["td_loss"]) == float(m_zero["td_loss"]) > 0
    assert float(m_live["distill_loss"]) > 0 and float(m_live["margin_loss"]) > 0
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(s_live.params), jax.tree.leaves(s_zero.params)))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(s_none.params), jax.tree.leaves(state.params))]
    assert max(moved) > 0  # the TD step itself moved the params


# ============================================================================
# 2. n-step targets
# ============================================================================
def test_nstep_td_target_hand_values():
    """target = R + discount * max_a Q_target(s', a); discount 0 (termination) ignores next Q."""
    returns = jnp.array([1.0, 0.5, -1.0, 2.0])
    discounts = jnp.array([0.99**3, 0.99, 0.0, 0.0])
    next_q = jnp.array([[1.0, 3.0, 2.0], [-1.0, -2.0, -0.5], [100.0, 50.0, 7.0], [-100.0, -50.0, -7.0]])
    got = np.asarray(q.nstep_td_target(returns, discounts, next_q))
    np.testing.assert_allclose(got, [1.0 + 0.970299 * 3.0, 0.5 + 0.99 * -0.5, -1.0, 2.0], rtol=1e-6)


# ============================================================================
# 3. schedules
# ============================================================================
def test_linear_schedule():
    """epsilon: 1.0 -> 0.01 linearly over 50,000 steps, then flat."""
    assert training.linear_schedule(1.0, 0.01, 50_000, 0) == pytest.approx(1.0)
    assert training.linear_schedule(1.0, 0.01, 50_000, 25_000) == pytest.approx(0.505)
    assert training.linear_schedule(1.0, 0.01, 50_000, 50_000) == pytest.approx(0.01)
    assert training.linear_schedule(1.0, 0.01, 50_000, 10**6) == pytest.approx(0.01)


def test_lambda_learning_rate():
    """lr = lambda * 1e-4 + (1 - lambda) * 1e-5."""
    assert training.lambda_learning_rate(1.0, 1e-4, 1e-5) == pytest.approx(1e-4)
    assert training.lambda_learning_rate(0.0, 1e-4, 1e-5) == pytest.approx(1e-5)
    assert training.lambda_learning_rate(0.5, 1e-4, 1e-5) == pytest.approx(5.5e-5)


def test_distill_lambda_update_normal_cases():
    """lambda = max(1 - (G_S - G_R) / (G_T - G_R), 0) as the reference's record_score, with G_T = 100, G_R = 10."""
    upd = lambda lam, gs, clip=False: training.distill_lambda_update(lam, gs, 100.0, 10.0, 250_000, 1_500_000, clip)
    lam, reason = upd(1.0, 30.0)  # tns = 20 / 90
    assert lam == pytest.approx(1 - 20 / 90) and reason == ""
    assert upd(1.0, 55.0)[0] == pytest.approx(0.5)  # tns = 45 / 90
    assert upd(0.3, 10.0)[0] == pytest.approx(1.0)  # student at random level: back to 1 (lambda > 0 may go up)
    assert upd(1.0, 100.0)[0] == pytest.approx(0.0)  # student == teacher
    assert upd(1.0, 150.0)[0] == 0.0  # student better than the teacher: floored at 0
    assert upd(1.0, 1.0)[0] == pytest.approx(1.1)  # below random: no upper clip in the reference (tns = -0.1)
    assert upd(1.0, 1.0, clip=True)[0] == 1.0  # --clip-lambda caps it


def test_distill_lambda_update_decay_period_ends_at_the_evaluation_that_reaches_it():
    """The reference zeroes lambda when online_training_steps > distill_decay_period at record_score; its
    iterations overshoot 250,000 steps (the episode in progress is finished), so the evaluation after iteration
    decay_period / 250,000 already sees more. Ours are exact: that evaluation sees exactly the period."""
    lam, reason = training.distill_lambda_update(0.7, 40.0, 100.0, 10.0, 1_250_000, 1_500_000)
    assert lam == pytest.approx(1 - 30 / 90) and reason == ""  # one iteration before: still the score
    lam, reason = training.distill_lambda_update(0.7, 40.0, 100.0, 10.0, 1_500_000, 1_500_000)
    assert lam == 0.0 and "decay period" in reason  # the last 4 of DQN's 10 iterations (5 of Rainbow's 15) at lambda 0


def test_distill_lambda_update_kept_values():
    """lambda == 0 stays 0; missing/invalid scores keep lambda with a reason."""
    lam, _ = training.distill_lambda_update(0.7, None, None, 10.0, 2_000_000, 1_500_000)
    assert lam == 0.0
    # lambda reached 0: stays 0 even if the student got worse (tns would give 1 - 0 = 1)
    lam, reason = training.distill_lambda_update(0.0, 10.0, 100.0, 10.0, 500_000, 1_500_000)
    assert lam == 0.0 and reason
    # the student evaluation finished no episode
    lam, reason = training.distill_lambda_update(0.4, None, 100.0, 10.0, 500_000, 1_500_000)
    assert lam == 0.4 and isinstance(reason, str) and reason
    # the teacher evaluation finished no episode
    lam, reason = training.distill_lambda_update(0.4, 50.0, None, 10.0, 500_000, 1_500_000)
    assert lam == 0.4 and reason
    # teacher no better than random: tns undefined
    for g_t in (5.0, 10.0):
        lam, reason = training.distill_lambda_update(0.4, 50.0, g_t, 10.0, 500_000, 1_500_000)
        assert lam == 0.4 and isinstance(reason, str) and reason


# ============================================================================
# 4. FrameReplayBuffer
# ============================================================================
ZERO = np.zeros((84, 84), np.uint8)


def frame_of(env: int, ep: int, t: int) -> np.ndarray:
    """A unique, never-all-zero frame: header pixels encode (env, episode, step)."""
    f = np.full((84, 84), (37 * env + 11 * ep + 3 * t) % 251 + 1, np.uint8)
    f[0, :6] = [255, env, ep % 256, ep // 256, t % 256, t // 256]
    return f


def decode(frame: np.ndarray) -> tuple[int, int, int]:
    assert frame[0, 0] == 255, "not a real frame (zero padding?)"
    h = frame[0, :6].astype(int)
    return int(h[1]), int(h[2] + 256 * h[3]), int(h[4] + 256 * h[5])


def stack_of(env: int, ep: int, t: int) -> np.ndarray:
    """Dopamine's stack of s_t: frames t-3..t oldest first, zeros before the episode start."""
    return np.stack([frame_of(env, ep, s) if s >= 0 else ZERO for s in range(t - 3, t + 1)])


ENDLESS = (10**6, "trunc")


class VecSim:
    """envpool-like vector env with auto-reset, feeding FrameReplayBuffer.add.

    plan(env, ep, rng) -> (T, end) or (T, end, rewards): episode ep of env has T
    transitions (frames s_0..s_T) and ends by 'term' or 'trunc'. The step after an
    end is envpool's reset step: obs = s_T, next_obs = s_0 of the next episode,
    junk action/reward (which must never reach the buffer).
    Ground truth: episodes[env][ep] and labels[env], the documented row layout
    (one row per transition, an extra ('final', ep) row per episode end).
    """

    def __init__(self, num_envs, plan, seed=0):
        self.n, self.plan, self.rng = num_envs, plan, np.random.default_rng(seed)
        self.episodes = [[] for _ in range(num_envs)]
        self.written = [[] for _ in range(num_envs)]  # transitions written per episode
        self.labels = [[] for _ in range(num_envs)]
        self.ep = [0] * num_envs
        self.t = [0] * num_envs
        self.resetting = [False] * num_envs

    def _episode(self, i):
        while len(self.episodes[i]) <= self.ep[i]:
            e = len(self.episodes[i])
            p = self.plan(i, e, self.rng)
            T, end = p[0], p[1]
            n_rew = min(T, 4096)
            rewards = np.asarray(p[2], np.float32) if len(p) > 2 else self.rng.choice(
                np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0], np.float32), size=n_rew)
            actions = self.rng.integers(0, 18, size=n_rew)
            self.episodes[i].append(dict(T=T, end=end, rewards=rewards, actions=actions))
            self.written[i].append(0)
        return self.episodes[i][self.ep[i]]

    def step(self, buf):
        frames, nxt = np.zeros((self.n, 84, 84), np.uint8), np.zeros((self.n, 84, 84), np.uint8)
        acts, rews = np.zeros(self.n, np.int64), np.zeros(self.n, np.float32)
        term, trunc = np.zeros(self.n, bool), np.zeros(self.n, bool)
        for i in range(self.n):
            if self.resetting[i]:
                prev = self.episodes[i][self.ep[i] - 1]
                frames[i], nxt[i] = frame_of(i, self.ep[i] - 1, prev["T"]), frame_of(i, self.ep[i], 0)
                acts[i], rews[i] = 17, 9.0  # junk: the buffer must skip this step
                self.resetting[i] = False
                continue
            e, t = self._episode(i), self.t[i]
            frames[i], nxt[i] = frame_of(i, self.ep[i], t), frame_of(i, self.ep[i], t + 1)
            acts[i], rews[i] = e["actions"][t], e["rewards"][t]
            self.labels[i].append(("step", self.ep[i], t))
            self.written[i][self.ep[i]] += 1
            if t == e["T"] - 1:
                term[i], trunc[i] = e["end"] == "term", e["end"] == "trunc"
                self.labels[i].append(("final", self.ep[i]))
                self.ep[i] += 1
                self.t[i] = 0
                self.resetting[i] = True
            else:
                self.t[i] += 1
        buf.add(frames, acts, rews, term, trunc, nxt)

    def run(self, buf, steps):
        for _ in range(steps):
            self.step(buf)

    # ---------------------------------------------------------- ground truth
    def complete(self, i, ep):
        return self.written[i][ep] == self.episodes[i][ep]["T"]

    def expected(self, i, ep, t, gamma, n=N_STEP):
        """(obs, action, returns, discount, next_obs) of transition (s_t, a_t) of episode ep of env i."""
        e = self.episodes[i][ep]
        L = min(n, e["T"] - t)
        ret = sum(gamma**k * float(e["rewards"][t + k]) for k in range(L))
        disc = 0.0 if (t + L == e["T"] and e["end"] == "term") else gamma**L
        return stack_of(i, ep, t), int(e["actions"][t]), ret, disc, stack_of(i, ep, t + L)

    def sampleable(self, rows_per_env, n=N_STEP):
        """Transitions whose n-step window is complete and whose stack frames are still stored."""
        out = set()
        for i in range(self.n):
            labels = self.labels[i]
            kept = set(labels[-rows_per_env:])
            for lab in labels:
                if lab[0] != "step":
                    continue
                _, ep, t = lab
                if not all(("step", ep, s) in kept for s in range(max(t - 3, 0), t + 1)):
                    continue
                T = self.episodes[i][ep]["T"]
                if self.complete(i, ep) and t + n >= T:
                    out.add((i, ep, t))  # the FINAL row was written with the terminal step
                elif t + n < self.written[i][ep]:
                    out.add((i, ep, t))
        return out


def collect(buf, sim, gamma, draws=2000, batch=250, seed=0):
    """Sample `draws` transitions, check EVERY one against the ground truth; return their counts by key."""
    rng = np.random.default_rng(seed)
    counts = {}
    for _ in range(-(-draws // batch)):
        b = buf.sample(batch, rng)
        assert b.obs.shape == (batch, 4, 84, 84) and b.obs.dtype == np.uint8
        assert b.next_obs.shape == (batch, 4, 84, 84)
        for k in range(batch):
            key = decode(b.obs[k, 3])
            i, ep, t = key
            obs, action, ret, disc, next_obs = sim.expected(i, ep, t, gamma)
            assert b.env_idx[k] == i, key
            np.testing.assert_array_equal(b.obs[k], obs, err_msg=f"obs of {key}")
            np.testing.assert_array_equal(b.next_obs[k], next_obs, err_msg=f"next_obs of {key}")
            assert int(b.actions[k]) == action, key
            assert float(b.returns[k]) == pytest.approx(ret, rel=1e-5, abs=1e-6), key
            assert float(b.discounts[k]) == pytest.approx(disc, rel=1e-6, abs=0.0), key
            counts[key] = counts.get(key, 0) + 1
    return counts


def scripted(plans):
    """plan from per-env lists of (T, end[, rewards]); afterwards an endless episode."""
    def plan(i, e, rng):
        return plans[i][e] if e < len(plans[i]) else ENDLESS
    return plan


def test_replay_stacking_zero_padding_and_short_episodes():
    """obs = last 4 frames oldest -> newest; steps 0-2 of an episode are zero-padded, never
    frames of the previous episode; 1- and 2-step episodes bootstrap/terminate correctly."""
    gamma = 0.99
    buf = DeviceReplay(200, 1, N_STEP, gamma)
    sim = VecSim(1, scripted([[(5, "term"), (2, "trunc"), (1, "term")]]))
    sim.run(buf, 20)  # ep0: 5 steps + reset, ep1: 2 + reset, ep2: 1 + reset, ep3: 9 steps (t=0..8)
    counts = collect(buf, sim, gamma, draws=1500)
    assert set(counts) == sim.sampleable(buf.rows)
    b = buf.sample(1000, np.random.default_rng(1))
    got = {decode(b.obs[k, 3]): (b.obs[k], b.next_obs[k], float(b.discounts[k])) for k in range(len(b.obs))}
    F = lambda ep, t: frame_of(0, ep, t)
    # the first steps of episode 3, which follows a 1-step episode: zeros, not ep2's frames
    np.testing.assert_array_equal(got[(0, 3, 0)][0], np.stack([ZERO, ZERO, ZERO, F(3, 0)]))
    np.testing.assert_array_equal(got[(0, 3, 1)][0], np.stack([ZERO, ZERO, F(3, 0), F(3, 1)]))
    np.testing.assert_array_equal(got[(0, 3, 2)][0], np.stack([ZERO, F(3, 0), F(3, 1), F(3, 2)]))
    np.testing.assert_array_equal(got[(0, 3, 3)][0], np.stack([F(3, 0), F(3, 1), F(3, 2), F(3, 3)]))
    np.testing.assert_array_equal(got[(0, 3, 5)][0], np.stack([F(3, 2), F(3, 3), F(3, 4), F(3, 5)]))
    # 1-step episode, terminated: next_obs = [0, 0, s0, s1], discount 0
    np.testing.assert_array_equal(got[(0, 2, 0)][1], np.stack([ZERO, ZERO, F(2, 0), F(2, 1)]))
    assert got[(0, 2, 0)][2] == 0.0
    # 2-step episode, truncated: from s0, bootstrap at its final frame s2 with gamma^2
    np.testing.assert_array_equal(got[(0, 1, 0)][0], np.stack([ZERO, ZERO, ZERO, F(1, 0)]))
    np.testing.assert_array_equal(got[(0, 1, 0)][1], np.stack([ZERO, F(1, 0), F(1, 1), F(1, 2)]))
    assert got[(0, 1, 0)][2] == pytest.approx(gamma**2)
    # never a frame of another episode in a stack
    for k in range(len(b.obs)):
        _, ep, _ = decode(b.obs[k, 3])
        for s in list(b.obs[k]) + list(b.next_obs[k]):
            if s.any():
                assert decode(s)[1] == ep


def test_replay_row_accounting_skips_reset_step():
    """One row per transition + one FINAL row per episode end; envpool's reset step adds nothing."""
    buf = DeviceReplay(500, 1, N_STEP, 0.99)
    sim = VecSim(1, scripted([[(5, "term"), (2, "trunc"), (1, "term")]]))
    sim.run(buf, 20)
    # 20 vector steps = 17 transitions (3 reset steps skipped) + 3 FINAL rows
    assert len(sim.labels[0]) == 20 and len(buf) == 20
    sim.run(buf, 5)
    assert len(buf) == 25


NSTEP_REWARDS = [1.0, 0.5, -1.0, 0.25, 1.0, -0.5]


def test_replay_nstep_returns_at_termination_and_far_from_ends():
    """Termination: returns stop at the terminal step, discount 0. Far from the end:
    r0 + g r1 + g^2 r2, discount g^3, next_obs = the stack 3 steps later. (gamma = 0.9)"""
    g = 0.9
    buf = DeviceReplay(200, 1, N_STEP, g)
    sim = VecSim(1, scripted([[(6, "term", NSTEP_REWARDS)]]))
    sim.run(buf, 12)
    b = buf.sample(600, np.random.default_rng(0))
    got = {decode(b.obs[k, 3]): (float(b.returns[k]), float(b.discounts[k]), b.next_obs[k]) for k in range(600)}
    F = lambda t: frame_of(0, 0, t)
    hand = {  # t: (returns, discount, next stack)
        0: (1 + 0.9 * 0.5 + 0.81 * -1.0, 0.729, [F(0), F(1), F(2), F(3)]),  # 0.64
        1: (0.5 + 0.9 * -1.0 + 0.81 * 0.25, 0.729, [F(1), F(2), F(3), F(4)]),  # -0.1975
        2: (-1 + 0.9 * 0.25 + 0.81 * 1.0, 0.729, [F(2), F(3), F(4), F(5)]),  # 0.035
        3: (0.25 + 0.9 * 1.0 + 0.81 * -0.5, 0.0, [F(3), F(4), F(5), F(6)]),  # 0.745, window ends at the terminal step
        4: (1.0 + 0.9 * -0.5, 0.0, [F(3), F(4), F(5), F(6)]),  # 0.55, 1 step before the terminal step
        5: (-0.5, 0.0, [F(3), F(4), F(5), F(6)]),  # the terminal step itself
    }
    for t, (ret, disc, nxt) in hand.items():
        r, d, n = got[(0, 0, t)]
        assert r == pytest.approx(ret, abs=1e-6), t
        assert d == pytest.approx(disc, abs=1e-7), t
        np.testing.assert_array_equal(n, np.stack(nxt), err_msg=f"t={t}")
    assert got[(0, 0, 0)][0] == pytest.approx(0.64, abs=1e-6)


def test_replay_bootstraps_through_truncation():
    """Truncation: a transition k steps before the truncating step has discount g^(k+1) != 0
    and next_obs = the stack ending with the episode's final frame s_T."""
    g = 0.9
    buf = DeviceReplay(200, 1, N_STEP, g)
    sim = VecSim(1, scripted([[(6, "trunc", NSTEP_REWARDS)]]))
    sim.run(buf, 12)
    b = buf.sample(600, np.random.default_rng(0))
    got = {decode(b.obs[k, 3]): (float(b.returns[k]), float(b.discounts[k]), b.next_obs[k]) for k in range(600)}
    final_stack = np.stack([frame_of(0, 0, t) for t in (3, 4, 5, 6)])  # s_6 is the frame the truncating step returned
    for k, ret in [(0, -0.5), (1, 1.0 + 0.9 * -0.5), (2, 0.25 + 0.9 * 1.0 + 0.81 * -0.5)]:
        r, d, n = got[(0, 0, 5 - k)]
        assert r == pytest.approx(ret, abs=1e-6), k
        assert d == pytest.approx(g ** (k + 1), rel=1e-6) and d > 0, k
        np.testing.assert_array_equal(n, final_stack, err_msg=f"k={k}")
    # 3 steps before the end: an ordinary 3-step transition
    r, d, n = got[(0, 0, 2)]
    assert d == pytest.approx(0.729) and r == pytest.approx(0.035, abs=1e-6)
    np.testing.assert_array_equal(n, np.stack([frame_of(0, 0, t) for t in (2, 3, 4, 5)]))


def test_replay_wraparound_never_mixes_old_and_new():
    """After writing > 2.5x the capacity, every sample is consistent with the ground truth and
    uses only frames still stored; the set of sampled transitions is exactly the valid one."""
    gamma = 0.99
    buf = DeviceReplay(24, 1, N_STEP, gamma)
    sim = VecSim(1, scripted([[(4, "term"), (9, "trunc"), (2, "term"), (13, "term"), (7, "trunc"),
                               (1, "trunc"), (5, "term"), (11, "trunc"), (6, "term")]]))
    for steps in (10, 17, 13, 9, 11, 7):  # check at several fill levels, across the wrap
        sim.run(buf, steps)
        kept = set(sim.labels[0][-24:])
        counts = collect(buf, sim, gamma, draws=1000)
        assert set(counts) == sim.sampleable(24)
        for (i, ep, t) in counts:  # all frames of the stack are still stored
            assert all(("step", ep, s) in kept for s in range(max(t - 3, 0), t + 1))
    assert len(sim.labels[0]) > 2.5 * 24 and len(buf) == 24


def test_replay_multi_env_streams_never_mix():
    """num_envs = 3 with different episode ends: each stack comes from a single env."""
    gamma = 0.99
    buf = DeviceReplay(300, 3, N_STEP, gamma)
    sim = VecSim(3, scripted([[(2, "term"), (5, "trunc"), (3, "term")],
                              [(7, "term"), (1, "term"), (4, "trunc")],
                              [(4, "trunc"), (4, "term")]]))
    sim.run(buf, 25)
    counts = collect(buf, sim, gamma, draws=2000)
    assert set(counts) == sim.sampleable(100)
    assert {k[0] for k in counts} == {0, 1, 2}
    b = buf.sample(500, np.random.default_rng(3))
    for k in range(500):
        env = decode(b.obs[k, 3])[0]
        for s in list(b.obs[k]) + list(b.next_obs[k]):
            if s.any():
                assert decode(s)[0] == env


def test_replay_long_episode_full_stacks_past_255_steps():
    """Steps beyond 255 (uint8 step counters) still get full 4-frame stacks, no zero padding."""
    gamma = 0.99
    buf = DeviceReplay(700, 1, N_STEP, gamma)
    sim = VecSim(1, scripted([[(600, "trunc")]]))
    sim.run(buf, 610)
    counts = collect(buf, sim, gamma, draws=3000, batch=500)
    assert any(t >= 256 for (_, _, t) in counts) and any(t >= 512 for (_, _, t) in counts)


def test_replay_bytes_per_transition():
    """<= 7.2 KB per transition, and equal to the allocated arrays / rows."""
    rb = replay.make_replay([500, 500], 0)
    per_row = [a for a in rb if a.shape[:1] == (1000,)]
    assert any(a.shape == (1000, 84, 84) and a.dtype == np.uint8 for a in per_row)
    assert replay.replay_bytes([500, 500], 0) == sum(a.nbytes for a in per_row)
    assert replay.replay_bytes([500, 500], 0) / 1000 <= 7200
    # per-stream bookkeeping is O(num_envs), not per row
    assert sum(a.nbytes for a in rb if a.shape[:1] != (1000,)) < 100


def test_replay_brute_force_random_episodes():
    """2 envs, random episode lengths (1..14) and end types, small capacity (wraps several
    times): every one of 2,000 samples matches the ground truth (obs, action, returns,
    discount, next_obs); every valid transition is sampled (incl. the ones just before an
    episode end), and sampling is roughly uniform over valid transitions."""
    gamma = 0.97
    cap = 80  # 40 rows per env

    def plan(i, e, rng):
        return int(rng.choice([1, 2, 3, 4, 5, 7, 10, 14])), ("term" if rng.random() < 0.5 else "trunc")

    buf = DeviceReplay(cap, 2, N_STEP, gamma)
    sim = VecSim(2, plan, seed=123)
    seen_end_types = set()
    for steps in (25, 40, 60, 75):
        sim.run(buf, steps)
        counts = collect(buf, sim, gamma, draws=2000, seed=steps)
        valid = sim.sampleable(cap // 2)
        assert set(counts) == valid
        mean = sum(counts.values()) / len(valid)
        assert min(counts.values()) > mean / 3 and max(counts.values()) < mean * 3
        for (i, ep, t) in valid:  # classes of transitions that must be present
            e = sim.episodes[i][ep]
            if sim.complete(i, ep) and t + N_STEP >= e["T"]:
                seen_end_types.add((e["end"], e["T"] - t))
    # transitions 1, 2, 3 steps before terminations and truncations were all covered
    assert seen_end_types >= {(end, k) for end in ("term", "trunc") for k in (1, 2, 3)}
    assert all(len(sim.labels[i]) > 2 * cap // 2 for i in range(2))


def test_replay_sample_empty_raises():
    buf = DeviceReplay(100, 1, N_STEP, 0.99)
    with pytest.raises(RuntimeError):
        buf.sample(4, np.random.default_rng(0))


# ============================================================================
# 5. networks
# ============================================================================
def test_impala_cnn_shapes_channels_and_values():
    """ImpalaCNN(6): (2,4,84,84) uint8 -> (2,6); stage channels (16, 32, 32); 3 pools 84->42->21->11."""
    net = q.ImpalaCNN(6)
    x = np.random.default_rng(0).integers(0, 256, size=(2, 4, 84, 84), dtype=np.uint8)
    params = net.init(jax.random.PRNGKey(0), x)
    out = np.asarray(net.apply(params, x))
    assert out.shape == (2, 6) and np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1])  # different inputs, different Q's
    p = flax.core.unfreeze(params)["params"]
    assert [p[f"Conv_{k}"]["kernel"].shape for k in range(3)] == [(3, 3, 4, 16), (3, 3, 16, 32), (3, 3, 32, 32)]
    # two residual blocks per stage, each two 3x3 convs with the stage's channels
    res = sorted(k for k in p if k.startswith("ResidualBlock"))
    assert len(res) == 6
    for k, c in zip(sorted(res, key=lambda s: int(s.split("_")[1])), [16, 16, 32, 32, 32, 32]):
        assert p[k]["Conv_0"]["kernel"].shape == (3, 3, c, c) and p[k]["Conv_1"]["kernel"].shape == (3, 3, c, c)
    assert p["Dense_0"]["kernel"].shape == (11 * 11 * 32, 512)
    assert p["Dense_1"]["kernel"].shape == (512, 6)
    # zero biases at init: an all-black input gives exactly zero Q's
    np.testing.assert_array_equal(np.asarray(net.apply(params, np.zeros((1, 4, 84, 84), np.uint8))), np.zeros((1, 6)))
    # uint8 input is scaled by 1/255: same as the float image
    np.testing.assert_allclose(np.asarray(net.apply(params, x.astype(np.float32))), out, rtol=1e-5, atol=1e-5)


def test_make_student():
    """'nature' is the teacher's own architecture; 'impala' the Impala CNN (16, 32, 32)."""
    s = q.make_student("nature", 4)
    assert isinstance(s, tu.DopamineNatureDQN) and s.num_actions == 4
    s = q.make_student("impala", 5)
    assert isinstance(s, q.ImpalaCNN) and s.num_actions == 5 and tuple(s.channels) == (16, 32, 32)


# ============================================================================
# 6. flag checks
# ============================================================================
def test_check_args_defaults_pass():
    config.check_args(q.Args())
    config.check_args(dataclasses.replace(q.Args(), teacher_steps=10, offline_steps=0))  # no offline phase: tiny data ok


@pytest.mark.parametrize("changes, flag", [
    (dict(total_timesteps=0), "--total-timesteps"),
    (dict(num_envs=0), "--num-envs"),
    (dict(temperature=0.0), "--temperature"),
    (dict(buffer_size=10_000, learning_starts=20_000), "--buffer-size"),
    (dict(teacher_steps=10, offline_steps=1000), "--teacher-steps"),
    (dict(start_e=2.0), "--start-e"),
])
def test_check_args_rejects(changes, flag):
    """Each bad value raises ConfigError with a one-line message naming the flag."""
    with pytest.raises(ConfigError) as err:
        config.check_args(dataclasses.replace(q.Args(), **changes))
    msg = str(err.value)
    assert flag in msg and "\n" not in msg


# ============================================================================
# 7. GPU launch settings
# ============================================================================
CMDBUF = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1"


@pytest.mark.parametrize("script", ["qdagger_dqn_atari_jax", "qdagger_rainbow_atari_jax"])
@pytest.mark.parametrize("user_flags, expected", [
    (None, CMDBUF),
    ("--xla_dump_to=/tmp/dump", "--xla_dump_to=/tmp/dump " + CMDBUF),  # the user's flags kept, ours added
    ("--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer="),  # the user's choice (here: none) wins
])
def test_importing_a_script_turns_on_command_buffers_unless_the_user_chose(script, user_flags, expected):
    """XLA_FLAGS as a script leaves them for the backend (read when JAX first starts it, after the import)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": user_flags} if user_flags is not None else {})
    code = f"import os, {script}, jax; jax.devices(); print(os.environ['XLA_FLAGS'])"  # the backend accepts them (a bad flag aborts)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == expected
