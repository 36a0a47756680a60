"""iris_kernels.autotune: key, cache (atomic, versioned, where the user's cache folder is), the parity
probe, log once, the environment switches and every rank agreeing (issue 17 item 2).

No wall clock: the timer and the clock are injected (the timer still calls each candidate once,
through the Triton interpreter at a tiny shape, so that the timed callables are exercised), and
the device name and capability are faked ("NVIDIA H200", sm_90) on the CPU.
"""
import json
import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iris_kernels import autograd, autotune
from test_logprobs import make_inputs

FAKE_DEVICE = ("NVIDIA H200", (9, 0))
N, H, V = 40, 24, 101


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    for var in (autotune.ENV_OFF, autotune.ENV_FORCE, autotune.ENV_BUDGET, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    autotune.clear_memory_cache()
    yield
    autotune.clear_memory_cache()


class FakeTimer:
    """Times from a table (ms per candidate); calls the candidate so that it really runs."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, candidate, fn):
        fn()
        self.calls.append(autotune._name(candidate))
        return self.table[(candidate["fwd"], candidate["bwd"])]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.01
        return self.t


TIMES = {("fused", "workspace"): 3.0, ("fused", "atomic"): 5.0, ("split", "workspace"): 2.0, ("split", "atomic"): 4.0}


def _choose(timer, dtype=torch.float32, **kw):
    hidden, weight, _, bias = make_inputs(N, H, V, dtype, seed=1, bias=True)
    return autotune.tuned_choice(hidden, weight, bias, softcap=kw.pop("softcap", 7.0), timer=timer,
                                 device_info=lambda d: FAKE_DEVICE, clock=FakeClock(), **kw)


def test_key_names_every_part():
    base = dict(bias=True, softcap=False, entropy=True, triton_version="3.6.0", library_version="0.9")
    key = autotune.tuning_key("NVIDIA H200", (9, 0), torch.bfloat16, 2048, 151936, **base)
    assert key == "NVIDIA H200|sm_90|bfloat16|H2048|V151936|bias+entropy|triton-3.6.0|iris-0.9"
    variants = [
        autotune.tuning_key("NVIDIA A100", (8, 0), torch.bfloat16, 2048, 151936, **base),
        autotune.tuning_key("NVIDIA H200", (9, 0), torch.float16, 2048, 151936, **base),
        autotune.tuning_key("NVIDIA H200", (9, 0), torch.bfloat16, 4096, 151936, **base),
        autotune.tuning_key("NVIDIA H200", (9, 0), torch.bfloat16, 2048, 32000, **base),
        autotune.tuning_key("NVIDIA H200", (9, 0), torch.bfloat16, 2048, 151936, **dict(base, softcap=True)),
        autotune.tuning_key("NVIDIA H200", (9, 0), torch.bfloat16, 2048, 151936, **dict(base, triton_version="3.7.1")),
        autotune.tuning_key("NVIDIA H200", (9, 0), torch.bfloat16, 2048, 151936, **dict(base, library_version="1.0")),
    ]
    assert len({key, *variants}) == 1 + len(variants)


def test_cache_folder_follows_the_user_settings(monkeypatch, tmp_path):
    assert autotune.cache_path() == tmp_path / "cache" / f"autotune-v{autotune.CACHE_VERSION}.json"
    monkeypatch.delenv(autotune.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path().parent == tmp_path / "xdg" / "iris_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_path().parent == tmp_path / "home" / ".cache" / "iris_kernels"


def test_first_use_measures_caches_and_logs_once(caplog):
    timer = FakeTimer(TIMES)
    with caplog.at_level(logging.INFO, logger="iris_kernels.autotune"):
        assert _choose(timer) == {"fwd": "split", "bwd": "workspace"}
        n_calls = len(timer.calls)
        assert n_calls >= len(autotune.CANDIDATES)  # every candidate timed at least once
        assert _choose(timer) == {"fwd": "split", "bwd": "workspace"}  # memory: no new timing
    assert len(timer.calls) == n_calls
    assert len([r for r in caplog.records if "autotune" in r.getMessage()]) == 1
    data = json.loads(autotune.cache_path().read_text())
    assert data["version"] == autotune.CACHE_VERSION
    (key, entry), = data["entries"].items()
    assert key.startswith("NVIDIA H200|sm_90|float32|H24|V101|bias+softcap|")
    assert entry["fwd"] == "split" and entry["bwd"] == "workspace" and entry["source"] == "measured"
    assert set(entry["probe"].values()) == {"ok"} and len(entry["times_ms"]) == 4
    assert not [p for p in autotune.cache_path().parent.iterdir() if p.name.startswith(".autotune-")]  # no temp left
    # A new process (memory cleared) reads the file instead of measuring.
    autotune.clear_memory_cache()
    other = FakeTimer({k: 1.0 for k in TIMES})
    assert _choose(other) == {"fwd": "split", "bwd": "workspace"} and other.calls == []
    # Another key (no soft-cap) is measured and merged into the same file.
    assert _choose(FakeTimer({**TIMES, ("fused", "atomic"): 0.5}), softcap=None) == {"fwd": "fused", "bwd": "atomic"}
    assert len(json.loads(autotune.cache_path().read_text())["entries"]) == 2


def test_a_fast_wrong_variant_fails_the_probe(monkeypatch):
    """The split forward made wrong (lse + 0.1): the probe against backend="torch" excludes it,
    though the timer says it is fastest."""
    real = autograd.logprobs_split_fwd

    def wrong(*args, **kw):
        lse, tz, ent, lo = real(*args, **kw)
        return lse + 0.1, tz, ent, lo

    monkeypatch.setattr(autograd, "logprobs_split_fwd", wrong)
    timer = FakeTimer(TIMES)
    assert _choose(timer) == {"fwd": "fused", "bwd": "workspace"}
    entry = next(iter(json.loads(autotune.cache_path().read_text())["entries"].values()))
    assert entry["probe"]["bwd=workspace,fwd=split"].startswith("failed: logp")
    assert entry["probe"]["bwd=workspace,fwd=fused"] == "ok"
    assert all("fwd=split" not in c for c in timer.calls)


def test_no_candidate_passing_falls_back_to_the_table_and_is_not_cached():
    result = autotune.tune(autotune.CANDIDATES, run=lambda c: (lambda: None), probe=lambda c: (False, "off"),
                           timer=lambda c, fn: 1.0, budget_s=1.0, clock=FakeClock())
    assert result["choice"] is None and result["times_ms"] == {}
    assert all(v == "failed: off" for v in result["probe"].values())


def test_budget_stops_after_the_first_full_round():
    clock = FakeClock()
    timer = FakeTimer(TIMES)
    res = autotune.tune(autotune.CANDIDATES, run=lambda c: (lambda: None), probe=lambda c: (True, ""),
                        timer=timer, budget_s=0.0, clock=clock)
    assert len(timer.calls) == len(autotune.CANDIDATES)  # one sample each, then the budget ends it
    assert res["choice"] == {"fwd": "split", "bwd": "workspace"}


def test_environment_switches(monkeypatch):
    timer = FakeTimer(TIMES)
    monkeypatch.setenv(autotune.ENV_OFF, "0")
    assert _choose(timer) is None and timer.calls == []  # tuning.AUTO decides
    monkeypatch.setenv(autotune.ENV_FORCE, "bwd=atomic")
    assert _choose(timer) == {"fwd": "fused", "bwd": "atomic"} and timer.calls == []
    monkeypatch.setenv(autotune.ENV_FORCE, "fwd=split, bwd=workspace")
    assert _choose(timer) == {"fwd": "split", "bwd": "workspace"}
    monkeypatch.setenv(autotune.ENV_FORCE, "fwd=fast")
    with pytest.raises(ValueError, match=autotune.ENV_FORCE):
        _choose(timer)
    assert not autotune.cache_path().exists()


def test_a_cache_of_another_version_or_corrupt_is_ignored(monkeypatch):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    hidden, weight, _, bias = make_inputs(N, H, V, torch.float32, seed=1, bias=True)
    key = autotune.tuning_key(*FAKE_DEVICE, torch.float32, H, V, bias=True, softcap=True, entropy=False)
    path.write_text(json.dumps({"version": autotune.CACHE_VERSION + 1, "entries": {key: {"fwd": "fused", "bwd": "atomic"}}}))
    assert _choose(FakeTimer(TIMES)) == {"fwd": "split", "bwd": "workspace"}
    assert json.loads(path.read_text())["version"] == autotune.CACHE_VERSION  # replaced
    autotune.clear_memory_cache()
    path.write_text("{not json")
    assert _choose(FakeTimer(TIMES)) == {"fwd": "split", "bwd": "workspace"}


def test_rank_other_than_zero_takes_the_broadcast(monkeypatch):
    """Under torch.distributed a rank != 0 never measures: it takes rank 0's choice."""
    sent = {"choice": {"fwd": "fused", "bwd": "atomic"}, "source": "rank 0"}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def broadcast(obj, src=0, group=None, device=None):
        assert obj == [None] and src == 0
        obj[0] = sent

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    timer = FakeTimer(TIMES)
    assert _choose(timer) == {"fwd": "fused", "bwd": "atomic"} and timer.calls == []
    assert not autotune.cache_path().exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, root):
    os.environ[autotune.ENV_CACHE_DIR] = os.path.join(root, f"rank{rank}")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        hidden, weight, _, bias = make_inputs(N, H, V, torch.float32, seed=1, bias=True)

        def no_timer(c, fn):
            raise AssertionError("nobody measures: rank 0 has a cached choice")

        got = autotune.tuned_choice(hidden, weight, bias, softcap=7.0, timer=no_timer,
                                    device_info=lambda d: FAKE_DEVICE)
        with open(os.path.join(root, f"out{rank}.json"), "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_with_different_caches_agree(tmp_path):
    """Rank 0's cache says fused+atomic, rank 1's says split+workspace: both use rank 0's."""
    key = autotune.tuning_key(*FAKE_DEVICE, torch.float32, H, V, bias=True, softcap=True, entropy=False)
    for rank, (f, b) in enumerate((("fused", "atomic"), ("split", "workspace"))):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        (folder / autotune.cache_path().name).write_text(
            json.dumps({"version": autotune.CACHE_VERSION, "entries": {key: {"fwd": f, "bwd": b}}}))
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out{rank}.json").read_text()) == {"fwd": "fused", "bwd": "atomic"}


def test_linear_logprobs_takes_the_choice_only_for_auto(monkeypatch):
    """The dispatch in logprobs: "auto" takes the tuned value, an explicit fwd= / bwd= wins, no choice
    (tuning off) leaves "auto" for tuning.AUTO; off CUDA the autotuner is never asked."""
    from types import SimpleNamespace

    from iris_kernels import logprobs

    asked = []

    def fake(hidden, weight, bias, **kw):
        asked.append(kw)
        return {"fwd": "split", "bwd": "atomic"}

    monkeypatch.setattr(autotune, "tuned_choice", fake)
    cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    rest = (1.0, None, True)  # temperature, softcap, return_entropy
    assert logprobs._tuned_variant(cuda, None, None, "auto", "auto", *rest) == ("split", "atomic")
    assert logprobs._tuned_variant(cuda, None, None, "fused", "auto", *rest) == ("fused", "atomic")
    assert logprobs._tuned_variant(cuda, None, None, "auto", "workspace", *rest) == ("split", "workspace")
    assert asked[0] == {"temperature": 1.0, "softcap": None, "with_entropy": True}
    monkeypatch.setattr(autotune, "tuned_choice", lambda *a, **k: None)
    assert logprobs._tuned_variant(cuda, None, None, "auto", "auto", *rest) == ("auto", "auto")
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    monkeypatch.setattr(autotune, "tuned_choice", lambda *a, **k: pytest.fail("asked off CUDA"))
    assert logprobs._tuned_variant(cpu, None, None, "auto", "auto", *rest) == ("auto", "auto")


def test_a_candidate_that_fails_while_timed_is_dropped():
    def timer(c, fn):
        if c["fwd"] == "split":
            raise RuntimeError("CUDA out of memory")
        return TIMES[(c["fwd"], c["bwd"])]

    res = autotune.tune(autotune.CANDIDATES, run=lambda c: (lambda: None), probe=lambda c: (True, ""),
                        timer=timer, budget_s=1.0, clock=FakeClock())
    assert res["choice"] == {"fwd": "fused", "bwd": "workspace"}
    assert res["probe"]["bwd=workspace,fwd=split"] == "failed while timed: RuntimeError"
    assert set(res["times_ms"]) == {"bwd=workspace,fwd=fused", "bwd=atomic,fwd=fused"}
