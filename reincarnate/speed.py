"""What makes the hot paths fast without changing what they compute.

- XLA command buffers on a GPU: each jitted call, its loops included, is launched as CUDA graphs (one launch for many
  kernels). The host, not the device, bounds these small calls; with the launcher thread an H100 VM ran the offline
  phase 1.4x and the online phase 1.45x faster than with neither (docs/speed.md). The kernels, and so the results,
  are the same. Importing this module sets the flag unless XLA_FLAGS already names it; XLA reads XLA_FLAGS when its
  backend starts (the first computation), so import it before that.
- `fused_scan`: K updates in one jitted call.
- `launcher`: the thread that launches the learning calls while the main thread steps the envs.
- `SteadyRate`: a phase's speed after its first (compiling) call.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
                               " --xla_gpu_graph_min_graph_size=1").strip()

import jax  # noqa: E402 - after the flags, for the reader; XLA reads them when its backend starts
import jax.numpy as jnp  # noqa: E402


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def fused_scan(body, carry, k: int):
    """lax.scan(body, carry, arange(k)) on accelerators; on XLA:CPU the k steps are written out one after the other
    (no loop at all: a loop of even one trip slows the convolutions in it ~7x there, jax-ml/jax#12868)."""
    if not on_cpu():
        return jax.lax.scan(body, carry, jnp.arange(k))
    outs = []
    for i in range(k):
        carry, out = body(carry, jnp.int32(i))
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def launcher() -> ThreadPoolExecutor:
    """The one thread that launches the learning calls: on a GPU a launch holds the thread that makes it (the host
    steps the updates' kernels) while jaxlib releases the GIL, so the main thread takes the envs' step meanwhile.
    Each call's results are taken (`.result()`) before anything reads them: the same calls in the same order as one
    thread makes them, so the same results."""
    return ThreadPoolExecutor(1, thread_name_prefix="launcher")


class SteadyRate:
    """Units per second from `start()` on (so the compilation in a phase's first call is not counted), with
    `pause()`d seconds (evaluations) excluded: the phase's steady-state speed."""

    def __init__(self):
        self.t, self.n0, self.paused = None, 0, 0.0

    def start(self, n: int) -> None:
        if self.t is None:
            self.t, self.n0 = time.time(), n

    def pause(self, seconds: float) -> None:
        self.paused += seconds if self.t is not None else 0.0

    def __call__(self, n: int) -> float:
        return (n - self.n0) / max(time.time() - self.t - self.paused, 1e-9) if self.t is not None and n > self.n0 else float("nan")


class InFlight:
    """The learning call of the last stored vector step, in flight while the envs take the next step: launched from
    the launcher thread, landed (its results taken) before anything reads them. It keeps the metrics of log steps in
    `unlogged`, for the loop to fetch after the envs' step (a fetch waits for the updates), and starts `rate` at the end
    of the first call that learned (the phase's steady state, its compilation excluded)."""

    def __init__(self, pool: ThreadPoolExecutor, rate: SteadyRate):
        self.pool, self.rate, self.future, self.unlogged = pool, rate, None, []

    def launch(self, fn, *args, n_updates: int, log_step: int | None, at: int) -> None:
        self.future, self.info = self.pool.submit(fn, *args), (n_updates, log_step, at)

    def land(self) -> tuple:
        """The (state, replay, key) the call in flight returned."""
        (state, rb, key, metrics), (n_updates, log_step, at) = self.future.result(), self.info
        self.future = None
        if n_updates:
            self.rate.start(at)
        if log_step is not None:
            self.unlogged.append((log_step, metrics))
        return state, rb, key
