"""Unit tests of qdagger_rainbow_atari_jax and what it uses from reincarnate/: C51 projection and loss,
distillation with a distributional student (with and without the teacher), the vectorised sum tree and the
prioritized frame replay (reincarnate/replay.py), noisy / dueling / double-DQN variants, the update, the learner
on the device and on the host replay (--replay-on-host), the flag checks (reincarnate/config.py)."""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

import qdagger_rainbow_atari_jax as qr
from reincarnate import config, replay, training
from reincarnate.errors import ConfigError
from replay_adapter import DeviceReplay

SUPPORT51 = np.linspace(-10.0, 10.0, 51, dtype=np.float32)  # dz = 0.4


def project(next_probs, returns, discounts, support):
    out = qr.project_distribution(jnp.asarray(next_probs, jnp.float32), jnp.asarray(returns, jnp.float32),
                                  jnp.asarray(discounts, jnp.float32), jnp.asarray(support, jnp.float32))
    return np.asarray(out, np.float64)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------
# C51 projection
# ----------------------------------------------------------------------------
def test_terminal_reward_on_an_atom_takes_all_mass():
    probs = softmax(np.random.default_rng(0).normal(size=(1, 51)))
    m = project(probs, [1.2], [0.0], SUPPORT51)  # 1.2 = z_28
    expected = np.zeros(51)
    expected[28] = 1.0
    np.testing.assert_allclose(m[0], expected, atol=1e-5)


def test_terminal_reward_between_atoms_splits_to_neighbours():
    probs = softmax(np.random.default_rng(1).normal(size=(2, 51)))
    m = project(probs, [0.5, -3.3], [0.0, 0.0], SUPPORT51)
    # 0.5 lies between z_26 = 0.4 and z_27 = 0.8, a quarter of the way: 0.75 / 0.25.
    expected = np.zeros((2, 51))
    expected[0, 26], expected[0, 27] = 0.75, 0.25
    # -3.3 lies between z_16 = -3.6 and z_17 = -3.2: 0.25 / 0.75.
    expected[1, 16], expected[1, 17] = 0.25, 0.75
    np.testing.assert_allclose(m, expected, atol=1e-5)


def test_targets_beyond_the_support_clip_to_its_ends():
    probs = softmax(np.random.default_rng(2).normal(size=(3, 51)))
    m = project(probs, [15.0, -12.0, 9.0], [0.0, 0.0, 1.0], SUPPORT51)
    np.testing.assert_allclose(m[0, -1], 1.0, atol=1e-5)
    np.testing.assert_allclose(m[1, 0], 1.0, atol=1e-5)
    # r = 9, discount 1: z_k -> -1 + 0.4 k, so atoms k >= 28 land beyond 10 and clip to it;
    # k = 27 lands on 9.8, half way between z_49 and z_50
    assert m[2, -1] == pytest.approx(probs[2, 28:].sum() + 0.5 * probs[2, 27], abs=1e-5)
    assert np.all(m[2, :22] < 1e-7)


def test_mass_is_conserved():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(51), size=64)
    m = project(probs, rng.uniform(-20, 20, 64), rng.choice([0.0, 0.99, 0.99**3, 1.0], 64), SUPPORT51)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-5)
    assert np.all(m >= 0)


def test_discount_shrinks_the_support():
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)
    # uniform mass, return 0, discount 0.5: targets -1, -0.5, 0, 0.5, 1
    m = project(np.full((1, 5), 0.2), [0.0], [0.5], z)
    np.testing.assert_allclose(m[0], [0.0, 0.3, 0.4, 0.3, 0.0], atol=1e-6)
    # one-hot at z = 2 with the 3-step discount gamma^3: lands at 2 * 0.970299 = 1.940598
    g3 = 0.99**3
    m = project(np.array([[0.0, 0.0, 0.0, 0.0, 1.0]]), [0.0], [g3], z)
    np.testing.assert_allclose(m[0], [0.0, 0.0, 0.0, 1.0 - 2 * g3 + 1.0, 2 * g3 - 1.0], atol=1e-6)
    # and a reward shifts it: r = -0.5 -> 1.440598 between 1 and 2
    m = project(np.array([[0.0, 0.0, 0.0, 0.0, 1.0]]), [-0.5], [g3], z)
    np.testing.assert_allclose(m[0], [0.0, 0.0, 0.0, 2.0 - (2 * g3 - 0.5), 2 * g3 - 0.5 - 1.0], atol=1e-6)


def test_projection_matches_rlax_on_random_inputs():
    rlax = pytest.importorskip("rlax")
    rng = np.random.default_rng(4)
    for num_atoms, v_min, v_max in [(51, -10.0, 10.0), (11, -1.0, 3.0), (2, 0.0, 1.0)]:
        z = np.linspace(v_min, v_max, num_atoms, dtype=np.float32)
        B = 128
        probs = rng.dirichlet(np.ones(num_atoms) * 0.5, size=B).astype(np.float32)
        returns = rng.uniform(2 * v_min, 2 * v_max, B).astype(np.float32)
        discounts = rng.choice([0.0, 0.99, 0.99**2, 0.99**3, 0.5], B).astype(np.float32)
        ours = project(probs, returns, discounts, z)
        z_p = returns[:, None] + discounts[:, None] * z[None, :]
        oracle = jax.vmap(rlax.categorical_l2_project, in_axes=(0, 0, None))(jnp.asarray(z_p), jnp.asarray(probs), jnp.asarray(z))
        np.testing.assert_allclose(ours, np.asarray(oracle), atol=1e-5)


# ----------------------------------------------------------------------------
# C51 loss, double DQN target, distillation with a distributional student
# ----------------------------------------------------------------------------
def test_c51_loss_is_per_sample_cross_entropy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
    actions = np.array([0, 3, 2])
    target = rng.dirichlet(np.ones(5), size=3).astype(np.float32)
    ours = np.asarray(qr.c51_loss(jnp.asarray(logits), jnp.asarray(actions), jnp.asarray(target)))
    chosen = logits[np.arange(3), actions]
    log_p = chosen - np.log(np.exp(chosen).sum(-1, keepdims=True))
    np.testing.assert_allclose(ours, -(target * log_p).sum(-1), rtol=1e-5)
    # no gradient reaches the target distribution
    g = jax.grad(lambda t: qr.c51_loss(jnp.asarray(logits), jnp.asarray(actions), t).sum())(jnp.asarray(target))
    assert np.all(np.asarray(g) == 0)


def test_double_dqn_selects_with_online_and_evaluates_target():
    z = jnp.array([0.0, 1.0, 2.0])
    big = 20.0
    # target network: action 0 has expected Q 2 (all mass on z=2), action 1 Q = 0
    target_logits = jnp.array([[[-big, -big, big], [big, -big, -big]]])
    # online network prefers action 1
    online_logits = jnp.array([[[big, -big, -big], [-big, -big, big]]])
    r, d = jnp.array([0.0]), jnp.array([1.0])
    plain = np.asarray(qr.c51_target(target_logits, online_logits, r, d, z, double_dqn=False))
    double = np.asarray(qr.c51_target(target_logits, online_logits, r, d, z, double_dqn=True))
    np.testing.assert_allclose(plain[0], [0, 0, 1], atol=1e-6)  # target's argmax (0), target's distribution
    np.testing.assert_allclose(double[0], [1, 0, 0], atol=1e-6)  # online's argmax (1), target's distribution of action 1
    # online=None is fine without double DQN
    np.testing.assert_allclose(np.asarray(qr.c51_target(target_logits, None, r, d, z, double_dqn=False)), plain)


def test_distillation_with_a_distributional_student_by_hand():
    rng = np.random.default_rng(6)
    z = np.array([-1.0, 0.0, 1.0, 2.0], np.float32)
    logits = rng.normal(size=(2, 3, 4)).astype(np.float32)
    teacher_q = np.array([[0.3, 0.1, -0.2], [1.0, 1.05, 0.9]], np.float32)
    tau = 0.1
    q_s = (softmax(logits.astype(np.float64)) * z).sum(-1)  # expected Q over atoms, (2, 3)
    p_t, p_s = softmax(teacher_q / tau), softmax(q_s / tau)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    ours = np.asarray(qr.distillation_kl(jnp.asarray(teacher_q), qr.expected_q(jnp.asarray(logits), jnp.asarray(z)), tau))
    np.testing.assert_allclose(ours, kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(qr.expected_q(jnp.asarray(logits), jnp.asarray(z))), q_s, rtol=1e-5)

    # Full loss: importance weights scale both terms per sample.
    actions = np.array([1, 2])
    target = rng.dirichlet(np.ones(4), size=2).astype(np.float32)
    w = np.array([1.0, 0.25], np.float32)
    c = 1.0
    ce = -(target * np.log(softmax(logits[np.arange(2), actions].astype(np.float64)))).sum(-1)
    loss, (metrics, td) = qr.qdagger_rainbow_loss(jnp.asarray(logits), jnp.asarray(actions), jnp.asarray(target), jnp.asarray(teacher_q),
                                                  jnp.asarray(z), jnp.asarray(w), jnp.float32(c), tau)
    np.testing.assert_allclose(float(loss), np.mean(w * (ce + c * kl)), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["td_loss"]), np.mean(w * ce), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distill_loss"]), np.mean(w * kl), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(td), ce, rtol=1e-5)  # unweighted, for the priorities
    np.testing.assert_allclose(float(metrics["q_values"]), q_s[np.arange(2), actions].mean(), rtol=1e-5)
    # lambda * c = 0 switches distillation off entirely
    loss0, (metrics0, _) = qr.qdagger_rainbow_loss(jnp.asarray(logits), jnp.asarray(actions), jnp.asarray(target), jnp.asarray(teacher_q),
                                                   jnp.asarray(z), jnp.asarray(w), jnp.float32(0.0), tau)
    np.testing.assert_allclose(float(loss0), np.mean(w * ce), rtol=1e-5)

    # No gradient into the teacher; the student gets one through its expected Q.
    def f(tq, lg):
        return qr.qdagger_rainbow_loss(lg, jnp.asarray(actions), jnp.asarray(target), tq, jnp.asarray(z), jnp.asarray(w), jnp.float32(c), tau)[0]

    g_teacher, g_student = jax.grad(f, argnums=(0, 1))(jnp.asarray(teacher_q), jnp.asarray(logits))
    assert np.all(np.asarray(g_teacher) == 0)
    assert np.abs(np.asarray(g_student)).sum() > 0


def test_rainbow_loss_without_teacher_q_has_the_td_loss_and_no_teacher_terms():
    """teacher_q=None (no teacher, or lambda is 0 for good): the same weighted CE (and CQL) loss and per-sample CE as
    with the teacher's Q, and the distillation and margin terms 0 even at positive weights, by design: no term reads
    zeros in place of the teacher's Q (which would score a uniform teacher: a KL > 0)."""
    rng = np.random.default_rng(16)
    z = jnp.asarray(np.array([-1.0, 0.0, 1.0, 2.0], np.float32))
    logits = jnp.asarray(rng.normal(size=(3, 3, 4)).astype(np.float32))
    actions, target = jnp.array([1, 2, 0]), jnp.asarray(rng.dirichlet(np.ones(4), size=3).astype(np.float32))
    teacher_q, w = jnp.array([[0.3, 0.1, -0.2], [1.0, 1.05, 0.9], [0.0, 0.5, 0.2]]), jnp.array([1.0, 0.25, 0.5])
    weights = dict(temperature=0.1, cql_weight=jnp.float32(0.5), margin_weight=jnp.float32(1.0))
    loss_t, (m_t, td_t) = qr.qdagger_rainbow_loss(logits, actions, target, teacher_q, z, w, jnp.float32(1.0), **weights)
    loss_0, (m_0, td_0) = qr.qdagger_rainbow_loss(logits, actions, target, None, z, w, jnp.float32(1.0), **weights)
    assert float(m_t["distill_loss"]) > 0 and float(m_t["margin_loss"]) > 0  # live with the teacher's Q
    assert float(m_0["distill_loss"]) == 0.0 and float(m_0["margin_loss"]) == 0.0
    assert float(m_0["td_loss"]) == float(m_t["td_loss"]) > 0 and float(m_0["cql_loss"]) == float(m_t["cql_loss"]) > 0
    np.testing.assert_array_equal(np.asarray(td_0), np.asarray(td_t))  # the priorities' CE
    assert float(loss_0) == pytest.approx(float(m_0["td_loss"]) + 0.5 * float(m_0["cql_loss"]), rel=1e-6)
    _, (m_z, _) = qr.qdagger_rainbow_loss(logits, actions, target, jnp.zeros_like(teacher_q), z, w, jnp.float32(1.0), **weights)
    assert float(m_z["distill_loss"]) > 0  # zeros in place of the teacher's Q would not be 0


# ----------------------------------------------------------------------------
# Sum tree (JAX, level by level)
# ----------------------------------------------------------------------------
def new_tree(leaves):
    return jnp.zeros(2 * (1 << max(int(leaves - 1).bit_length(), 0)), jnp.float32)


def check_tree_consistent(tree):
    nodes = np.asarray(tree, np.float64)
    for i in range(1, nodes.size // 2):
        assert nodes[i] == pytest.approx(nodes[2 * i] + nodes[2 * i + 1], rel=1e-6, abs=1e-6)


def test_sum_tree_set_total_and_masked_leaves():
    tree = new_tree(6)
    assert tree.shape == (16,)
    tree = replay.tree_set(tree, jnp.array([0, 2, 5]), jnp.array([1.0, 3.0, 0.5]), jnp.array([True, True, True]))
    np.testing.assert_array_equal(np.asarray(tree[8:14]), [1, 0, 3, 0, 0, 0.5])
    assert float(tree[1]) == 4.5
    tree = replay.tree_set(tree, jnp.array([2, 3]), jnp.array([0.25, 9.0]), jnp.array([True, False]))  # leaf 3 not kept
    assert float(tree[8 + 3]) == 0.0 and float(tree[1]) == 1.75
    check_tree_consistent(tree)


def test_sum_tree_totals_after_many_random_updates():
    rng = np.random.default_rng(7)
    set_ = jax.jit(replay.tree_set)
    for cap in [1, 2, 3, 1000, 4096]:
        tree = new_tree(cap)
        ref = np.zeros(cap)
        for _ in range(60):
            idx = np.unique(rng.integers(0, cap, size=rng.integers(1, 40)))
            val = rng.exponential(size=idx.size) * (rng.random(idx.size) > 0.3)
            pad = 40 - idx.size  # one shape: one compilation
            tree = set_(tree, jnp.asarray(np.r_[idx, np.zeros(pad, int)]), jnp.asarray(np.r_[val, np.zeros(pad)], jnp.float32),
                        jnp.asarray(np.r_[np.ones(idx.size, bool), np.zeros(pad, bool)]))
            ref[idx] = val
        np.testing.assert_allclose(np.asarray(tree)[tree.shape[0] // 2:][:cap], ref, rtol=1e-6)
        np.testing.assert_allclose(float(tree[1]) if cap > 1 else float(tree[1]), ref.sum(), rtol=1e-5)
        check_tree_consistent(tree)


def test_sum_tree_find_is_the_inverse_cdf():
    tree = replay.tree_set(new_tree(5), jnp.arange(5), jnp.array([1.0, 0.0, 2.0, 0.0, 1.0]), jnp.ones(5, bool))  # cumsum 1, 1, 3, 3, 4
    q = jnp.array([0.0, 0.999, 1.0, 2.5, 2.999, 3.0, 3.999])
    np.testing.assert_array_equal(np.asarray(replay.tree_find(tree, q)), [0, 0, 2, 2, 2, 4, 4])
    # out of range queries (float round-off) still land on a positive leaf
    assert set(np.asarray(replay.tree_find(tree, jnp.array([4.0, 4.0 + 1e-6, 100.0, -1e-7]))).tolist()) <= {0, 2, 4}


# ----------------------------------------------------------------------------
# Prioritized frame replay (the device buffer through tests/replay_adapter.py)
# ----------------------------------------------------------------------------
def run_stream(rb, steps, rng, p_end=0.08, check=None):
    """Feed `rb` a synthetic envpool-style stream (auto-reset step after every end)."""
    E = rb.num_envs
    resetting = np.zeros(E, bool)
    for t in range(steps):
        frames = rng.integers(0, 256, size=(E, 84, 84), dtype=np.uint8)
        nxt = rng.integers(0, 256, size=(E, 84, 84), dtype=np.uint8)
        end = (rng.random(E) < p_end) & ~resetting
        term = end & (rng.random(E) < 0.5)
        trunc = end & ~term
        rb.add(frames, rng.integers(0, 4, E), rng.uniform(-1, 1, E).astype(np.float32), term, trunc, nxt)
        resetting = end
        if check is not None:
            check(rb, t)


def leaves_of(rb):
    tree = np.asarray(rb.rb.tree)
    return tree[tree.shape[0] // 2:]


_valid = jax.jit(replay.replay_valid, static_argnums=(3, 4))


def assert_priorities_mark_valid_rows(rb):
    leaves = leaves_of(rb)
    for e in range(rb.num_envs):
        cnt = int(rb.count[e])
        j = np.arange(max(cnt - rb.rows, 0), cnt)
        ok = np.asarray(_valid(rb.rb, jnp.full(j.size, e), jnp.asarray(j), rb.n_step, 0.99)[0]) if j.size else np.zeros(0, bool)
        np.testing.assert_array_equal(leaves[e * rb.rows + j % rb.rows] > 0, ok, err_msg=f"env {e} count {cnt}")
        if cnt < rb.rows:  # never-written rows hold no priority
            assert np.all(leaves[e * rb.rows + np.arange(cnt, rb.rows)] == 0)
    assert np.all(leaves[rb.num_envs * rb.rows:] == 0)


@pytest.mark.parametrize("num_envs,capacity,n_step", [(1, 37, 3), (3, 60, 3), (2, 41, 1), (4, 64, 5)])
def test_priorities_exactly_on_valid_rows_through_wraparound(num_envs, capacity, n_step):
    rng = np.random.default_rng(10 + num_envs)
    rb = DeviceReplay(capacity, num_envs, n_step, 0.99, prioritized=True)
    run_stream(rb, 150, rng, check=lambda rb, t: assert_priorities_mark_valid_rows(rb) if t % 5 == 4 else None)
    assert (rb.count > rb.rows).all()  # wrapped around several times


def test_new_rows_get_the_max_priority_and_overwritten_rows_lose_theirs():
    rb = DeviceReplay(20, 1, 3, 0.99, prioritized=True)
    f = np.zeros((1, 84, 84), np.uint8)
    step = lambda: rb.add(f, np.array([1]), np.array([0.5], np.float32), np.array([False]), np.array([False]), f)  # noqa: E731
    set_p = lambda idx, loss: setattr(rb, "rb", replay.replay_set_priorities(rb.rb, jnp.array(idx), jnp.array(loss, jnp.float32), alpha=0.5))  # noqa: E731
    for _ in range(5):
        step()
    # rows 0, 1 have their 3-step bootstrap row (3, 4): valid at the initial max priority 1.0
    np.testing.assert_array_equal(leaves_of(rb)[:6], [1, 1, 0, 0, 0, 0])
    set_p([0], [16.0])  # priority sqrt(16 + 1e-10)
    assert float(rb.rb.max_priority) == pytest.approx(4.0)
    step()
    assert leaves_of(rb)[2] == pytest.approx(4.0)  # the newly valid row gets the max so far
    for _ in range(20 - 6):
        step()
    assert leaves_of(rb)[0] > 0
    step()  # overwrites row 0 (absolute 20): its priority goes, and rows 1..3 keep theirs only if their stack is intact
    assert leaves_of(rb)[0] == 0
    np.testing.assert_array_equal(leaves_of(rb)[[1, 2, 3]] > 0, [False, False, False])  # their stacks reached row 0
    assert leaves_of(rb)[4] > 0
    assert_priorities_mark_valid_rows(rb)
    # a stale priority update for an overwritten row is ignored
    set_p([0], [9.0])
    assert leaves_of(rb)[0] == 0


def test_uniform_buffer_has_unit_weights_and_no_tree():
    rng = np.random.default_rng(13)
    rb = DeviceReplay(50, 2, 3, 0.99)
    run_stream(rb, 60, rng)
    b = rb.sample(8, rng)
    assert rb.rb.tree.shape == (2,) and b.weights.shape == (8,) and np.all(b.weights == 1.0)


# ----------------------------------------------------------------------------
# Networks: noisy, dueling, double; the update step
# ----------------------------------------------------------------------------
def test_noisy_dense_keys_and_mean_weights():
    layer = qr.NoisyDense(6, sigma0=0.5)
    x = jnp.asarray(np.random.default_rng(14).normal(size=(3, 16)), jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x)
    p = params["params"]
    np.testing.assert_allclose(np.asarray(p["kernel_sigma"]), 0.5 / 4.0)
    np.testing.assert_allclose(np.asarray(p["bias_sigma"]), 0.5 / 4.0)
    assert np.abs(np.asarray(p["kernel_mu"])).max() <= 0.25
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    y1, y1b, y2 = (np.asarray(layer.apply(params, x, k)) for k in (k1, k1, k2))
    np.testing.assert_array_equal(y1, y1b)  # same key, same output
    assert np.abs(y1 - y2).max() > 1e-3  # different keys, different outputs
    y0 = np.asarray(layer.apply(params, x))  # no key: the mean weights
    np.testing.assert_allclose(y0, np.asarray(x @ p["kernel_mu"] + p["bias_mu"]), rtol=1e-5, atol=1e-6)
    # the factorised form equals building the noisy weight matrix
    k_in, k_out = jax.random.split(k1)
    f = lambda e: np.sign(e) * np.sqrt(np.abs(e))  # noqa: E731
    e_in, e_out = f(np.asarray(jax.random.normal(k_in, (16,)))), f(np.asarray(jax.random.normal(k_out, (6,))))
    w = np.asarray(p["kernel_mu"]) + np.asarray(p["kernel_sigma"]) * np.outer(e_in, e_out)
    b = np.asarray(p["bias_mu"]) + np.asarray(p["bias_sigma"]) * e_out
    np.testing.assert_allclose(y1, np.asarray(x) @ w + b, rtol=1e-4, atol=1e-5)


def linear_teacher(num_actions):
    """A stand-in teacher, cheap to compile: Q(s) = mean pixel of s / 255 times one weight per action."""
    params = {"w": jnp.linspace(-1.0, 1.0, num_actions)}

    def q_fn(p, obs):
        return jnp.mean(obs.astype(jnp.float32), axis=(1, 2, 3))[:, None] / 255.0 * p["w"][None, :]

    return q_fn, params


@pytest.fixture(scope="module")
def obs():
    return np.random.default_rng(15).integers(0, 256, (2, 4, 84, 84), dtype=np.uint8)


@pytest.mark.parametrize("torso,duelings", [("nature", (False, True)), ("impala", (True,))])
def test_network_shapes_dueling_and_noise(torso, duelings, obs):
    A, K = 4, 7
    for dueling in duelings:
        net = qr.RainbowNetwork(A, K, torso, dueling=dueling, noisy=True)
        params = net.init(jax.random.PRNGKey(0), obs)
        head = set(params["params"]) - {"NatureTorso_0", "ImpalaCNN_0"}
        assert head == ({"hidden", "advantage", "value"} if dueling else {"hidden", "logits"})
        if dueling:
            assert params["params"]["value"]["kernel_mu"].shape == (512, K)
            assert params["params"]["advantage"]["kernel_mu"].shape == (512, A * K)
        noisy_apply = lambda p, o, k: net.apply(p, o, key=k)  # noqa: E731
        out = noisy_apply(params, obs, jax.random.PRNGKey(3))
        assert out.shape == (2, A, K)
        same = noisy_apply(params, obs, jax.random.PRNGKey(3))
        other = noisy_apply(params, obs, jax.random.PRNGKey(4))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(same))  # same key, same output
        assert np.abs(np.asarray(out - other)).max() > 0  # fresh noise per key
        np.testing.assert_array_equal(np.asarray(net.apply(params, obs)), np.asarray(net.apply(params, obs)))  # no key: no noise
    if torso == "nature":  # the teacher's SAME-padded torso: 11 * 11 * 64 = 7,744 features
        plain = qr.RainbowNetwork(A, K, "nature")
        params = plain.init(jax.random.PRNGKey(0), obs)
        assert params["params"]["hidden"]["kernel"].shape == (7744, 512)
        assert params["params"]["logits"]["kernel"].shape == (512, A * K)
        # without noisy layers a key changes nothing
        apply = lambda p, o, k: plain.apply(p, o, key=k)  # noqa: E731
        np.testing.assert_array_equal(np.asarray(apply(params, obs, jax.random.PRNGKey(1))), np.asarray(apply(params, obs, jax.random.PRNGKey(2))))


def test_dueling_logits_are_value_plus_centred_advantage(obs):
    net = qr.RainbowNetwork(3, 5, "nature", dueling=True)
    params = net.init(jax.random.PRNGKey(0), obs)
    _, inter = net.apply(params, obs, capture_intermediates=True)
    logits = np.asarray(net.apply(params, obs))
    value = np.asarray(inter["intermediates"]["value"]["__call__"][0]).reshape(2, 1, 5)
    adv = np.asarray(inter["intermediates"]["advantage"]["__call__"][0]).reshape(2, 3, 5)
    np.testing.assert_allclose(logits, value + adv - adv.mean(1, keepdims=True), rtol=1e-5, atol=1e-5)


def test_update_step_runs_with_every_flag(obs):
    import optax

    A = 4
    args = qr.Args(num_atoms=11, dueling=True, noisy=True, double_dqn=True)
    support = qr.make_support(args)
    student = qr.make_student(args, A)
    params = student.init(jax.random.PRNGKey(0), obs)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-4, eps=1.5e-4)
    state = training.QState.create(apply_fn=student.apply, params=params, target_params=params, tx=tx)
    teacher_q_fn, teacher_params = linear_teacher(A)
    update = qr.make_update(student, support, args, teacher_q_fn)
    teacher_q = np.array([[0.1, 0.5, -0.2, 0.0], [1.0, 0.9, 0.95, 1.2]], np.float32)  # cached in the batch: what the update reads
    batch = replay.Batch(obs=obs, actions=np.array([0, 3], np.int32), returns=np.array([1.0, -0.5], np.float32),
                         discounts=np.array([0.99**3, 0.0], np.float32), next_obs=obs[::-1], teacher_q=teacher_q,
                         index=np.array([0, 1], np.int32), weights=np.array([1.0, 0.5], np.float32))
    new_state, metrics, td = update(state, batch, teacher_params, training.coefs(1.0, 1.0, 3e-5), jax.random.PRNGKey(2))
    assert td.shape == (2,) and np.all(np.asarray(td) > 0)
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["distill_loss"]) > 0
    assert float(new_state.opt_state.hyperparams["learning_rate"]) == pytest.approx(3e-5)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    # lambda * c = 0: no distillation term
    _, metrics0, _ = update(state, batch, teacher_params, training.coefs(1.0, 0.0, 1e-5), jax.random.PRNGKey(2))
    assert float(metrics0["distill_loss"]) == 0.0
    # noisy + epsilon-greedy act returns actions and the expected Q they came from
    act = qr.make_act(lambda p, o, k: qr.expected_q(student.apply(p, o, key=k), support))
    a, q, _ = act(params, obs, jax.random.PRNGKey(5), 0.0)
    assert a.shape == (2,) and q.shape == (2, A)
    np.testing.assert_array_equal(np.asarray(a), np.argmax(np.asarray(q), -1))


def test_update_without_teacher_params_is_the_update_with_the_teacher_terms_weighted_0(obs):
    """make_update's update with teacher_params None (no loss may use the teacher; a replay caching no teacher Q, 0
    columns) gives bit for bit the new params and per-sample CE of the update with the teacher at distillation and
    margin weight 0, and logs its teacher terms as 0 even at positive weights; with the teacher at a positive weight
    the update differs."""
    import optax

    A = 4
    args = qr.Args(num_atoms=11)
    support, student = qr.make_support(args), qr.make_student(args, A)
    params = student.init(jax.random.PRNGKey(0), obs)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(1e-4, np.float32), eps=1.5e-4)
    state = training.QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, params), tx=tx)
    teacher_q_fn, teacher_params = linear_teacher(A)
    update = jax.jit(qr.make_update(student, support, args, teacher_q_fn))
    batch = replay.Batch(obs=obs, actions=np.array([2, 1], np.int32), returns=np.array([0.5, -1.0], np.float32),
                         discounts=np.array([0.99**3, 0.0], np.float32), next_obs=obs[::-1],
                         teacher_q=np.asarray(teacher_q_fn(teacher_params, jnp.asarray(obs))), index=np.array([0, 1], np.int32),
                         weights=np.array([1.0, 0.5], np.float32))
    no_q = batch._replace(teacher_q=np.zeros((2, 0), np.float32))
    key = jax.random.PRNGKey(3)
    s_none, m_none, td_none = update(state, no_q, None, training.coefs(1.0, 1.0, 1e-4, margin=1.0), key)  # positive weights, no teacher
    s_zero, m_zero, td_zero = update(state, batch, teacher_params, training.coefs(1.0, 0.0, 1e-4), key)  # the teacher, weights 0
    s_live, m_live, _ = update(state, batch, teacher_params, training.coefs(1.0, 1.0, 1e-4, margin=1.0), key)
    for a, b in zip(jax.tree.leaves((s_none.params, s_none.opt_state, td_none)), jax.tree.leaves((s_zero.params, s_zero.opt_state, td_zero))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m_none["distill_loss"]) == 0.0 and float(m_none["margin_loss"]) == 0.0
    assert float(m_none["td_loss"]) == float(m_zero["td_loss"]) > 0
    assert float(m_live["distill_loss"]) > 0 and float(m_live["margin_loss"]) > 0
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(s_live.params), jax.tree.leaves(s_zero.params)))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(s_none.params), jax.tree.leaves(state.params))]
    assert max(moved) > 0  # the TD step itself moved the params


def test_teacher_q_cached_in_the_teacher_buffer():
    rb = replay.make_replay([20, 20], 3)
    f = np.zeros((2, 84, 84), np.uint8)
    for t in range(15):
        q = np.stack([np.full(3, 100 * e + t, np.float32) for e in range(2)])
        rb = replay.replay_add(rb, 0, f, np.array([1, 2]), np.zeros(2, np.float32), np.array([False, t == 6]), np.zeros(2, bool), f, q)
    b, ok = replay.replay_sample(rb, jax.random.PRNGKey(0), 16, 3, 0.99)
    assert bool(ok)
    env, row = np.divmod(np.asarray(b.index), 20)
    # the row's teacher Q is the one given when its state was added
    # (env 1: rows 0-6 = steps 0-6, row 7 = FINAL, step 7 = the reset step (not stored), row t = step t after)
    np.testing.assert_array_equal(np.asarray(b.teacher_q)[:, 0], 100 * env + row)
    assert not np.any((env == 1) & (row == 7))
    assert np.asarray(b.weights).tolist() == [1.0] * 16


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------
def test_defaults_are_the_papers_rainbow():
    a = qr.Args()
    assert (a.num_atoms, a.v_min, a.v_max, a.n_step, a.gamma) == (51, -10.0, 10.0, 3, 0.99)
    assert (a.distill_coef, a.temperature, a.distill_decay_period) == (1.0, 0.1, 2_500_000)
    assert (a.learning_rate, a.end_learning_rate, a.adam_eps) == (1e-4, 1e-5, 1.5e-4)
    assert (a.learning_starts, a.train_frequency, a.target_network_frequency, a.epsilon_decay_steps) == (20_000, 4, 8_000, 50_000)
    assert (a.end_e, a.eval_epsilon, a.per_alpha, a.per_beta) == (0.01, 0.001, 0.5, 0.5)
    assert not (a.double_dqn or a.dueling or a.noisy) and a.network == "nature"
    assert a.total_timesteps == 3_750_000 and a.noisy_sigma0 == 0.1  # 15 iterations; Dopamine's NoisyNetwork sigma


def test_help_documents_dopamine_prioritized_replay():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(qr.Args, args=["--help"])
    text = " ".join(out.getvalue().replace("\u2502", " ").split())  # drop rich's box borders at line wraps
    for flag in ["--per-alpha", "--per-beta", "--num-atoms", "--v-min", "--v-max", "--double-dqn", "--dueling", "--noisy", "--network"]:
        assert flag in text
    assert "alpha = beta = 0.5 is exactly Dopamine's Rainbow" in text and "normalised by the batch max" in text


@pytest.mark.parametrize("override,flag", [(dict(num_atoms=1), "--num-atoms"), (dict(v_min=1.0, v_max=1.0), "--v-min"),
                                           (dict(per_alpha=-0.1), "--per-alpha"), (dict(per_beta=-1.0), "--per-beta"),
                                           (dict(temperature=0.0), "--temperature")])
def test_bad_flags_raise_config_error(override, flag):
    with pytest.raises(ConfigError, match=flag):
        config.check_args(qr.Args(**override))


def test_lambda_and_learning_rate():
    assert training.lambda_learning_rate(1.0, 1e-4, 1e-5) == pytest.approx(1e-4)
    assert training.lambda_learning_rate(0.5, 1e-4, 1e-5) == pytest.approx(5.5e-5)
    lam, _ = training.distill_lambda_update(1.0, 6.0, 11.0, 1.0, 1000, 2_500_000)  # tns = 0.5
    assert lam == pytest.approx(0.5)
    assert training.distill_lambda_update(0.5, 1.0, 11.0, 1.0, 2_500_001, 2_500_000)[0] == 0.0
    assert training.distill_lambda_update(0.0, 1.0, 11.0, 1.0, 10, 2_500_000)[0] == 0.0
    assert training.distill_lambda_update(0.7, -5.0, 11.0, 1.0, 10, 2_500_000)[0] == pytest.approx(1.6)  # below random: no upper clip
    assert training.distill_lambda_update(0.7, -5.0, 11.0, 1.0, 10, 2_500_000, clip=True)[0] == 1.0


def test_device_and_host_replay_learners_agree_and_rehearsal_without_cached_q():
    """The learner of --replay-on-host (the buffers on the host: each batch sampled there, the update, the new
    priorities and the target sync as separate calls) gives the device learner's results (K fused offline updates;
    online, the store, the updates with their new priorities and the traced target sync in one call): the same pure
    functions, keys and target syncs. Online without the teacher (a replay caching no teacher Q) and with it
    (distillation, the teacher's Q of the stored states, rehearsal from the teacher data); rehearsal mixes teacher rows
    into a student replay that caches no teacher Q."""
    import optax

    A, B = 4, 8
    flags = dict(network="nature", num_atoms=11, batch_size=B, target_network_frequency=12, train_frequency=4, rehearsal_ratio=0.5)
    args, host_args = qr.Args(**flags), qr.Args(**flags, replay_on_host=True)
    support = qr.make_support(args)
    student = qr.make_student(args, A)
    params = student.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(1e-4, np.float32), eps=1.5e-4)
    state0 = training.QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, params), tx=tx)
    teacher_q_fn, teacher_params = linear_teacher(A)
    device = jax.devices()[0]
    learner = qr.make_learner(args, student, support, teacher_q_fn, device)
    host_learner = qr.make_learner(host_args, student, support, teacher_q_fn, device)
    rng = np.random.default_rng(0)
    copy = functools.partial(jax.tree.map, jnp.copy)

    def filled(q_dim, prioritized):
        rb = replay.make_replay([40, 40], q_dim, prioritized=prioritized)
        for t in range(40):
            rb = learner.add(rb, 0, rng.integers(0, 256, (2, 84, 84), np.uint8), rng.integers(0, A, 2).astype(np.int32),
                             rng.uniform(-1, 1, 2).astype(np.float32), np.array([t % 11 == 10, False]), np.array([False, t % 13 == 12]),
                             rng.integers(0, 256, (2, 84, 84), np.uint8), rng.normal(size=(2, q_dim)).astype(np.float32) if q_dim else None)
        return rb

    def assert_close(a, b, atol):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=atol)

    trb = filled(A, False)
    c = training.coefs(1.0, 1.0, 1e-4)
    fused, key_f, m_f = learner.offline(copy(state0), trb, jax.random.PRNGKey(7), 0, 5, c, teacher_params)
    host, key_h, m_h = host_learner.offline(copy(state0), trb, jax.random.PRNGKey(7), 0, 5, c, teacher_params)
    assert np.asarray(m_f["loss"]).shape == (5,) and np.all(np.asarray(m_f["distill_loss"]) > 0)  # the teacher's cached Q was read
    np.testing.assert_allclose(np.asarray(m_f["loss"]), np.asarray(m_h["loss"]), rtol=2e-5)
    assert np.array_equal(np.asarray(key_f), np.asarray(key_h))
    assert_close((fused.params, fused.target_params), (host.params, host.target_params), 1e-7)

    rb = filled(0, True)  # no distillation or margin term online: the student's replay caches 0 columns
    batch, ok, rehearsed = learner.sample(rb, trb, jax.random.PRNGKey(3))
    assert bool(ok) and batch.teacher_q.shape == (B, 0) and 0 < int(np.asarray(rehearsed).sum()) < B

    def transition(t):
        return (rng.integers(0, 256, (2, 4, 84, 84), np.uint8), rng.integers(0, A, 2).astype(np.int32), rng.uniform(-1, 1, 2).astype(np.float32),
                np.array([False, t == 3]), np.array([False, False]), rng.integers(0, 256, (2, 4, 84, 84), np.uint8))

    # Without the teacher: the store, the updates with new priorities and a target sync (after step 2's updates)
    a_state, b_state, a_rb, b_rb = copy(state0), copy(state0), copy(rb), copy(rb)
    a_key = b_key = jax.random.PRNGKey(9)
    for t in range(6):
        tr = transition(t)
        a_state, a_rb, a_key, _ = learner.online(a_state, a_rb, None, a_key, tr, None, c, t == 2, 2)
        b_state, b_rb, b_key, _ = host_learner.online(b_state, b_rb, None, b_key, tr, None, c, t == 2, 2)
        if t == 2:
            synced = jax.tree.map(np.asarray, b_state.params)
            assert_close(b_state.target_params, synced, 0.0)  # the host learner synced after the step's updates
    assert_close((a_state.params, a_state.target_params, a_rb), (b_state.params, b_state.target_params, b_rb), 1e-6)
    assert_close(a_state.target_params, synced, 1e-7)
    assert not all(np.allclose(np.asarray(a), b) for a, b in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(synced)))  # learned after the sync
    assert np.asarray(a_key).tolist() == np.asarray(b_key).tolist()

    # With the teacher: its Q of the stored states cached (computed inside the device step; before the host store),
    # distillation, and rehearsal from the teacher data
    rb_q = filled(A, True)
    a_state, b_state, a_rb, b_rb = copy(state0), copy(state0), copy(rb_q), copy(rb_q)
    count0, steps = np.asarray(rb_q.count), [transition(t) for t in range(3)]
    for tr in steps:
        a_state, a_rb, a_key, m_a = learner.online(a_state, a_rb, trb, a_key, tr, teacher_params, c, False, 2)
        b_state, b_rb, b_key, m_b = host_learner.online(b_state, b_rb, trb, b_key, tr, teacher_params, c, False, 2)
        assert float(m_a["distill_loss"]) > 0 and float(m_a["rehearsal_share"]) == float(m_b["rehearsal_share"])
        np.testing.assert_allclose(float(m_a["loss"]), float(m_b["loss"]), rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(a_rb.count), count0 + 3)  # every step stored (no episode end in them)
    rows = np.arange(2)[None, :] * 40 + (count0[None, :] + np.arange(3)[:, None]) % 40  # (step, stream)
    want = np.stack([np.asarray(teacher_q_fn(teacher_params, jnp.asarray(tr[0]))) for tr in steps])  # (step, stream, A)
    np.testing.assert_allclose(np.asarray(a_rb.teacher_q)[rows], want, rtol=1e-6)
    assert_close((a_state.params, a_state.target_params, a_rb), (b_state.params, b_state.target_params, b_rb), 1e-6)
    assert np.asarray(a_key).tolist() == np.asarray(b_key).tolist()
