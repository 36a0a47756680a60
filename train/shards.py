"""Resumable, crash-safe sharded processing of prompts (used by generation and by scoring).

Prompts 0..N-1 are cut into shards of ``shard_size``; rank r of W owns shards r, r+W, ... .
While a shard is in progress its rows are appended, one batch at a time, to ``<name>.partial``
(fsynced); when it is complete the rows are written, sorted, to ``<name>`` with temp + rename
and the partial file is removed. A rerun skips finished shards and, inside an unfinished one,
processes only the prompts that have no row yet, so no row is duplicated or lost. Every row
carries ``prompt_id`` and ``prompt_sha`` (a hash of the rendered prompt tokens): rows made from
a different rendering or data order are refused instead of silently mixed in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from .faults import maybe_kill
from .io_utils import append_jsonl, atomic_write_jsonl, read_jsonl


def shard_path(out_dir, prefix: str, k: int) -> Path:
    return Path(out_dir) / f"{prefix}-{k:05d}.jsonl"


def num_shards(n_items: int, shard_size: int) -> int:
    return (n_items + shard_size - 1) // shard_size


def _check_row(row: dict, items: Sequence, lo: int, hi: int, where) -> int:
    pid = row.get("prompt_id")
    if not isinstance(pid, int) or not lo <= pid < hi:
        raise ValueError(f"{where}: row has prompt_id {pid!r}, outside this shard's range [{lo}, {hi})")
    if row.get("prompt_sha") != items[pid].prompt_sha:
        raise ValueError(
            f"{where}: prompt_id {pid} was made from a different prompt rendering (prompt_sha "
            f"{row.get('prompt_sha')!r} != {items[pid].prompt_sha!r}); the data, tokenizer or chat "
            "template changed since it was written: use a fresh output_dir"
        )
    return pid


def run_sharded(
    items: Sequence,
    process: Callable[[List], List[Dict]],
    *,
    out_dir,
    prefix: str,
    shard_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    desc: str = "",
    fault_phase: str = "",
    show_progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> None:
    """Run ``process`` on every item of this rank's unfinished shards; see the module docstring.

    items[i] must have ``prompt_id == i`` and ``prompt_sha``; ``process(batch)`` returns one row
    per item of the batch carrying that item's prompt_id and prompt_sha. ``log`` (one line) is
    told where a rerun resumes when earlier rows exist.
    """
    n = len(items)
    mine = list(range(rank, num_shards(n, shard_size), world_size))
    todo_by_shard = {}
    for k in mine:
        final = shard_path(out_dir, prefix, k)
        if final.exists():
            continue
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        partial = final.with_name(final.name + ".partial")
        done = set()
        if partial.exists():
            rows = read_jsonl(partial, tolerate_torn_tail=True)
            kept = []
            for row in rows:
                pid = _check_row(row, items, lo, hi, partial)
                if pid not in done:
                    done.add(pid)
                    kept.append(row)
            # Rewrite without the torn tail before appending to it again.
            atomic_write_jsonl(partial, kept)
        todo_by_shard[k] = [items[i] for i in range(lo, hi) if i not in done]

    total = sum(min(n, (k + 1) * shard_size) - k * shard_size for k in mine)
    remaining = sum(len(v) for v in todo_by_shard.values())
    if log is not None and remaining < total:
        finished = len(mine) - len(todo_by_shard)
        name = desc or prefix
        if not todo_by_shard:
            log(f"{name}: done already ({finished} shard(s), {total} prompts), skipping")
        else:
            first = min(todo_by_shard)
            lo = first * shard_size
            in_shard = min(n, lo + shard_size) - lo - len(todo_by_shard[first])
            log(f"{name}: resuming at shard {first} ({shard_path(out_dir, prefix, first).name}, prompt "
                f"{lo + in_shard} after {in_shard} done in it); {total - remaining} of {total} prompts done, "
                f"{finished} of {len(mine)} shard(s) finished")
    written = 0
    with tqdm(total=total, initial=total - remaining, desc=desc, disable=not show_progress, dynamic_ncols=True) as bar:
        for k, todo in todo_by_shard.items():
            final = shard_path(out_dir, prefix, k)
            partial = final.with_name(final.name + ".partial")
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                rows = process(batch)
                if [r["prompt_id"] for r in rows] != [it.prompt_id for it in batch]:
                    raise RuntimeError(f"{desc}: process returned rows out of order or missing")
                append_jsonl(partial, rows)
                written += len(rows)
                bar.update(len(rows))
                if fault_phase:
                    maybe_kill(fault_phase, written)
            lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
            rows = read_jsonl(partial, tolerate_torn_tail=False) if partial.exists() else []
            rows.sort(key=lambda r: r["prompt_id"])
            if [r["prompt_id"] for r in rows] != list(range(lo, hi)):
                raise RuntimeError(f"{partial}: expected one row for each prompt {lo}..{hi - 1}")
            atomic_write_jsonl(final, rows)
            os.unlink(partial)


def load_sharded(items: Sequence, *, out_dir, prefix: str, shard_size: int) -> List[Dict]:
    """All rows of finished shards, one per item and in item order; raises on any gap or duplicate."""
    n = len(items)
    out: List[Dict] = []
    for k in range(num_shards(n, shard_size)):
        path = shard_path(out_dir, prefix, k)
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing: the phase that writes it has not finished")
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        rows = read_jsonl(path)
        pids = [_check_row(r, items, lo, hi, path) for r in rows]
        if pids != list(range(lo, hi)):
            raise ValueError(f"{path}: expected exactly one row for each prompt {lo}..{hi - 1}")
        out.extend(rows)
    return out
