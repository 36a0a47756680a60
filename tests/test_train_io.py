"""train/io_utils.py and train/shards.py: atomic files and resumable shards without duplicates."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.data import Example, prompt_sha  # noqa: E402
from train.io_utils import (append_jsonl, atomic_write_jsonl, atomic_write_text, find_dir, read_jsonl,  # noqa: E402
                            replace_dir)
from train.shards import load_sharded, run_sharded, shard_path  # noqa: E402


def _items(n):
    out = []
    for i in range(n):
        ids = (7, 100 + i, 3 * i)
        out.append(Example(i, f"row-{i}", ids, (5,), None, prompt_sha(ids)))
    return out


def _process(batch):
    return [{"prompt_id": it.prompt_id, "prompt_sha": it.prompt_sha, "value": it.prompt_ids[1] ** 2} for it in batch]


class Crash(Exception):
    pass


def _crashing_after(k):
    seen = []

    def process(batch):
        if len(seen) >= k:
            raise Crash
        seen.extend(it.prompt_id for it in batch)
        return _process(batch)

    return process, seen


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(os.listdir(p.parent)) == ["f.txt"]
    assert (p.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_read_jsonl_drops_only_a_torn_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    append_jsonl(p, [{"a": 1}, {"a": 2}])
    with open(p, "a") as f:
        f.write('{"a": 3, "b"')  # a crash in the middle of an append
    assert read_jsonl(p, tolerate_torn_tail=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match="not valid JSON"):
        read_jsonl(p)
    # Damage before the last line is real corruption, never silently skipped.
    p.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p, tolerate_torn_tail=True)


def test_replace_dir_keeps_a_complete_folder_reachable(tmp_path):
    final = tmp_path / "ckpt"
    for content in ("old", "new"):
        tmp = tmp_path / "ckpt.tmp"
        tmp.mkdir()
        (tmp / "w").write_text(content)
        replace_dir(tmp, final)
    assert (final / "w").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # A crash between the two renames leaves only ckpt.old: find_dir still finds a checkpoint.
    os.replace(final, tmp_path / "ckpt.old")
    assert find_dir(final) == tmp_path / "ckpt.old"
    assert find_dir(tmp_path / "none") is None


class _Crash(Exception):
    pass


class _CrashAt:
    """Counts the file-system steps of a save (file writes, renames, folder deletes) and crashes
    at step ``k``; a crashing delete removes part of the folder first (a delete cut short)."""

    def __init__(self, monkeypatch, k):
        self.k, self.n = k, 0
        real_replace, real_rmtree = os.replace, __import__("shutil").rmtree

        def replace(src, dst):
            self.tick()
            real_replace(src, dst)

        def rmtree(path, *a, **kw):
            if self.n == self.k:
                files = sorted(p for p in Path(path).iterdir() if p.is_file())
                if files:
                    files[0].unlink()
            self.tick()
            real_rmtree(path, *a, **kw)

        import train.io_utils as io_utils

        monkeypatch.setattr(io_utils.os, "replace", replace)
        monkeypatch.setattr(io_utils.shutil, "rmtree", rmtree)

    def tick(self):
        self.n += 1
        if self.n - 1 == self.k:
            raise _Crash(self.k)


FILES = ("model", "optimizer", "state")


def _save(root, version, crash=None):
    """What save_training_checkpoint / save_model do: clear .tmp, write it file by file, replace_dir."""
    import shutil

    final, tmp = root / "checkpoint", root / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in FILES:
        if crash is not None:
            crash.tick()
        (tmp / name).write_text(str(version))
    replace_dir(tmp, final)


def _resume(root):
    """The version a resume loads: find_dir's folder must hold every file of one version."""
    found = find_dir(root / "checkpoint")
    assert found is not None, sorted(os.listdir(root))
    versions = {(found / name).read_text() for name in FILES if (found / name).exists()}
    assert len(versions) == 1 and all((found / name).exists() for name in FILES), (found, sorted(os.listdir(found)))
    return int(versions.pop())


# Steps of a save over an existing checkpoint: 3 writes, then replace_dir's renames and deletes
# (with the stale .tmp/.old folders a crash leaves, up to 2 deletes more).
_STEPS = range(9)


@pytest.mark.parametrize("first", _STEPS)
def test_replace_dir_survives_two_crashes_in_a_row(tmp_path, monkeypatch, first):
    # The case among them: a crash between the renames leaves .old + .tmp; the next save
    # then crashed while (or just after) deleting .old, losing every complete checkpoint.
    for second in _STEPS:
        root = tmp_path / f"run{second}"
        root.mkdir()
        _save(root, 1)
        loaded = _resume(root)
        for version, k in ((2, first), (3, second)):
            with monkeypatch.context() as m:
                try:
                    _save(root, version, crash=_CrashAt(m, k))
                except _Crash:
                    pass
            now = _resume(root)  # a complete checkpoint, never an older one than before
            assert loaded <= now <= version
            loaded = now
        _save(root, 4)
        assert _resume(root) == 4
        assert sorted(os.listdir(root)) == ["checkpoint"]


def test_run_sharded_writes_every_row_once(tmp_path):
    items = _items(23)
    run_sharded(items, _process, out_dir=tmp_path, prefix="gen", shard_size=10, batch_size=4, show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["gen-00000.jsonl", "gen-00001.jsonl", "gen-00002.jsonl"]
    rows = load_sharded(items, out_dir=tmp_path, prefix="gen", shard_size=10)
    assert [r["prompt_id"] for r in rows] == list(range(23))
    assert [r["value"] for r in rows] == [(100 + i) ** 2 for i in range(23)]


def test_crash_inside_a_shard_resumes_without_duplicates(tmp_path):
    items = _items(23)
    process, seen = _crashing_after(6)  # two batches of 4 -> 8 rows, then the crash
    with pytest.raises(Crash):
        run_sharded(items, process, out_dir=tmp_path, prefix="gen", shard_size=10, batch_size=4, show_progress=False)
    partial = tmp_path / "gen-00000.jsonl.partial"
    assert [r["prompt_id"] for r in read_jsonl(partial)] == list(range(8))
    assert not shard_path(tmp_path, "gen", 0).exists()
    with open(partial, "a") as f:  # and the crash tore the next append
        f.write('{"prompt_id": 8, "prom')

    calls = []

    def counting(batch):
        calls.extend(it.prompt_id for it in batch)
        return _process(batch)

    run_sharded(items, counting, out_dir=tmp_path, prefix="gen", shard_size=10, batch_size=4, show_progress=False)
    assert calls == list(range(8, 23))  # only what was missing
    rows = load_sharded(items, out_dir=tmp_path, prefix="gen", shard_size=10)
    assert [r["prompt_id"] for r in rows] == list(range(23))
    assert not partial.exists()


def test_finished_shards_are_skipped_and_ranks_split_shards(tmp_path):
    items = _items(30)
    done = []

    def rec(batch):
        done.extend(it.prompt_id for it in batch)
        return _process(batch)

    run_sharded(items, rec, out_dir=tmp_path, prefix="g", shard_size=10, batch_size=5, rank=1, world_size=2,
                show_progress=False)
    assert done == list(range(10, 20))  # rank 1 of 2 owns shard 1 only
    done.clear()
    run_sharded(items, rec, out_dir=tmp_path, prefix="g", shard_size=10, batch_size=5, rank=0, world_size=2,
                show_progress=False)
    assert done == list(range(0, 10)) + list(range(20, 30))
    done.clear()
    run_sharded(items, rec, out_dir=tmp_path, prefix="g", shard_size=10, batch_size=5, show_progress=False)
    assert done == []


def test_rows_from_another_rendering_are_refused(tmp_path):
    items = _items(6)
    run_sharded(items, _process, out_dir=tmp_path, prefix="g", shard_size=10, batch_size=3, show_progress=False)
    changed = list(items)
    ids = (9, 9, 9)
    changed[4] = Example(4, "row-4", ids, (5,), None, prompt_sha(ids))
    with pytest.raises(ValueError, match="different prompt rendering"):
        load_sharded(changed, out_dir=tmp_path, prefix="g", shard_size=10)
    # ... also when resuming inside a partial shard.
    atomic_write_jsonl(tmp_path / "h-00000.jsonl.partial", _process(items[:5]))
    with pytest.raises(ValueError, match="different prompt rendering"):
        run_sharded(changed, _process, out_dir=tmp_path, prefix="h", shard_size=10, batch_size=3, show_progress=False)


def test_missing_or_incomplete_shards_are_errors(tmp_path):
    items = _items(6)
    with pytest.raises(FileNotFoundError, match="g-00000.jsonl"):
        load_sharded(items, out_dir=tmp_path, prefix="g", shard_size=10)
    atomic_write_jsonl(tmp_path / "g-00000.jsonl", _process(items[:5]))
    with pytest.raises(ValueError, match="exactly one row"):
        load_sharded(items, out_dir=tmp_path, prefix="g", shard_size=10)
    atomic_write_jsonl(tmp_path / "g-00000.jsonl", _process(items) + _process(items[2:3]))
    with pytest.raises(ValueError, match="exactly one row"):
        load_sharded(items, out_dir=tmp_path, prefix="g", shard_size=10)


def test_process_must_return_rows_in_order(tmp_path):
    items = _items(4)
    with pytest.raises(RuntimeError, match="out of order"):
        run_sharded(items, lambda b: _process(b)[::-1], out_dir=tmp_path, prefix="g", shard_size=10, batch_size=4,
                    show_progress=False)


def test_jsonl_round_trip_is_exact_for_float32_values(tmp_path):
    import torch

    vals = torch.randn(50, dtype=torch.float32) * 100
    atomic_write_jsonl(tmp_path / "r.jsonl", [{"v": float(v)} for v in vals])
    back = torch.tensor([r["v"] for r in read_jsonl(tmp_path / "r.jsonl")], dtype=torch.float32)
    assert torch.equal(back, vals)
