"""The offline phase's evaluations overlapping the updates (reincarnate.run.OfflineEvaluations) on a real run folder:
one plays in its own thread on a copy of the params while the caller goes on (and donates the params), lands at its
own update step, and a signal keeps it pending in the checkpoint for the resume to play again. (That the whole
script logs the same values either way: test_qdagger_dqn_e2e.)"""

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qdagger_dqn_atari_jax as q
from reincarnate import speed
from reincarnate.checkpoints import latest_checkpoint
from reincarnate.config import RUNTIME_FLAGS
from reincarnate.run import Interrupted, OfflineEvaluations, Run


class HeldEvaluation:
    """Stands for the evaluation's env play (evaluate_student's signature): it holds until `release` is set, ending
    early, as the real one, when the run is interrupted or `stop()`; its return is the sum of the params it got. Held
    more than 60 s it gives up with a return no test expects (a failure, not a hung test)."""

    def __init__(self, run: Run, released: bool = False):
        self.run, self.release, self.started, self.calls = run, threading.Event(), threading.Event(), []
        if released:
            self.release.set()

    def __call__(self, params, desc, seed_offset, stop=None):
        self.calls.append((seed_offset, threading.current_thread().name))
        self.started.set()
        deadline = time.monotonic() + 60
        while not self.release.wait(0.01):
            if self.run.interrupted or (stop is not None and stop()):
                return [], 37
            if time.monotonic() > deadline:
                return [-1.0], -1
        return [float(sum(np.sum(x) for x in jax.tree.leaves(params)))], 100


def new_run(name: str = "evals", **flags) -> Run:
    run = Run(q.Args(run_name=name, offline_steps=96, offline_eval_frequency=32, **flags), "qdagger_dqn_atari_jax.py", RUNTIME_FLAGS)
    run.open(0)
    return run


def logged(run: Run, tag: str) -> list:
    run.writer.flush()
    acc = EventAccumulator(str(run.dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_an_overlapped_evaluation_lands_at_its_step_and_a_signal_keeps_it_for_the_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    device = jax.devices()[0]
    update = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p), donate_argnums=0)  # as the offline calls: the params donated
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    run = new_run()
    try:
        held = HeldEvaluation(run)

        def checkpoint():  # the script's offline_checkpoint: the pending evaluation in its progress and arrays
            run.save("offline", dict(step=64, next_eval=96, **evals.progress()), evals.arrays())
            run.exit_if_interrupted()

        with pytest.raises(Interrupted), OfflineEvaluations(run, held, lambda r: None, speed.SteadyRate(), [], params, device, checkpoint) as evals:
            evals.start(params, 32, last=False)  # returns while the evaluation holds
            assert held.started.wait(10) and held.calls == [(20_032, held.calls[0][1])] and held.calls[0][1].startswith("offline-eval")
            assert evals.progress() == {"pending_eval": 32}
            for _ in range(3):
                params = update(params)  # the updates go on, and free the evaluated buffers
            evals.log()  # (at a log step: nothing has landed)
            assert evals.pending is not None and logged(run, "offline/eval_return") == []
            held.release.set()
            evals.pending[2].result(timeout=10)  # it lands ...
            evals.log()  # ... and the next log step logs it
            assert evals.pending is None and logged(run, "offline/eval_return") == [(32, 3.0)]  # the params at update 32

            held.release.clear(), held.started.clear()
            evals.start(params, 64, last=False)  # on w = 4, b = 3
            assert held.started.wait(10)
            os.kill(os.getpid(), signal.SIGTERM)  # the run's own handler: it asks the loop to checkpoint and leave
            params = update(params)
            checkpoint()
        ckpt, meta = latest_checkpoint(run.ckpt_dir)
        assert meta["progress"] == dict(step=64, next_eval=96, pending_eval=64)
        assert sorted(p.name for p in ckpt.glob("eval_params.*")) == ["eval_params.0.npy", "eval_params.1.npy"]
        assert logged(run, "offline/eval_return") == [(32, 3.0)]  # the stopped one is not logged
    finally:
        run.close()

    run = new_run(resume=True)  # the resume plays the pending evaluation again, on the params it was started with
    try:
        assert run.phase == "offline" and run.progress["pending_eval"] == 64
        held = HeldEvaluation(run, released=True)
        template = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
        with OfflineEvaluations(run, held, lambda r: None, speed.SteadyRate(), [], template, device, lambda: None) as evals:
            assert evals.progress() == {"pending_eval": 64}
        assert [c[0] for c in held.calls] == [20_064]  # the same seeds and key as the stopped one
        assert logged(run, "offline/eval_return") == [(32, 3.0), (64, 18.0)]  # each once, the second of the saved w = 4, b = 3
    finally:
        run.close()


def test_in_between_the_evaluation_holds_the_loop_and_an_error_stops_a_pending_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    device, params = jax.devices()[0], {"w": jnp.ones(4)}
    run = new_run(overlap_offline_eval=False)
    try:
        held, rate = HeldEvaluation(run, released=True), speed.SteadyRate()
        rate.start(0)
        with OfflineEvaluations(run, held, lambda r: r / 10, rate, [], params, device, lambda: None) as evals:
            evals.start(params, 32, last=False)
            assert held.calls == [(20_032, threading.current_thread().name)] and evals.pending is None and rate.paused > 0
        assert logged(run, "offline/eval_return") == [(32, 4.0)] and logged(run, "offline/teacher_normalized_score") == [(32, pytest.approx(0.4))]
    finally:
        run.close()

    run = new_run("errors")
    try:
        held = HeldEvaluation(run)  # never released: only the error ends it
        with pytest.raises(RuntimeError, match="the loop failed"):
            with OfflineEvaluations(run, held, lambda r: None, speed.SteadyRate(), [], params, device, lambda: None) as evals:
                evals.start(params, 64, last=False)
                assert held.started.wait(10)
                raise RuntimeError("the loop failed")
        assert evals.pending[2].done() and evals.pending[2].result() == ([], 37)  # stopped and joined, not left running
        assert logged(run, "offline/eval_return") == []
        # The last evaluation of the phase is played in between even when overlapping: nothing is left to overlap.
        held = HeldEvaluation(run, released=True)
        with OfflineEvaluations(run, held, lambda r: None, speed.SteadyRate(), [], params, device, lambda: None) as evals:
            evals.start(params, 96, last=True)
            assert held.calls == [(20_096, threading.current_thread().name)] and evals.pending is None
    finally:
        run.close()
