import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def comfy():
    from comfy_support import import_comfy

    return import_comfy()


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server (with the pack and the demo models) for every e2e and browser test."""
    from server_support import start_test_server

    handle = start_test_server(full=True)
    try:
        yield handle
    finally:
        handle.dispose(keep_log_in=ARTIFACTS)


@pytest.fixture
def comfy_client(comfy_server):
    from server_support import ComfyClient

    client = ComfyClient(comfy_server.url)
    try:
        yield client
    finally:
        client.close()


def pytest_collection_modifyitems(config, items):
    """Against the one shared server: e2e tests first (shipped workflows meet a cold cache, as a user's
    first run does), then the browser tests, and the server-log check after everything that used it."""

    def rank(item):
        if item.name == "test_server_log_has_no_problems":
            return 2
        return 1 if item.get_closest_marker("browser") else 0

    items.sort(key=rank)  # stable: keeps file order within each group
