import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def comfy():
    from comfy_support import import_comfy

    return import_comfy()
