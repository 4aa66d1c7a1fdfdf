import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(FIXTURES))

# One persistent XLA compilation cache for the whole session (this process and the scripts it
# starts): the many tiny end-to-end runs share their shapes, so only the first one compiles.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="reincarnate-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def fixture_copy(tmp_path_factory):
    """Materialize a committed fixture (gunzipping its large files) once per session."""
    from materialize import materialize

    root = tmp_path_factory.mktemp("fixtures")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = materialize(name, root)
        return made[name]

    return get


@pytest.fixture(scope="session")
def teacher_with_replay(fixture_copy, tmp_path_factory):
    """A teacher run folder holding both the TF checkpoint fixture (iteration 3) and a replay written by
    Dopamine's own OutOfGraphReplayBuffer, saved under the same iteration, as the bucket's runs are laid out."""
    import gzip

    import numpy as np

    run = tmp_path_factory.mktemp("teacher_with_replay") / "run"
    shutil.copytree(fixture_copy("teacher_tf"), run)
    for f in (FIXTURES / "dopamine_replay" / "run" / "checkpoints").glob("*_ckpt.7.gz"):
        shutil.copy(f, run / "checkpoints" / f.name.replace("_ckpt.7.gz", "_ckpt.3.gz"))
    # The replay fixture was recorded with 6 actions; the teacher plays Breakout's 4. Re-save its actions
    # modulo 4 in the same file format (gzip around np.save), so the pair is one consistent teacher.
    action_file = run / "checkpoints" / "$store$_action_ckpt.3.gz"
    with gzip.open(action_file) as f:
        actions = np.load(f)
    with gzip.open(action_file, "wb") as f:
        np.save(f, actions % 4, allow_pickle=False)
    return run
