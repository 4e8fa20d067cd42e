"""kdkit.cache: augmentation-aware teacher cache (precompute, CachedTeacher, verify, check); its
CLI is in test_cache_cli.py."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _cache_setup import (
    CLASSES,
    MEAN,
    SIZE,
    STD,
    N,
    make_cache,
    shard_path,
    tiny_dataset,
    tiny_teacher,
    tiny_views,
)
from torch import nn

from kdkit.cache import CachedTeacher, check, read_meta, verify
from kdkit.data.arrays import ArrayDataset
from kdkit.data.views import ViewSampler, prepare_input
from kdkit.errors import KDError
from kdkit.teachers.base import TopK


def _live(model: nn.Module, ds: ArrayDataset, views: ViewSampler, batch: int, shard: int):
    """Live logits (N, K, C) computed in the same batches as precompute (bitwise comparable)."""
    rows = []
    for start in range(0, len(ds), shard):
        for b0 in range(start, min(start + shard, len(ds)), batch):
            index = torch.arange(b0, min(b0 + batch, start + shard, len(ds)))
            per_view = []
            for v in range(views.num_views):
                view = torch.full_like(index, v)
                x = prepare_input(ds.images[index], index, view, views, MEAN, STD, "cpu")
                with torch.no_grad():
                    per_view.append(model(x))
            rows.append(torch.stack(per_view, 1))
    return torch.cat(rows)


def _read_all(cached: CachedTeacher, k: int):
    index = torch.arange(N).repeat_interleave(k)
    view = torch.arange(k).repeat(N)
    perm = torch.randperm(len(index))  # a shuffled batch reads the same rows
    out = cached(torch.zeros(len(index), 1), index=index[perm], view=view[perm]).logits
    inverse = torch.argsort(perm)
    if isinstance(out, TopK):
        return TopK(out.values[inverse].view(N, k, -1), out.indices[inverse].view(N, k, -1))
    return out[inverse].view(N, k, -1)


def test_fp32_cache_equals_the_live_teacher_on_the_same_views(tmp_path):
    model, ds = tiny_teacher(), tiny_dataset()
    make_cache(tmp_path, dtype="fp32", teacher=model)
    cached = CachedTeacher(
        tmp_path, expect_teacher=model, expect_dataset=ds, expect_views=tiny_views()
    )
    got = _read_all(cached, 3)
    assert got.dtype == torch.float32
    assert torch.equal(got, _live(model, ds, tiny_views(), 8, 16))
    assert cached.fingerprint() == read_meta(tmp_path)["teacher_fingerprint"]


def test_fp16_cache_is_the_live_teacher_rounded_to_fp16(tmp_path):
    model, ds = tiny_teacher(), tiny_dataset()
    make_cache(tmp_path, teacher=model)
    live = _live(model, ds, tiny_views(), 8, 16)
    got = _read_all(CachedTeacher(tmp_path), 3)
    assert torch.equal(got, live.half().float())
    torch.testing.assert_close(got, live, rtol=2**-11, atol=2**-24)


def test_topk_cache_keeps_the_largest_logits_and_bounds_reconstruction_error(tmp_path):
    from kdkit.losses import topk_to_probs

    model, ds = tiny_teacher(), tiny_dataset()
    with torch.no_grad():
        model[-1].weight.mul_(15)  # logits spread like a trained teacher's (about -5..5)
    make_cache(tmp_path, teacher=model, topk=4)
    meta = read_meta(tmp_path)
    assert meta["index_dtype"] == "int16" and meta["topk"] == 4
    got = _read_all(CachedTeacher(tmp_path), 3)
    live = _live(model, ds, tiny_views(), 8, 16)
    values, indices = torch.topk(live, 4, dim=-1)
    assert got.indices.dtype == torch.int64 and torch.equal(got.indices, indices)
    torch.testing.assert_close(got.values, values, rtol=2**-11, atol=2**-24)
    kept_v, kept_i = got.values.reshape(-1, 4), got.indices.reshape(-1, 4)
    for temperature, mean_tv_bound in ((1.0, 0.15), (4.0, 0.15)):
        p_true = torch.softmax(live.reshape(-1, CLASSES) / temperature, -1)
        p_rec = topk_to_probs(kept_v, kept_i, CLASSES, temperature)
        torch.testing.assert_close(p_rec.sum(-1), torch.ones(len(p_rec)))
        # the kept classes keep their exact ratios: log p_i - log p_0 = (v_i - v_0) / T
        log_kept = p_rec.gather(1, kept_i).log()
        torch.testing.assert_close(
            log_kept - log_kept[:, :1], (kept_v - kept_v[:, :1]) / temperature, atol=1e-4, rtol=0
        )
        # so the error is bounded by the tail masses, and small on average (measured
        # 0.085 at T=1 and 0.11 at T=4 for this 12-class, k=4 teacher)
        tail_true = 1 - p_true.gather(1, kept_i).sum(1)
        tail_rec = 1 - p_rec.gather(1, kept_i).sum(1)
        tv = (p_rec - p_true).abs().sum(1) / 2
        assert bool((tv <= torch.maximum(tail_true, tail_rec) + 1e-5).all())
        assert float(tv.mean()) < mean_tv_bound


def test_truncated_shard_is_refused(tmp_path):
    make_cache(tmp_path)
    path = shard_path(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(KDError, match="truncated"):
        CachedTeacher(tmp_path)
    with pytest.raises(KDError, match="truncated"):
        verify(tmp_path)


def test_flipped_byte_is_refused_by_checksum(tmp_path):
    make_cache(tmp_path)
    path = shard_path(tmp_path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    CachedTeacher(tmp_path, verify=False)  # sizes still fit: only the checksum can tell
    with pytest.raises(KDError, match="fails its checksum"):
        CachedTeacher(tmp_path)
    with pytest.raises(KDError, match="fails its checksum"):
        verify(tmp_path)


def test_cache_of_another_teacher_or_dataset_or_views_is_refused(tmp_path):
    make_cache(tmp_path)
    with pytest.raises(KDError, match="mismatch in teacher_fingerprint: cache has '[0-9a-f]+'"):
        CachedTeacher(tmp_path, expect_teacher=tiny_teacher(seed=1))
    with pytest.raises(KDError, match="mismatch in num_samples: cache has 40, this run expects 41"):
        CachedTeacher(tmp_path, expect_dataset=tiny_dataset(n=N + 1))
    with pytest.raises(KDError, match="mismatch in dataset_fingerprint"):
        CachedTeacher(tmp_path, expect_dataset=tiny_dataset(seed=1))
    with pytest.raises(KDError, match="mismatch in views"):
        CachedTeacher(tmp_path, expect_views=tiny_views(num_views=4))
    with pytest.raises(KDError, match="mismatch in views"):
        CachedTeacher(tmp_path, expect_views=False)  # a run without augmentation
    CachedTeacher(tmp_path, expect_views=tiny_views(), verify=False)
    CachedTeacher(tmp_path, expect_views=None, verify=False)  # None: not checked
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KDError, match="format_version: cache has 99"):
        CachedTeacher(tmp_path)


def test_missing_meta_or_shard_and_bad_rows_are_refused(tmp_path):
    with pytest.raises(KDError, match="no meta.json"):
        verify(tmp_path)
    make_cache(tmp_path)
    cached = CachedTeacher(tmp_path)
    with pytest.raises(KDError, match="index out of range"):
        cached(torch.zeros(1), index=torch.tensor([N]), view=torch.tensor([0]))
    with pytest.raises(KDError, match="view id out of range"):
        cached(torch.zeros(1), index=torch.tensor([0]), view=torch.tensor([3]))
    with pytest.raises(KDError, match="pass view="):
        cached(torch.zeros(1), index=torch.tensor([0]))
    shard_path(tmp_path, 0).unlink()
    with pytest.raises(KDError, match="missing"):
        verify(tmp_path)


def test_subset_cache_is_keyed_by_original_index(tmp_path):
    model, base = tiny_teacher(), tiny_dataset()
    sub = base.subset(torch.arange(5, 30, 2))
    make_cache(tmp_path, teacher=model, dataset=sub, dtype="fp32")
    cached = CachedTeacher(tmp_path, expect_dataset=sub)
    index, view = torch.tensor([29, 5, 17]), torch.tensor([2, 0, 1])
    x = prepare_input(base.images[index], index, view, tiny_views(), MEAN, STD, "cpu")
    torch.testing.assert_close(cached(x, index=index, view=view).logits, model(x))
    with pytest.raises(KDError, match=r"sample indices \[6\] are not in the cache"):
        cached(x[:1], index=torch.tensor([6]), view=torch.tensor([0]))
    # a cache of the whole dataset serves its subsets
    make_cache(tmp_path / "full", teacher=model, dataset=base)
    CachedTeacher(tmp_path / "full", expect_dataset=sub)


class _PlainDataset(torch.utils.data.Dataset):
    """Items (image, label) only: no .images, no .indices, no fingerprint()."""

    def __init__(self, base: ArrayDataset) -> None:
        self.base_images, self.labels = base.images, base.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.base_images[i], int(self.labels[i])


def test_plain_dataset_is_read_item_by_item_and_fingerprinted_by_content(tmp_path):
    model, ds = tiny_teacher(), tiny_dataset()
    make_cache(tmp_path / "plain", teacher=model, dataset=_PlainDataset(ds), dtype="fp32")
    make_cache(tmp_path / "array", teacher=model, dataset=ds, dtype="fp32")
    plain, array = CachedTeacher(tmp_path / "plain"), CachedTeacher(tmp_path / "array")
    index, view = torch.arange(N), torch.arange(N) % 3
    torch.testing.assert_close(
        plain(torch.zeros(N), index=index, view=view).logits,
        array(torch.zeros(N), index=index, view=view).logits,
    )
    CachedTeacher(tmp_path / "plain", expect_dataset=_PlainDataset(ds))
    other = _PlainDataset(tiny_dataset(seed=1))
    with pytest.raises(KDError, match="mismatch in dataset_fingerprint"):
        CachedTeacher(tmp_path / "plain", expect_dataset=other)


def test_check_passes_on_a_fresh_cache_and_names_causes_otherwise(tmp_path):
    model, ds = tiny_teacher(), tiny_dataset()
    make_cache(tmp_path, teacher=model, topk=3)
    report = check(tmp_path, model, ds, n_probe=32)
    assert report.n_probe == 32 and report.top1_agreement == 1.0 and report.mean_kl < 1e-4
    with pytest.raises(KDError, match="stale cache.*wrong normalisation.*wrong views"):
        check(tmp_path, tiny_teacher(seed=1), ds, n_probe=32)
    with pytest.raises(KDError, match="disagrees with the live teacher"):
        check(tmp_path, model, ds, n_probe=32, mean=(0.9,), std=(0.1,))
    with pytest.raises(KDError, match="disagrees with the live teacher"):
        shifted = ViewSampler(seed=5, num_views=3, crop="pad", pad=1, size=SIZE)
        check(tmp_path, model, ds, n_probe=32, views=shifted)


def test_precompute_refuses_to_replace_another_cache_unless_asked(tmp_path):
    make_cache(tmp_path)
    make_cache(tmp_path)  # same spec: everything is kept
    with pytest.raises(KDError, match="already holds a different teacher cache.*topk"):
        make_cache(tmp_path, topk=2)
    make_cache(tmp_path, topk=2, overwrite=True)
    assert read_meta(tmp_path)["topk"] == 2
    verify(tmp_path)


_KILL_SCRIPT = """
import sys, time
import torch
from torch import nn
from kdkit.cache import precompute
from kdkit.data.arrays import ArrayDataset
from kdkit.data.views import ViewSampler

DELAY = 0.0


class SlowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        time.sleep(DELAY)
        return self.fc(x.flatten(1))


def run(out):
    torch.manual_seed(0)
    model = SlowNet()
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (64,), generator=g))
    views = ViewSampler(seed=1, num_views=2, crop="pad", pad=1, size=8)
    precompute(model, ds, out, views=views, topk=3, batch_size=4, shard_size=8, progress=False)


if __name__ == "__main__":
    DELAY = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    run(sys.argv[1])
"""


def _script(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    script = tmp_path / "slow_precompute.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return script, env


def test_killed_precompute_resumes_to_the_same_cache(tmp_path):
    script, env = _script(tmp_path)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.1"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (killed / "shard-00000.json").exists():
            assert proc.poll() is None, "precompute exited before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "meta.json").exists()
    kept = (killed / "shard-00000.values.npy").stat().st_ino
    sys.path.insert(0, str(tmp_path))
    try:
        import slow_precompute
    finally:
        sys.path.remove(str(tmp_path))
    slow_precompute.run(killed)
    slow_precompute.run(clean)
    assert (killed / "shard-00000.values.npy").stat().st_ino == kept  # finished shard kept
    assert not list(killed.glob("*.tmp-*"))
    meta_killed, meta_clean = verify(killed), verify(clean)
    assert meta_killed["shards"] == meta_clean["shards"]  # same bytes, same sha256
    index, view = torch.arange(64), torch.arange(64) % 2
    a = CachedTeacher(killed)(torch.zeros(64), index=index, view=view).logits
    b = CachedTeacher(clean)(torch.zeros(64), index=index, view=view).logits
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


def test_distiller_loss_with_cached_teacher_equals_live_teacher(tmp_path):
    from kdkit.distiller import Distiller
    from kdkit.losses import SoftTargetKL

    model, ds, views = tiny_teacher(), tiny_dataset(), tiny_views()
    make_cache(tmp_path, teacher=model, dtype="fp32")
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, CLASSES))
    runs = {}
    for name, teacher in (("live", model), ("cached", CachedTeacher(tmp_path))):
        d = Distiller(copy.deepcopy(student), teacher, SoftTargetKL(temperature=2.0))
        opt = torch.optim.SGD(d.student.parameters(), lr=0.5)
        losses = []
        for step in range(4):
            index = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:16]
            view = views.view_ids(index, epoch=step)
            x = prepare_input(ds.images[index], index, view, views, MEAN, STD, "cpu")
            loss = d.step(x, index=index, view=view).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[name] = losses
    assert runs["live"][0] > 0 and runs["live"][0] != runs["live"][-1]
    np.testing.assert_allclose(runs["cached"], runs["live"], rtol=1e-5)


def test_two_ranks_write_disjoint_shards_and_rank0_writes_meta(tmp_path):
    script, env = _script(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    out = tmp_path / "ranks"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(out)], env={**env, "RANK": str(r)})
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    sys.path.insert(0, str(tmp_path))
    try:
        import slow_precompute
    finally:
        sys.path.remove(str(tmp_path))
    slow_precompute.run(tmp_path / "single")
    assert verify(out)["shards"] == verify(tmp_path / "single")["shards"]
