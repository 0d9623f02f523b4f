"""A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): the tests of ops that must not sync with the host."""

import importlib

import torch


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every ATen op that makes the host read device data (what .item(), bool(tensor), nonzero, unique or
    data-dependent shapes dispatch to): on CPU tensors this sees the syncs a CUDA run would make."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten._unique",
               "aten.unique", "aten.masked_select", "aten.item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            raise AssertionError(f"{func} reads device data on the host")
        return func(*args, **(kwargs or {}))


def as_on_device(monkeypatch):
    """The eager data checks (made on CPU tensors only) switched off, as they are for CUDA tensors."""
    for module in ("instructrl_fast.checks", "instructrl_fast.ops.group_advantages"):
        monkeypatch.setattr(importlib.import_module(module), "eager_data_checks", lambda x: False)
