import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(FIXTURES))


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
