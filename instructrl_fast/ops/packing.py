"""Packed (padding-free) batches: the one layout every per-token op accepts besides padded [B, T] rows.

A packed batch concatenates the tokens of S sequences into one row, [1, N] (or [N]) with N = total tokens, and says
where each sequence lies with ``cu_seqlens`` [S + 1] int32/int64: sequence s holds tokens [cu_seqlens[s],
cu_seqlens[s + 1]) (flash-attn's varlen convention, as verl's remove-padding and OpenRLHF's packing produce it).
A sequence may be empty. The ops take it as the keyword argument ``cu_seqlens`` and then treat each sequence as a
row of the padded layout: recurrences (GAE, returns) restart at every sequence end, per-sequence terms (the last
token's score, seq-mean reductions, GSPO's ratio, sequence-level rollout correction) are taken per sequence, and
the result equals the padded op's on the same sequences.

``check_packed`` validates the layout. The data checks (0 first, N last, non-decreasing) read ``cu_seqlens`` on
the host only where ``checks.eager_data_checks`` allows it (CPU tensors, or INSTRUCTRL_FAST_CHECKS=1); on a GPU
they run on the device (``torch._assert_async``, reported at the next sync), so the hot path never syncs.
The helpers below are the torch building blocks the ops share (and ``ops.ppo_actor_loss`` can call for its
seq-mean reductions): per-token sequence ids, per-sequence sums, the last token of each sequence.
"""

from __future__ import annotations

import torch

from instructrl_fast.checks import INDEX_DTYPES, check_tensor, eager_data_checks


def check_packed(cu_seqlens, total: int, like: str, device: torch.device) -> int:
    """Validates ``cu_seqlens`` for a packed batch of ``total`` tokens (the size of ``like``); returns S.

    Raises TypeError / ValueError naming ``cu_seqlens``. Data checks as described in the module docstring.
    """
    check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1)
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must hold n_seq + 1 >= 1 offsets, got an empty tensor")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {like} is on {device}; they must match")
    if torch.compiler.is_compiling():
        return cu_seqlens.numel() - 1
    first, last = cu_seqlens[0], cu_seqlens[-1]
    steps_ok = (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    what = f"cu_seqlens must start at 0, end at the number of tokens of {like} ({total}) and be non-decreasing"
    if eager_data_checks(cu_seqlens):
        if int(first) != 0 or int(last) != total or not bool(steps_ok):
            raise ValueError(f"{what}, got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'other offsets'}")
    else:
        torch._assert_async((first == 0) & (last == total) & steps_ok, what)
    return cu_seqlens.numel() - 1


def packed_shape(name: str, x: torch.Tensor) -> int:
    """N for a packed per-token tensor ``x`` of shape [1, N] or [N]; ValueError naming ``name`` otherwise."""
    if x.dim() == 1 or (x.dim() == 2 and x.shape[0] == 1):
        return x.shape[-1]
    raise ValueError(f"{name} must be packed as [1, total_tokens] or [total_tokens] when cu_seqlens is given, got "
                     f"shape {tuple(x.shape)}")


def seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[N] int64: the sequence of each token (searchsorted over the ends, so empty sequences are skipped)."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def seq_sum(x: torch.Tensor, ids: torch.Tensor, n_seq: int) -> torch.Tensor:
    """[S] per-sequence sums of the per-token ``x`` [N] (differentiable w.r.t. x)."""
    return x.new_zeros(n_seq).index_add(0, ids, x)


def seq_ends(ids: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether each token is the last of its sequence (where a recurrence over the sequence restarts)."""
    return torch.cat((ids[1:] != ids[:-1], ids.new_ones(min(ids.numel(), 1), dtype=torch.bool)))


def last_valid(mask: torch.Tensor, ids: torch.Tensor, n_seq: int) -> torch.Tensor:
    """[S] int64: the position of each sequence's last valid token in the packed row, -1 where it has none."""
    positions = torch.where(mask, torch.arange(mask.numel(), device=mask.device), -1)
    return positions.new_full((n_seq,), -1).scatter_reduce(0, ids, positions, "amax")


class Rows:
    """The rows of a batch for per-row terms, one code path for both layouts: the B rows of [B, T] tensors, or the
    S sequences of a packed [1, N] (or [N]) batch with ``cu_seqlens``. Per-row results are [B] or [S]; ``expand``
    takes them back to the tokens. Every method is differentiable where its torch op is, and none syncs."""

    def __init__(self, like: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        self.cu_seqlens = cu_seqlens
        self.shape = like.shape
        if cu_seqlens is not None:
            self.n = cu_seqlens.numel() - 1
            self.ids = seq_ids(cu_seqlens, like.numel())

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row sums of the per-token x."""
        return x.sum(dim=-1) if self.cu_seqlens is None else seq_sum(x.flatten(), self.ids, self.n)

    def mean(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Per-row means over the valid tokens (x already 0 elsewhere, m the float mask); 0 for an empty row."""
        return self.sum(x) / self.sum(m).clamp(min=1.0)

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row maxima (-inf for an empty packed sequence)."""
        if self.cu_seqlens is None:
            return x.amax(dim=-1)
        return x.new_full((self.n,), float("-inf")).scatter_reduce(0, self.ids, x.flatten(), "amax")

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-row: whether any token of the bool mask is set."""
        return mask.any(dim=-1) if self.cu_seqlens is None else self.sum(mask.to(torch.float32)) > 0

    def expand(self, per_row: torch.Tensor) -> torch.Tensor:
        """A per-row value [B] / [S] at every token of its row: [B, 1] (broadcasts over T) or the packed shape."""
        return per_row.unsqueeze(-1) if self.cu_seqlens is None else per_row[self.ids].view(self.shape)

