"""Independent oracles for the rules a result depends on, each written from the reference's own logic (Dopamine 4.0.6
and google-research/reincarnating_rl at 3eb419c), not from our code:

- the online counters: Dopamine's agent loop (begin_episode / step / end_episode around _train_step) reduced to its
  counters, against `train_steps_due` and `online_epsilon`, with and without an offline phase, for 1 and 3 envs;
- the offline target syncs: the reference's persistence loop (`training_steps % persistence_target_update_period`),
  against the jitted offline call itself;
- each method's loss on a hand-made batch: the terms written out in numpy and composed as each method's agent does
  (dagger, ql-dagger, dqfd with lambda^2, pretrain's CQL, finetune's MSE), against the scripts' loss with the weights
  the scripts build for the phase (`phase_coefs`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdagger_dqn_atari_jax as q
import qdagger_rainbow_atari_jax as qr


# ----------------------------------------------------------------------------
# Dopamine's agent loop, reduced to its counters
# ----------------------------------------------------------------------------
def dopamine_linearly_decaying_epsilon(decay_period, step, warmup_steps, epsilon):
    """dopamine/jax/agents/dqn/dqn_agent.py linearly_decaying_epsilon, restated."""
    steps_left = decay_period + warmup_steps - step
    bonus = (1.0 - epsilon) * steps_left / decay_period
    return epsilon + float(np.clip(bonus, 0.0, 1.0 - epsilon))


def persistence_epsilon(decay_period, step, warmup_steps, epsilon):
    """reincarnating_rl/loss_helpers.py persistence_linearly_decaying_epsilon: the same without the warm-up."""
    return dopamine_linearly_decaying_epsilon(decay_period, step, 0, epsilon)


def dopamine_online(episode_lengths, offline_updates, replay_before, min_replay_history, update_period, target_update_period,
                    epsilon_fn, decay_period, epsilon_train=0.01):
    """Agent steps as the reference's runner drives Dopamine's agent online, per agent step t (from 0): the epsilon of
    a_t, and whether the training step run just before a_t updated and synced the target.

    begin_episode: _train_step, then select_action. step: store the previous transition, _train_step, select_action.
    end_episode: store the last transition. _train_step (distillation_dqn_agent.training_step): if add_count >
    min_replay_history and training_steps % update_period == 0: update, and sync if training_steps %
    target_update_period == 0; then training_steps += 1. training_steps starts at the offline updates (each
    persistence step counted one). select_action reads epsilon_fn(decay_period, training_steps, min_replay_history,
    epsilon_train). add_count counts stored transitions only: Dopamine's also counts the 3 zero rows it writes at each
    episode start, so its learning starts 3 agent steps earlier per episode played (a deviation README lists)."""
    training_steps, add_count = offline_updates, replay_before
    out = []
    for length in episode_lengths:
        for k in range(length):
            if k > 0:
                add_count += 1  # step() stores the previous transition before training
            updated = synced = False
            if add_count > min_replay_history and training_steps % update_period == 0:
                updated = True
                synced = training_steps % target_update_period == 0
            training_steps += 1
            out.append((epsilon_fn(decay_period, training_steps, min_replay_history, epsilon_train), updated, synced))
        add_count += 1  # end_episode stores the last one
    return out


CASES = {
    # name: (script, method, offline updates, student steps already in its replay, total online steps, overrides)
    "qdagger after 1M offline updates": (q, "qdagger", 1_000_000, 0, 45_000, {}),
    "qdagger, a short offline phase (64 updates, not a multiple of 4)": (q, "qdagger", 66, 0, 2_000,
                                                                            dict(learning_starts=128, target_network_frequency=40, epsilon_decay_steps=300)),
    "kickstarting": (q, "kickstarting", 0, 0, 60_000, {}),
    "tabula rasa (warm-up then linear)": (q, "tabula-rasa", 0, 0, 30_000, dict(epsilon_decay_steps=5_000)),
    "--offline-acting (the student's 96 offline steps in its replay)": (q, "qdagger", 96, 96, 2_000,
                                                                        dict(learning_starts=128, target_network_frequency=40, epsilon_decay_steps=300)),
    "rainbow qdagger": (qr, "qdagger", 1_000_000, 0, 30_000, {}),
}


@pytest.mark.parametrize("num_envs", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_online_counters_follow_dopamines_agent_loop(case, num_envs):
    """Epsilon of every online action, and the updates and target syncs, as Dopamine's agent makes them: for one env
    exactly step by step; for 3 envs the updates and syncs due after each vector step are the reference's for the
    agent steps it stored (the loop runs the training steps of agent steps g+1 .. g+N after storing g .. g+N-1)."""
    script, method, offline_updates, replay_before, total, overrides = CASES[case]
    args = script.resolve_method(script.Args(method=method, **overrides), set(overrides))
    warm = args.epsilon_warmup_steps > 0
    assert warm == (method == "tabula-rasa")  # Dopamine's dqn.gin warms up; the reference's persistence epsilon does not
    epsilon_fn = dopamine_linearly_decaying_epsilon if warm else persistence_epsilon
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 3_000, 1_000)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), total + 2 * num_envs) + 1]
    # Dopamine's warm-up is its min_replay_history: the tabula-rasa preset sets both to 20,000
    if warm:
        assert args.epsilon_warmup_steps == args.learning_starts == 20_000
    ref = dopamine_online(lengths, offline_updates, replay_before, args.learning_starts, args.train_frequency,
                          args.target_network_frequency, epsilon_fn, args.epsilon_decay_steps)
    ref_eps = np.array([e for e, _, _ in ref])
    ref_upd = np.array([u for _, u, _ in ref])
    ref_sync = np.array([s for _, _, s in ref])
    updates = syncs = 0
    for g in range(0, total, num_envs):  # vector steps: agent steps g .. g + num_envs - 1
        assert script.online_epsilon(args, offline_updates, g) == pytest.approx(ref_eps[g], abs=1e-12), g
        due = lambda every: script.train_steps_due(g, g + num_envs, offline_updates, replay_before, args.learning_starts, every)  # noqa: E731
        n, s = due(args.train_frequency), due(args.target_network_frequency)
        assert n == ref_upd[g + 1 : g + num_envs + 1].sum(), g
        assert (s > 0) == ref_sync[g + 1 : g + num_envs + 1].any(), g
        updates, syncs = updates + n, syncs + (s > 0)
    if num_envs == 1:
        assert not ref_upd[0]  # before the first action the replay is empty (or holds only --offline-acting's steps)
        assert updates == ref_upd[1 : total + 1].sum() and syncs == ref_sync[1 : total + 1].sum()
    # the schedule is the paper's: after 1M offline updates epsilon is 0.01 from the first online action, learning
    # starts after learning_starts agent steps (one update per 4 from there)
    first_update = int(np.argmax(ref_upd))
    assert args.learning_starts - replay_before < first_update <= args.learning_starts - replay_before + args.train_frequency
    if offline_updates >= args.epsilon_decay_steps:
        assert (ref_eps == 0.01).all()


def test_epsilon_of_the_first_online_actions_by_hand():
    """The first actions' epsilon, worked out by hand. Tabula rasa: 1 through the 20,000-step warm-up, then
    1 - 0.99 * (T - 20,000) / 250,000 with T = agent step + 1. Kickstarting: 1 - 0.99 * T / 50,000. After 1M offline
    updates: 0.01."""
    tr = q.resolve_method(q.Args(method="tabula-rasa"), set())
    assert [q.online_epsilon(tr, 0, t) for t in (0, 19_998, 19_999)] == [1.0, 1.0, 1.0]
    assert q.online_epsilon(tr, 0, 20_000) == pytest.approx(1 - 0.99 * 1 / 250_000)
    assert q.online_epsilon(tr, 0, 144_999) == pytest.approx(1 - 0.99 * 0.5)
    assert q.online_epsilon(tr, 0, 270_000) == 0.01
    ks = q.resolve_method(q.Args(method="kickstarting"), set())
    assert q.online_epsilon(ks, 0, 0) == pytest.approx(1 - 0.99 / 50_000)
    assert q.online_epsilon(ks, 0, 24_999) == pytest.approx(1 - 0.99 * 0.5)
    assert q.online_epsilon(q.Args(), 1_000_000, 0) == 0.01
    assert qr.online_epsilon(qr.resolve_method(qr.Args(method="tabula-rasa"), set()), 0, 0) == 0.01  # noisy nets


def test_train_steps_due_by_hand():
    # learning starts 20,000, one update per 4: the training step before agent step t updates once the replay holds
    # t > 20,000 transitions and (offline + t) % 4 == 0. After 1M offline updates: t = 20,004, 20,008, ...
    assert q.train_steps_due(0, 20_003, 1_000_000, 0, 20_000, 4) == 0
    assert q.train_steps_due(20_003, 20_004, 1_000_000, 0, 20_000, 4) == 1
    assert q.train_steps_due(20_000, 20_008, 1_000_000, 0, 20_000, 4) == 2
    # 64 offline updates: 64 + t % 4 == 0 from t = 20,004 too; 66: from t = 20,002
    assert q.train_steps_due(20_000, 20_004, 66, 0, 20_000, 4) == 1 and q.train_steps_due(20_000, 20_002, 66, 0, 20_000, 4) == 1
    # target syncs every 8,000 counter steps: the first at t = 24,000 after 1M offline updates
    assert q.train_steps_due(20_000, 23_999, 1_000_000, 0, 20_000, 8_000) == 0
    assert q.train_steps_due(23_999, 24_000, 1_000_000, 0, 20_000, 8_000) == 1
    # 8 envs: agent steps 20,000 .. 20,007 stored -> the training steps before t = 20,001 .. 20,008: 20,004 and 20,008
    assert q.train_steps_due(20_000, 20_008, 1_000_000, 0, 20_000, 4) == 2


# ----------------------------------------------------------------------------
# The offline phase's target syncs, in the jitted call itself
# ----------------------------------------------------------------------------
def test_offline_target_syncs_follow_the_persistence_loop():
    """The reference's persistence step: update, then sync if training_steps % (target_update_period // update_period)
    == 0, then training_steps += 1: syncs after updates 1, 1 + P, 1 + 2P, ... Run the script's jitted offline call one
    update at a time (target_network_frequency 12, train_frequency 4: P = 3) and read the sync off the parameters:
    right after a sync the target equals the online parameters; otherwise it lags."""
    args = q.Args(batch_size=4, n_step=1, target_network_frequency=12, train_frequency=4)
    num_actions = 4
    student = q.make_student("nature", num_actions)
    params = student.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    import optax

    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(1e-3, np.float32), eps=1.5e-4)
    state = q.QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, params), tx=tx)
    learner = q.make_learner(args, student, None, jax.devices()[0])
    rng = np.random.default_rng(0)
    trb = q.make_replay([64], 0)
    for t in range(40):
        frames = rng.integers(0, 255, (1, 84, 84), np.uint8)
        trb = q.replay_add(trb, 0, frames, jnp.array([t % 4]), jnp.array([1.0], jnp.float32), jnp.array([t % 13 == 12]),
                           jnp.array([False]), frames)
    persistence_period = args.target_network_frequency // args.train_frequency
    training_steps, want = 0, []
    for _ in range(8):
        want.append(training_steps % persistence_period == 0)
        training_steps += 1
    c = q.phase_coefs(args, 1.0, 1e-3, offline=True)
    key = jax.random.PRNGKey(1)
    got = []
    for i in range(8):
        state, key, m = learner.offline(state, trb, key, i, 1, c, None)
        assert bool(m["sample_ok"].all())
        same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.target_params)))
        got.append(same)
    assert want == [True, False, False, True, False, False, True, False]
    assert got == want


# ----------------------------------------------------------------------------
# Each method's loss on a hand-made batch
# ----------------------------------------------------------------------------
def np_softmax(x, tau):
    z = np.exp((x - x.max(-1, keepdims=True)) / tau)
    return z / z.sum(-1, keepdims=True)


def np_kl(teacher_q, student_q, tau):
    p, s = np_softmax(teacher_q, tau), np_softmax(student_q, tau)
    return np.sum(p * (np.log(p) - np.log(s)), -1)


def np_cql(qv, a, tau):
    z = qv / tau
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(a)), a]


def np_margin(qv, expert, margin):
    m = margin * (1.0 - np.eye(qv.shape[-1])[expert])
    return np.mean(np.maximum(qv + m - qv[np.arange(len(expert)), expert][:, None], 0.0), -1)


def np_huber(x):
    return np.where(np.abs(x) <= 1.0, 0.5 * x**2, np.abs(x) - 0.5)


Q = np.array([[1.0, 2.5, -0.5], [0.2, 0.1, 0.9]], np.float64)
ACTIONS = np.array([1, 2])
TARGET = np.array([0.5, 3.4])  # TD errors 2.0 (Huber linear) and -2.5
TEACHER_Q = np.array([[0.3, 0.2, 0.6], [1.0, -1.0, 0.4]])  # greedy actions 2 and 0
# online: lambda after an evaluation at teacher-normalized score 0.5 (student 55, teacher 100, random 10)
SCORE = (55.0, 100.0, 10.0)


def dqn_method_loss(method: str, offline: bool) -> float:
    """The total loss of `method` on the hand batch, composed as its reference agent composes it."""
    td = TARGET - Q[np.arange(2), ACTIONS]
    huber, mse = np.mean(np_huber(td)), np.mean(td**2)
    kl = np.mean(np_kl(TEACHER_Q, Q, 0.1))
    cql = np.mean(np_cql(Q, ACTIONS, 0.1))
    margin = np.mean(np_margin(Q, np.argmax(TEACHER_Q, -1), 1.0))
    lam = 1.0 if offline else 0.5
    return {
        "qdagger": huber + lam * 3.0 * kl,  # distillation_dqn_agent.py: TD + loss_decay * c * KL
        "kickstarting": huber + lam * 3.0 * kl,
        "rehearsal": huber + lam * 3.0 * kl,
        "dagger": 1.0 * 3.0 * kl,  # MethodType.DAGGER: distillation only, lambda stays 1
        "ql-dagger": huber + 1.0 * 3.0 * kl,  # MethodType.QL_PLUS_DAGGER: lambda stays 1
        "dqfd": huber + (1.0 * margin if offline else lam * lam * 1.0 * margin),  # margin_dqn_agent.py: decay applied twice online
        "pretrain": huber + (1.0 * cql if offline else 0.0),  # pretrained_dqn_agent.py: CQL offline only
        "finetune": mse,  # reloaded_dqn.gin: Dopamine's default MSE, no teacher term
        "tabula-rasa": mse,  # dqn.gin
        "jsrl": huber,  # lols_dqn.gin: Huber TD, the teacher acts instead
    }[method]


NO_OFFLINE_PHASE = {"kickstarting", "finetune", "tabula-rasa", "jsrl"}


@pytest.mark.parametrize("method, offline", [(m, off) for m in ["qdagger", "kickstarting", "rehearsal", "dagger", "ql-dagger", "dqfd", "pretrain",
                                                                 "finetune", "tabula-rasa", "jsrl"]
                                             for off in (True, False) if not (off and m in NO_OFFLINE_PHASE)])
def test_dqn_loss_of_each_method_on_a_hand_batch(method, offline):
    args = q.resolve_method(q.Args(method=method), set())
    assert (args.offline_steps > 0) == (method not in NO_OFFLINE_PHASE)
    lam, lr, _ = q.online_schedule(args, 1.0, *SCORE, 250_000)
    c = q.phase_coefs(args, 1.0, args.learning_rate, offline=True) if offline else q.phase_coefs(args, lam, lr, offline=False)
    total, _ = q.qdagger_dqn_loss(jnp.asarray(Q, jnp.float32), jnp.asarray(ACTIONS), jnp.asarray(TARGET, jnp.float32),
                                  jnp.asarray(TEACHER_Q, jnp.float32), c.distill, args.temperature, c.td, c.cql, args.cql_temperature,
                                  c.margin, args.margin, args.loss)
    assert float(total) == pytest.approx(dqn_method_loss(method, offline), rel=1e-5)


def test_the_hand_batch_by_hand():
    """The numpy terms on the hand batch, against values worked out on paper."""
    # TD errors: 0.5 - 2.5 = -2 and 3.4 - 0.9 = 2.5: Huber 1.5 and 2.0 (mean 1.75), squared 4 and 6.25 (mean 5.125)
    td = TARGET - Q[np.arange(2), ACTIONS]
    assert np.mean(np_huber(td)) == pytest.approx(1.75) and np.mean(td**2) == pytest.approx(5.125)
    # margin toward the teacher's greedy actions 2 and 0: row 0 max(q + 1[a != 2] - (-0.5), 0) = [2.5, 4, 0] -> 13/6;
    # row 1: max(q + 1[a != 0] - 0.2, 0) = [0, 0.9, 1.7] -> 2.6/3
    assert np.mean(np_margin(Q, np.argmax(TEACHER_Q, -1), 1.0)) == pytest.approx((13 / 6 + 2.6 / 3) / 2)
    # CQL at tau 1 on row 1: log(e^0.2 + e^0.1 + e^0.9) - 0.9
    assert np_cql(Q, ACTIONS, 1.0)[1] == pytest.approx(np.log(np.exp(0.2) + np.exp(0.1) + np.exp(0.9)) - 0.9)


def rainbow_method_loss(method: str, offline: bool, logits, target_probs, weights, support) -> float:
    chosen = logits[np.arange(2), ACTIONS]
    log_p = chosen - np.log(np.exp(chosen).sum(-1, keepdims=True))
    ce = -np.sum(target_probs * log_p, -1)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    qv = (probs * support).sum(-1)
    kl = np_kl(TEACHER_Q, qv, 0.1)
    cql = np_cql(qv, ACTIONS, 0.1)
    margin = np_margin(qv, np.argmax(TEACHER_Q, -1), 1.0)
    w = lambda x: np.mean(weights * x)  # noqa: E731 - every term weighted by the importance weights
    lam = 1.0 if offline else 0.5
    return {
        "qdagger": w(ce) + lam * 1.0 * w(kl),  # distillation_rainbow_agent.py: c = 1
        "dagger": 1.0 * w(kl),
        "ql-dagger": w(ce) + 1.0 * w(kl),
        "dqfd": w(ce) + (w(margin) if offline else lam * lam * w(margin)),
        "pretrain": w(ce) + (w(cql) if offline else 0.0),
        "finetune": w(ce),
    }[method]


@pytest.mark.parametrize("method, offline", [(m, off) for m in ["qdagger", "dagger", "ql-dagger", "dqfd", "pretrain", "finetune"]
                                             for off in (True, False) if not (off and m in NO_OFFLINE_PHASE)])
def test_rainbow_loss_of_each_method_on_a_hand_batch(method, offline):
    args = qr.resolve_method(qr.Args(method=method, num_atoms=5, v_min=-2.0, v_max=2.0), {"num_atoms", "v_min", "v_max"})
    assert (args.offline_steps > 0) == (method not in NO_OFFLINE_PHASE)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 5))
    target_probs = rng.dirichlet(np.ones(5), 2)
    weights = np.array([1.0, 0.6])
    support = np.linspace(-2.0, 2.0, 5)
    lam, lr, _ = qr.online_schedule(args, 1.0, *SCORE, 250_000)
    c = qr.phase_coefs(args, 1.0, args.learning_rate, offline=True) if offline else qr.phase_coefs(args, lam, lr, offline=False)
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    total, _ = qr.qdagger_rainbow_loss(f(logits), jnp.asarray(ACTIONS), f(target_probs), f(TEACHER_Q), f(support), f(weights), c.distill,
                                       args.temperature, c.td, c.cql, args.cql_temperature, c.margin, args.margin)
    assert float(total) == pytest.approx(rainbow_method_loss(method, offline, logits, target_probs, weights, support), rel=1e-5)
