"""Reading JAX's compilation log (JAX_LOG_COMPILES=1) of a script run."""

import collections
import re

# The scripts' jitted hot paths a default run compiles (the acting calls, the offline call, the online step, the
# replay's store), and the store of the student's offline steps with their teacher Q (--offline-acting only).
HOT = {"jit(act)", "jit(offline)", "jit(online_step)", "jit(replay_add)"}
OFFLINE_ACTING = {"jit(store_acted)"}
LINE = re.compile(r"Compiling (jit\([^)]*\)) with global shapes and types (\(.*?\))\. Argument mapping: (\(.*?\))\.$", re.M)


def recompiled(stderr: str) -> dict:
    """Functions compiled more than once for the same shapes, with different argument placements: a call first fed
    an uncommitted array (numpy, a fresh PRNG key) and later the device array a jitted call returned. Each such
    compilation lands in the middle of a phase. Returns {(name, shapes): placements}."""
    placements = collections.defaultdict(set)
    for name, shapes, mapping in LINE.findall(stderr):
        placements[name, shapes].add(mapping)
    return {k: v for k, v in placements.items() if len(v) > 1}


def compiled_names(stderr: str) -> set:
    return {name for name, _, _ in LINE.findall(stderr)}


def hot_recompiled(stderr: str) -> list:
    """The hot paths among `recompiled`: each of these compilations lands inside a phase."""
    return [k for k in recompiled(stderr) if k[0] in HOT | OFFLINE_ACTING]
