import pytest
from corearrays import KINDS

from flashmux import dispatch


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def isolated_registry(tmp_path, monkeypatch):
    """Backends registered inside the test vanish after it; an empty priority table, so the
    capabilities' priorities decide (test fakes rank 1, the reference 1000)."""
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    monkeypatch.setenv("FLASHMUX_PRIORITY_FILE", str(empty))
    dispatch.clear_caches()
    saved = dict(dispatch.registry())
    yield
    dispatch.registry().clear()
    dispatch.registry().update(saved)
    dispatch.clear_caches()
