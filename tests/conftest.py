import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads(monkeypatch):
    torch.manual_seed(0)
    # `auto` defaults measure real time: a run would pick by the machine's load, so two runs
    # a test compares could differ. Off here (torch teacher, contiguous student, as before);
    # tests/test_autotune.py turns it on with a fake clock.
    monkeypatch.setenv("KDKIT_AUTOTUNE", "off")
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One PyTorch thread for a module. Timings are never asserted, and on a shared 2-core box
    OpenMP barriers stall whenever another process holds a core (measured: 200 training steps
    took 0.7 s on 1 thread, 31 s on 2 under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
