"""A CPU proxy for "no host synchronisation": every Python-level read-back of a tensor raises.

On a GPU these are the calls that make the host wait for the device (.item(), bool(t), int(t),
.tolist(), .cpu(), ...); trapping them on CPU tensors finds them without a GPU.
"""
import contextlib

import torch

_SYNC_ENTRY_POINTS = ["item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero", "numpy", "cpu"]


@contextlib.contextmanager
def forbid_host_sync():
    saved = {n: getattr(torch.Tensor, n) for n in _SYNC_ENTRY_POINTS}

    def trap(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host sync through Tensor.{name}")

        return f

    try:
        for n in _SYNC_ENTRY_POINTS:
            setattr(torch.Tensor, n, trap(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
