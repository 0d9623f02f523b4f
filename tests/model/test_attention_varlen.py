"""The flash-attn varlen metadata is built once per forward (one host sync), then shared by every layer."""

import torch

from instructrl_fast.model.attention import AttentionMeta


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_varlen_metadata_is_computed_once_per_forward():
    key_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    meta = AttentionMeta(key_mask=key_mask)
    with _Ops() as ops:
        first = meta.varlen_for_flash()
        for _ in range(3):  # the other layers of the same forward
            assert meta.varlen_for_flash() is first
    assert sum(name.startswith("aten.nonzero") for name in ops.names) == 1
    idx, cu = first
    assert idx.tolist() == [1, 2, 3, 4, 5, 6, 7, 11]
    assert cu.tolist() == [0, 3, 7, 8] and cu.dtype == torch.int32
