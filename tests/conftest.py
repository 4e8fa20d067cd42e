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


# -- the hostile-input table (tests/test_hostile_*.py; its machinery: tests/_hostile.py) -------
@pytest.fixture(scope="session")
def hostile_files(tmp_path_factory):
    """Model files and caches every room starts from, built once (on one thread)."""
    from _hostile import build_files

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_files(tmp_path_factory.mktemp("hostile_files"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hostile(request, tmp_path_factory, hostile_files, one_thread):
    """A room's :class:`_hostile.Fx`, with its own folder as the working directory (a file
    that ran ``PWN`` leaves PWNED there). kdkit precompute / cache check read a 20-image fake
    of Fashion-MNIST, and the demo's first real work raises ``WorkStarted`` (a row that gets
    that far is ``late``). The verdicts are merged into $KDKIT_HOSTILE_TALLY afterwards."""
    import _hostile

    import kdkit.data
    import kdkit.run.cache_job as cache_job

    fx = _hostile.room(hostile_files, tmp_path_factory.mktemp(request.module.__name__))
    mp = pytest.MonkeyPatch()
    mp.setattr(cache_job, "named_dataset", _hostile.fake_load_data)
    mp.setattr(kdkit.data, "load_fashion_mnist", _hostile.work_started)
    mp.chdir(fx.root)
    yield fx
    mp.undo()
    _hostile.write_tally(_hostile.VERDICTS)
