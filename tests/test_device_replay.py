"""The device (JAX) replay both scripts use (reincarnate/replay.py), uniform (the DQN's, the teacher data) and
prioritized (the Rainbow student's), against the numpy frame store the scripts used before (tests/numpy_replay.py):
same valid set, n-step returns, discounts, stacks, priorities and sampling law."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_replay as nr
import qdagger_dqn_atari_jax as dqn
import qdagger_rainbow_atari_jax as rainbow
from reincarnate import replay, speed, training

SCRIPTS = [pytest.param(dqn, id="dqn"), pytest.param(rainbow, id="rainbow")]
KINDS = [pytest.param(False, id="uniform"), pytest.param(True, id="prioritized")]


def random_streams(num_envs, steps, seed, p_term=0.03, p_trunc=0.02):
    """envpool-like vector steps: random frames, actions, rewards, terminations and truncations."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        frames = rng.integers(0, 256, (num_envs, 84, 84), np.uint8)
        actions = rng.integers(0, 6, num_envs).astype(np.int32)
        rewards = rng.uniform(-1, 1, num_envs).astype(np.float32)
        u = rng.uniform(size=num_envs)
        terminated, truncated = u < p_term, (u >= p_term) & (u < p_term + p_trunc)
        next_frames = rng.integers(0, 256, (num_envs, 84, 84), np.uint8)
        out.append((frames, actions, rewards, terminated, truncated, next_frames))
    return out


@functools.lru_cache(maxsize=None)
def adder(n_step):
    """The jitted replay_add of an n-step horizon (a prioritized replay gives a row its priority once it is a valid
    transition for that horizon; a uniform one ignores it): one per horizon, so each shape compiles once."""
    return jax.jit(functools.partial(replay.replay_add, n_step=n_step), static_argnums=1)


def sampler(prioritized, batch_size, n_step, gamma):
    """The sampler of the buffer kind: rejection sampling over the stored rows (uniform), or the sum tree (prioritized,
    beta 0.5 as Dopamine's Rainbow)."""
    if prioritized:
        return jax.jit(lambda rb, k: replay.replay_sample_prioritized(rb, k, batch_size, n_step, gamma, 0.5))
    return jax.jit(lambda rb, k: replay.replay_sample(rb, k, batch_size, n_step, gamma))


def fill_both(capacity, num_envs, n_step, gamma, steps, seed, prioritized=False):
    ref = nr.FrameReplayBuffer(capacity, num_envs, n_step, gamma, prioritized=prioritized)
    rows = ref.rows
    rb = replay.make_replay([rows] * num_envs, 0, prioritized=prioritized)
    add = adder(n_step)
    for frames, actions, rewards, term, trunc, nxt in random_streams(num_envs, steps, seed):
        ref.add(frames, actions, rewards, term, trunc, nxt)
        rb = add(rb, 0, frames, actions, rewards, term, trunc, nxt)
    return ref, rb


def all_rows(ref):
    env = np.repeat(np.arange(ref.num_envs), ref.rows)
    pos = np.tile(np.arange(ref.rows), ref.num_envs)
    j = np.maximum(ref.count[env] - ref.rows, 0) + pos
    keep = pos < np.minimum(ref.count[env], ref.rows)
    return env[keep], j[keep]


def leaves(rb):
    return np.asarray(rb.tree)[rb.tree.shape[0] // 2:]


@pytest.mark.parametrize("prioritized", KINDS)
@pytest.mark.parametrize("num_envs, capacity, steps, n_step", [(1, 64, 300, 3), (3, 150, 160, 3), (2, 400, 120, 1), (4, 48, 90, 5)])
def test_valid_set_returns_discounts_and_stacks_match_numpy(prioritized, num_envs, capacity, steps, n_step):
    gamma = 0.97
    ref, rb = fill_both(capacity, num_envs, n_step, gamma, steps, seed=capacity + steps, prioritized=prioritized)
    np.testing.assert_array_equal(np.asarray(rb.count), ref.count)
    env, j = all_rows(ref)
    ok_ref, ret_ref, disc_ref, L_ref = ref.valid(env, j)
    ok, ret, disc, L = jax.device_get(replay.replay_valid(rb, jnp.asarray(env), jnp.asarray(j), n_step, gamma))
    np.testing.assert_array_equal(ok, ok_ref)
    assert 0 < ok.sum() < len(ok)  # both kinds of rows are exercised
    v = ok_ref
    np.testing.assert_allclose(ret[v], ret_ref[v], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(disc[v], disc_ref[v], rtol=1e-6)
    np.testing.assert_array_equal(L[v], L_ref[v])
    if steps * num_envs > capacity:
        assert (ref.count > ref.rows).any()  # wrapped around
    stacks = np.asarray(replay.replay_stacks(rb, jnp.asarray(env[v]), jnp.asarray(j[v])))
    np.testing.assert_array_equal(stacks, ref._stacks(env[v], j[v] % ref.rows))
    nxt = np.asarray(replay.replay_stacks(rb, jnp.asarray(env[v]), jnp.asarray(j[v] + L[v])))
    np.testing.assert_array_equal(nxt, ref._stacks(env[v], (j[v] + L_ref[v]) % ref.rows))
    flat = env * ref.rows + j % ref.rows
    np.testing.assert_array_equal(np.asarray(rb.actions)[flat], ref.actions[env, j % ref.rows])
    if prioritized:  # a priority (the initial max, 1) exactly on the valid rows, as the oracle's tree
        np.testing.assert_array_equal(np.flatnonzero(leaves(rb) > 0), np.sort(flat[ok_ref]))
        np.testing.assert_allclose(leaves(rb)[: ref.tree.capacity], ref.tree.nodes[ref.tree.leaf0:][: ref.tree.capacity])
    else:
        assert rb.tree.shape == (2,) and rb.pending.shape == (1,)  # the stub: no per-row priority bookkeeping


@pytest.mark.parametrize("prioritized", KINDS)
def test_adding_whole_observations_stores_their_newest_frames(prioritized):
    """The loops store the (N, 4, 84, 84) observations they acted on (already on the device); the replay keeps only
    each one's newest frame, exactly as if the frames had been passed."""
    by_frames = by_stacks = replay.make_replay([40] * 3, 0, prioritized=prioritized)
    add = adder(3)
    rng = np.random.default_rng(5)
    for frames, actions, rewards, term, trunc, nxt in random_streams(3, 70, seed=11):
        # older stack slots hold other frames: only slot 3 may be read
        obs, next_obs = (np.concatenate([rng.integers(0, 256, (3, 3, 84, 84), np.uint8), f[:, None]], axis=1) for f in (frames, nxt))
        by_frames = add(by_frames, 0, frames, actions, rewards, term, trunc, nxt)
        by_stacks = add(by_stacks, 0, jnp.asarray(obs), jnp.asarray(actions), rewards, term, trunc, jnp.asarray(next_obs))
    for a, b in zip(jax.tree.leaves(by_frames), jax.tree.leaves(by_stacks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(by_frames.count.sum()) > 120  # wrapped around
    if prioritized:
        assert (leaves(by_frames) > 0).any()  # the sum tree was written too (and compared above)


@pytest.mark.parametrize("prioritized", KINDS)
def test_sampling_covers_exactly_the_valid_rows_uniformly(prioritized):
    """Uniform sampling, and prioritized sampling while every valid row has the same priority (each new row gets the
    max priority, 1 until a priority is set), draw exactly the valid rows, each as often (weights all 1)."""
    gamma, n_step = 0.99, 3
    ref, rb = fill_both(60, 2, n_step, gamma, 80, seed=5, prioritized=prioritized)
    env, j = all_rows(ref)
    ok_ref = ref.valid(env, j)[0]
    valid_flat = set((env * ref.rows + j % ref.rows)[ok_ref].tolist())
    sample = sampler(prioritized, 32, n_step, gamma)
    counts = {}
    key = jax.random.PRNGKey(0)
    for _ in range(300):
        key, k = jax.random.split(key)
        batch, ok = sample(rb, k)
        assert bool(ok)
        assert np.all(np.asarray(batch.weights) == 1.0)
        for i in np.asarray(batch.index).tolist():
            counts[i] = counts.get(i, 0) + 1
    assert set(counts) == valid_flat
    freq = np.array(list(counts.values())) / (300 * 32)
    expected = 1 / len(valid_flat)
    assert abs(freq.mean() - expected) < 1e-9 and freq.std() < 0.35 * expected  # multinomial noise only


@pytest.mark.parametrize("prioritized", KINDS)
def test_sample_batch_is_consistent(prioritized):
    gamma, n_step = 0.9, 3
    ref, rb = fill_both(200, 2, n_step, gamma, 90, seed=11, prioritized=prioritized)
    batch, ok = sampler(prioritized, 64, n_step, gamma)(rb, jax.random.PRNGKey(3))
    assert bool(ok)
    flat = np.asarray(batch.index)
    env, r = np.divmod(flat, ref.rows)
    j = np.maximum(ref.count[env] - ref.rows, 0) + (r - ref.count[env]) % ref.rows
    j = np.where(ref.count[env] > ref.rows, j, r)
    ok_ref, ret, disc, L = ref.valid(env, j)
    assert ok_ref.all()
    np.testing.assert_allclose(np.asarray(batch.returns), ret, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(batch.discounts), disc, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch.obs), ref._stacks(env, r))
    np.testing.assert_array_equal(np.asarray(batch.next_obs), ref._stacks(env, (j + L) % ref.rows))
    np.testing.assert_array_equal(np.asarray(batch.actions), ref.actions[env, r])
    assert batch.weights.shape == (64,) and batch.teacher_q.shape == (64, 0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_hot_paths_have_no_loop_but_the_fused_scan(script):
    """The jitted online step (store + updates) and the offline call loop nowhere but in the fused scan of
    accelerators (written out on a CPU): no trip waits for the host on a GPU."""
    import optax

    rainbow_ = script is rainbow
    args = script.Args(num_envs=2, batch_size=8)
    student = script.make_student(args, 4) if rainbow_ else script.make_student(args.network, 4)
    params = student.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(1e-4, np.float32), eps=1.5e-4)
    state = training.QState.create(apply_fn=student.apply, params=params, target_params=params, tx=tx)
    teacher = script.make_student(script.Args(network="nature", num_atoms=11), 4) if rainbow_ else script.make_student("nature", 4)
    teacher_params = teacher.init(jax.random.PRNGKey(1), np.zeros((1, 4, 84, 84), np.uint8))
    teacher_q = (lambda p, o: script.expected_q(teacher.apply(p, o), jnp.linspace(-10, 10, 11))) if rainbow_ else teacher.apply
    device = jax.devices()[0]
    learner = (script.make_learner(args, student, script.make_support(args), teacher_q, device) if rainbow_
               else script.make_learner(args, student, teacher_q, device))
    rb = replay.make_replay([64, 64], 4, prioritized=rainbow_)
    c = training.coefs(1.0, 1.0, 1e-4)
    z = np.zeros((2, 4, 84, 84), np.uint8)
    step = (z, np.zeros(2, np.int32), np.zeros(2, np.float32), np.zeros(2, bool), np.zeros(2, bool), z)
    # the online step with the teacher's forward pass in it (distillation on) and a traced target sync
    online = jax.make_jaxpr(lambda s, rb, k, tp, sync: learner.online(s, rb, None, k, step, tp, c, sync, 2))(
        state, rb, jax.random.PRNGKey(0), teacher_params, False)
    offline = jax.make_jaxpr(lambda s, t, k, tp: learner.offline(s, t, k, 0, 2, c, tp))(state, replay.make_replay([128], 4), jax.random.PRNGKey(0),
                                                                                           teacher_params)
    for jaxpr in (online, offline):
        text = str(jaxpr)
        assert "while[" not in text and "cond[" not in text
        assert text.count("scan[") == (0 if speed.on_cpu() else int(jaxpr is offline))
    assert "conv_general_dilated" in str(online) and "conv_general_dilated" in str(offline)  # the updates' bodies were read


def test_the_uniform_samplers_candidates_are_ok_exactly_when_they_hold_a_batch_of_valid_rows():
    """The uniform sampler's max_rounds x batch uniform candidates: ok with the binomial probability
    P(Bin(R*B, f) >= B), f the valid share of the stored rows, and an ok batch holds valid rows only. (The prioritized
    sampler draws only rows with a priority, the valid ones, so it is ok on every draw while one is stored:
    test_sampling_covers_exactly_the_valid_rows_uniformly.)"""
    from math import comb

    gamma, n_step, B, R, trials = 0.99, 3, 8, 1, 600  # f = 0.8 here: P(ok) = 0.8^8 = 0.17
    ref, rb = fill_both(60, 2, n_step, gamma, 80, seed=5)
    env, j = all_rows(ref)
    ok_ref = ref.valid(env, j)[0]
    valid_flat = set((env * ref.rows + j % ref.rows)[ok_ref].tolist())
    f = len(valid_flat) / int(np.minimum(ref.count, ref.rows).sum())
    assert 0.5 < f < 1.0  # some invalid rows, so a batch can fail
    n = R * B
    p_ok = sum(comb(n, k) * f**k * (1 - f) ** (n - k) for k in range(B, n + 1))
    sample = jax.jit(lambda rb, k: replay.replay_sample(rb, k, B, n_step, gamma, max_rounds=R))
    oks = 0
    for t in range(trials):
        batch, ok = sample(rb, jax.random.PRNGKey(t))
        if bool(ok):
            oks += 1
            assert set(np.asarray(batch.index).tolist()) <= valid_flat
    assert abs(oks / trials - p_ok) < 4 * np.sqrt(p_ok * (1 - p_ok) / trials) + 1e-3


@pytest.mark.parametrize("prioritized", KINDS)
def test_sampling_an_empty_or_invalid_buffer_reports_not_ok(prioritized):
    rb = replay.make_replay([16], 0, prioritized=prioritized)
    sample = sampler(prioritized, 4, 3, 0.99)
    _, ok = sample(rb, jax.random.PRNGKey(0))
    assert not bool(ok)
    # two rows stored, neither with its 3-step bootstrap row yet: none is a valid transition
    f = np.zeros((1, 84, 84), np.uint8)
    for _ in range(2):
        rb = adder(3)(rb, 0, f, np.zeros(1, np.int32), np.zeros(1, np.float32), np.zeros(1, bool), np.zeros(1, bool), f)
    assert int(rb.count[0]) == 2
    _, ok = sample(rb, jax.random.PRNGKey(0))
    assert not bool(ok)


@pytest.mark.parametrize("prioritized", KINDS)
def test_bytes_per_transition(prioritized):
    assert replay.replay_bytes([1_000_000], 0, prioritized) / 1_000_000 <= 7200
    assert replay.replay_bytes([1_000_000], 18, prioritized) / 1_000_000 <= 7200  # with cached teacher Q of 18 actions
    # what is allocated: the per-row arrays (and the sum tree), the per-stream bookkeeping aside
    rb = replay.make_replay([500, 500], 3, prioritized=prioritized)
    per_row = sum(a.nbytes for a in rb if a.shape[:1] == (1000,))
    assert replay.replay_bytes([500, 500], 3, prioritized) == per_row + (rb.tree.nbytes if prioritized else 0)
    assert sum(a.nbytes for a in rb if a.shape[:1] != (1000,)) - (rb.tree.nbytes if prioritized else 0) < 100


def fill_prioritized(capacity, num_envs, n_step, steps, seed, priority_updates=0):
    """The same streams into the numpy oracle and the JAX buffer, with random priority updates in between."""
    gamma = 0.99
    ref = nr.FrameReplayBuffer(capacity, num_envs, n_step, gamma, prioritized=True)
    rb = replay.make_replay([ref.rows] * num_envs, 0, prioritized=True)
    add = adder(n_step)
    set_p = jax.jit(functools.partial(replay.replay_set_priorities, alpha=0.5))
    rng = np.random.default_rng(seed)
    for t, (frames, actions, rewards, term, trunc, nxt) in enumerate(random_streams(num_envs, steps, seed)):
        ref.add(frames, actions, rewards, term, trunc, nxt)
        rb = add(rb, 0, frames, actions, rewards, term, trunc, nxt)
        if priority_updates and t % 7 == 6 and ref.tree.total > 0:
            leaves_, _ = ref.tree.sample(8, rng)
            losses = rng.uniform(0, 3, leaves_.size)
            env, r = np.divmod(leaves_, ref.rows)
            ref.update_priorities(env, r, losses)
            rb = set_p(rb, jnp.asarray(leaves_, jnp.int32), jnp.asarray(losses, jnp.float32))
    return ref, rb


@pytest.mark.parametrize("num_envs, capacity, steps, n_step", [(1, 40, 200, 3), (3, 90, 120, 3), (2, 64, 150, 1)])
def test_sum_tree_leaves_match_numpy_through_wraparound_and_priority_updates(num_envs, capacity, steps, n_step):
    ref, rb = fill_prioritized(capacity, num_envs, n_step, steps, seed=capacity, priority_updates=True)
    F = num_envs * ref.rows
    tree_leaves = leaves(rb)[:F]
    np.testing.assert_allclose(tree_leaves, ref.tree.nodes[ref.tree.leaf0:][:F], rtol=1e-6)
    # Leaf > 0 exactly for the valid rows, and the root holds the sum.
    env, j = all_rows(ref)
    ok = ref.valid(env, j)[0]
    assert set(np.flatnonzero(tree_leaves > 0)) == set((env * ref.rows + j % ref.rows)[ok].tolist())
    assert float(rb.tree[1]) == pytest.approx(tree_leaves.sum(), rel=1e-5)
    assert float(rb.max_priority) == pytest.approx(ref.tree.max_priority, rel=1e-6)
    assert (ref.count > ref.rows).all()  # wrapped


def test_prioritized_sampling_follows_the_priorities():
    ref, rb = fill_prioritized(120, 2, 3, 80, seed=1)
    tree_leaves = leaves(rb)
    valid = np.flatnonzero(tree_leaves > 0)
    priorities = np.random.default_rng(2).uniform(0.1, 4.0, valid.size).astype(np.float32)
    rb = replay.replay_set_priorities(rb, jnp.asarray(valid, jnp.int32), jnp.asarray(priorities) ** 2, alpha=0.5)  # sqrt(p^2) = p
    sample = sampler(True, 32, 3, 0.99)
    counts = np.zeros(tree_leaves.size)
    key = jax.random.PRNGKey(0)
    n = 600
    for _ in range(n):
        key, k = jax.random.split(key)
        batch, ok = sample(rb, k)
        assert bool(ok)
        idx = np.asarray(batch.index)
        np.add.at(counts, idx, 1)
        probs = leaves_p = priorities[np.searchsorted(valid, idx)] / priorities.sum()
        np.testing.assert_allclose(np.asarray(batch.weights), (probs.min() / leaves_p) ** 0.5, rtol=1e-4)
    expected = np.zeros(tree_leaves.size)
    expected[valid] = priorities / priorities.sum() * n * 32
    assert counts[tree_leaves == 0].sum() == 0
    chi2 = ((counts[valid] - expected[valid]) ** 2 / expected[valid]).sum()
    assert chi2 < valid.size + 5 * np.sqrt(2 * valid.size), chi2  # stratified sampling is tighter than multinomial


@pytest.mark.parametrize("layout", ["run", "notfull"])
@pytest.mark.parametrize("n_step", [1, 3])
def test_a_loaded_dopamine_replay_samples_exactly_dopamines_transitions(layout, n_step):
    """The frame store filled from the teacher's Dopamine replay (the teacher data: a uniform buffer, as
    reincarnate/collect.py makes it): its valid rows are exactly Dopamine's valid indices, and their transitions equal
    Dopamine's sample_transition_batch (via the loader's oracle)."""
    from conftest import FIXTURES
    from reincarnate.dopamine_replay import load_dopamine_replay

    gamma = 0.99
    loaded = load_dopamine_replay(FIXTURES / "dopamine_replay" / layout, update_horizon=n_step, gamma=gamma, progress=False)
    rb = replay.make_replay([loaded.capacity], 0)
    rb = replay.replay_fill_from_dopamine(rb, loaded, 0, chunk=64)
    C = loaded.capacity
    j = np.asarray(rb.count)[0] - C + np.arange(C) if loaded.is_full else np.arange(C)
    j = j[np.argsort(j % C)]  # absolute rows, ordered by Dopamine's index
    s = np.zeros(C, np.int32)
    ok, ret, disc, L = jax.device_get(replay.replay_valid(rb, jnp.asarray(s), jnp.asarray(j), n_step, gamma))
    if not loaded.is_full:
        ok = ok & (np.arange(C) < loaded.add_count)
    np.testing.assert_array_equal(np.flatnonzero(ok), loaded.valid_indices())
    idx = loaded.valid_indices()
    want = loaded.transitions(idx)
    np.testing.assert_array_equal(np.asarray(replay.replay_stacks(rb, jnp.asarray(s[idx]), jnp.asarray(j[idx]))), want["state"])
    np.testing.assert_array_equal(np.asarray(replay.replay_stacks(rb, jnp.asarray(s[idx]), jnp.asarray(j[idx] + L[idx]))), want["next_state"])
    np.testing.assert_allclose(ret[idx], want["reward"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(disc[idx] == 0, want["terminal"])
    np.testing.assert_array_equal(np.asarray(rb.actions)[idx], want["action"])
    # Uniform sampling only ever returns Dopamine-valid rows.
    batch, good = replay.replay_sample(rb, jax.random.PRNGKey(0), 256, n_step, gamma)
    assert bool(good) and set(np.asarray(batch.index).tolist()) <= set(idx.tolist())
