"""Triton kernels for the shard-local log-prob op (gather_logprobs / linear_logprobs / entropy).

Same per-shard semantics as the C++/CUDA schema ``instructrl_fast::logprob_fwd`` / ``logprob_bwd`` (see
instructrl_fast/ops/logprob.py): with x_j = logits[n, j] / temperature in fp32,

    forward   row_max[n] = max_j x_j, log_sum[n] = log sum_j exp(x_j - row_max)   (online, over BLOCK_V chunks)
              target[n]  = x[label - vocab_start] if the label falls in this shard and is not ignored, else 0
              mean_xs[n] = sum_j softmax_j * (x_j - row_max)    (shard-local softmax; only WITH_ENTROPY)
    backward  dlogits[n, j] = (1/T) * (g_lp * (1[j == label - vocab_start] - p_j) - g_ent * p_j * (x_j - E_p[x]))
              with p_j = exp((x_j - row_max) - log_sum) from the GLOBAL row_max and log_sum (kept apart: a rounded
              lse = row_max + log_sum would put |x| * eps of relative error into every p_j), E_p[x] = lse - H;
              0 on ignored rows. FULL_KL (ppo_actor_loss's exact KL) adds g_kl * p_j ((x_j - y_j) - E_p[x - y]) with
              y = ref_logits / T, in the same pass over the row.

Layout: logits [B, T, V] with any strides in B and T and a contiguous last dim (row n = b * T + t), so a slice such
as ``logits[:, :-1][:, -k:]`` is read in place, from a base pointer on the 16-byte boundary at or before its first
element plus an element offset (``aligned_base``), so that a view starting mid-pack (``logits[:, 1:]``) keeps the
alignment hints. Each row is split across SPLITS programs (grid (N, SPLITS)): the forward writes one online-softmax
state (m, s, t) per program, combined here in a few [N, SPLITS] operations, so a call with few rows (rollout time:
8-64) still fills the GPU. Within a row, the columns before the first 16-byte
boundary (the head: V = 50257 leaves every row misaligned) and the tail after the last full 16-byte pack are read by
one small edge block; the body between them is aligned, its bound is a multiple of the pack, and the compiler is told
so, which keeps 128-bit vector loads. Row offsets are int64: N * V passes 2^31 at real sizes.
"""

import torch
import triton
import triton.language as tl

from instructrl_fast.backend import triton_interpreting
from instructrl_fast.kernels._launch import FP_FUSION, new_grad, on_device, sm_count, span

# Under the interpreter the cost grows with the number of loop steps, not elements: use one big block there.
_MAX_BLOCK_V_GPU = 4096
_MAX_BLOCK_V_INTERPRETER = 32768


@triton.jit
def _row_layout(row, T, stride_b, stride_t, V, offset, align, VEC: tl.constexpr, HINT: tl.constexpr):
    """(offset of row n from the base pointer, head, body): columns [0, head) lie before the row's first 16-byte
    boundary, [head, head + body) are whole 16-byte packs (body a multiple of VEC), [head + body, V) the tail.
    ``offset``: the element offset of element (0, 0) from the base pointer, whose own misalignment is ``align``
    elements (0 when the launcher found the 16-byte boundary on the same storage: then HINT)."""
    row_off = offset + (row // T) * stride_b + (row % T) * stride_t
    head = tl.minimum((VEC - (align + row_off) % VEC) % VEC, V)
    body = (V - head) // VEC * VEC
    start = row_off + head
    if HINT:  # the element offset of the body is then a multiple of VEC (the base pointer is 16-byte aligned)
        start = tl.multiple_of(start, VEC)
    body = tl.multiple_of(body, VEC)
    return row_off, head, body, start


@triton.jit
def _edge_columns(head, body, V, VEC: tl.constexpr):
    """The head and tail columns of a row as one block of 2 * VEC lanes, with their validity."""
    i = tl.arange(0, 2 * VEC)
    cols = tl.where(i < VEC, i, head + body + i - VEC)
    return cols, tl.where(i < VEC, i < head, cols < V)


@triton.jit
def _online_add(m, s, t, x, WITH_ENTROPY: tl.constexpr):
    """Online logsumexp (Milakov & Gimelshein 2018) state (m, s = sum exp(x - m), t = sum exp(x - m) (x - m)) plus
    x. t is kept relative to the running max (moving the max by d adds s * d), so E_p[x] - max carries no |x| * eps."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # A row that is -inf so far would give exp(-inf - -inf) = nan: shift by 0 instead.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    xs = x - shift
    e = tl.exp(xs)
    if WITH_ENTROPY:
        # s == 0 (nothing but -inf so far) has no moment to move (and m - shift may be -inf). e == 0 covers padding
        # and -inf logits, where e * xs would be 0 * -inf = nan.
        t = alpha * (t + s * (tl.where(s > 0.0, m, shift) - shift)) + tl.sum(e * tl.where(e > 0.0, xs, 0.0), axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,  # [B, T, V] this rank's vocab shard, strides (stride_b, stride_t, 1); fp32/bf16/fp16
    labels_ptr,  # [N] int64 GLOBAL vocab ids (or ignore_index), N = B * T
    parts_ptr,  # [3, N, SPLITS] fp32 out: each program's (m, s, t) over its columns, t relative to m
    target_ptr,  # [N] fp32 out: x at the label when it lies in this shard, else 0
    N,
    T,  # rows per batch entry
    stride_b,  # strides of logits, in elements
    stride_t,
    V,  # shard vocab size
    offset,  # element offset of logits[0, 0] from logits_ptr (see aligned_base)
    align,  # (logits_ptr % 16) / element size: 0 unless the storage itself is misaligned
    inv_temperature,  # fp32 scalar: 1 / temperature (a multiply, like the C++/CUDA kernels)
    ignore_index,  # int
    vocab_start,  # int: global id of this shard's column 0
    WITH_ENTROPY: tl.constexpr,
    SPLITS: tl.constexpr,  # programs per row
    VEC: tl.constexpr,  # elements per 16 bytes
    HINT: tl.constexpr,  # align == 0: the body's offsets may be declared multiples of VEC
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_off, head, body, start = _row_layout(row, T, stride_b, stride_t, V, offset, align, VEC, HINT)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for blk in range(split, tl.cdiv(body, BLOCK_V), SPLITS):
        rel = blk * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + start + rel, mask=rel < body, other=float("-inf")).to(tl.float32) * inv_temperature
        m, s, t = _online_add(m, s, t, x, WITH_ENTROPY)
    if split == 0:
        cols, valid = _edge_columns(head, body, V, VEC)
        x = tl.load(logits_ptr + row_off + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        m, s, t = _online_add(m, s, t, x, WITH_ENTROPY)
        label = tl.load(labels_ptr + row)
        local = label - vocab_start
        hit = (local >= 0) & (local < V) & (label != ignore_index)
        x_label = tl.load(logits_ptr + row_off + tl.where(hit, local, 0)).to(tl.float32) * inv_temperature
        tl.store(target_ptr + row, tl.where(hit, x_label, 0.0))
    part = row * SPLITS + split
    tl.store(parts_ptr + part, m)
    tl.store(parts_ptr + N * SPLITS + part, s)
    tl.store(parts_ptr + 2 * N * SPLITS + part, t)


@triton.jit
def _grad_terms(x, y, cols, local, g_lp, g_ent, g_kl, shift, log_sum, mean_xs, shift_y, mean_diff,
                WITH_ENTROPY: tl.constexpr, FULL_KL: tl.constexpr):
    """d/dx_j of g_lp * logp + g_ent * H + g_kl * KL(p || q) (before the 1/T factor) over one block of columns;
    mean_xs = E_p[x] - shift, y the reference's tempered logits (FULL_KL), mean_diff = E_p[(x - shift) - (y -
    shift_y)]. Every term is formed from x - shift (and y - shift_y), never from x itself: |x| ~ 20 would cost its
    rounding in every p_j."""
    xs = x - shift
    p = tl.exp(xs - log_sum)
    g = g_lp * (tl.where(cols == local, 1.0, 0.0) - p)  # d logp / d x_j = 1[j == label] - p_j
    if WITH_ENTROPY:
        # d H / d x_j = -p_j * (x_j - E_p[x]); p_j == 0 (e.g. x_j = -inf) contributes 0, not 0 * inf = nan.
        g -= g_ent * p * tl.where(p > 0.0, xs - mean_xs, 0.0)
    if FULL_KL:
        # d KL / d x_j = p_j ((x_j - y_j) - E_p[x - y]) (exact; the reference gets no gradient)
        g += g_kl * p * tl.where(p > 0.0, (xs - (y - shift_y)) - mean_diff, 0.0)
    return g


@triton.jit
def _logprob_bwd_kernel(
    grad_logits_ptr,  # [B, T, V] out, dtype of logits, strides (out_stride_b, out_stride_t, 1) from out_offset
    grad_logp_ptr,  # [N] fp32 upstream gradient of logp
    grad_entropy_ptr,  # [N] fp32 upstream gradient of the entropy; unused unless WITH_ENTROPY
    logits_ptr,  # [B, T, V] strides (stride_b, stride_t, 1); fp32/bf16/fp16
    labels_ptr,  # [N] int64 GLOBAL ids (or ignore_index)
    row_max_ptr,  # [N] fp32 GLOBAL max of x
    log_sum_ptr,  # [N] fp32 GLOBAL log sum exp(x - row_max)
    entropy_ptr,  # [N] fp32 GLOBAL entropy; unused unless WITH_ENTROPY
    ref_logits_ptr,  # [B, T, V] reference logits, logits' strides and alignment; unused unless FULL_KL
    g_kl_ptr,  # [N] fp32 upstream gradient of the full KL; unused unless FULL_KL
    ref_shift_ptr,  # [N] fp32 GLOBAL row max of the reference's y = ref_logits / T (0 for an all -inf row)
    mean_diff_ptr,  # [N] fp32 GLOBAL E_p[(x - row_max) - (y - ref_shift)]
    T,
    stride_b,
    stride_t,
    out_stride_b,
    out_stride_t,
    out_offset,  # element offset of grad_logits[0, 0] from grad_logits_ptr (16-byte aligned)
    V,
    offset,  # element offset of logits[0, 0] (and ref_logits[0, 0]) from logits_ptr (ref_logits_ptr)
    align,  # (logits_ptr % 16) / element size: 0 unless the storage itself is misaligned
    inv_temperature,  # fp32 scalar: 1 / temperature
    ignore_index,  # int
    vocab_start,  # int
    WITH_ENTROPY: tl.constexpr,
    FULL_KL: tl.constexpr,  # add g_kl * d KL(p || q) / d logits, q = softmax(ref_logits / T)
    SPLITS: tl.constexpr,
    VEC: tl.constexpr,
    HINT: tl.constexpr,  # align == 0
    HINT_OUT: tl.constexpr,  # the output rows share the input rows' alignment, so the body's stores are aligned too
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_off, head, body, start = _row_layout(row, T, stride_b, stride_t, V, offset, align, VEC, HINT)
    out_row = out_offset + (row // T) * out_stride_b + (row % T) * out_stride_t
    out_start = out_row + head
    if HINT_OUT:
        out_start = tl.multiple_of(out_start, VEC)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    # Ignored rows get no gradient: zeroing the upstream gradients makes every term 0 in the same single pass.
    g_lp = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row))
    m = tl.load(row_max_ptr + row)
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_sum = tl.load(log_sum_ptr + row)
    g_ent = 0.0
    mean_xs = 0.0
    if WITH_ENTROPY:
        g_ent = tl.where(ignored, 0.0, tl.load(grad_entropy_ptr + row))
        mean_xs = log_sum - tl.load(entropy_ptr + row)  # E_p[x] - row_max = log_sum - H
    g_kl = 0.0
    shift_y = 0.0
    mean_diff = 0.0
    if FULL_KL:
        g_kl = tl.where(ignored, 0.0, tl.load(g_kl_ptr + row))
        shift_y = tl.load(ref_shift_ptr + row)
        mean_diff = tl.load(mean_diff_ptr + row)
    local = label - vocab_start
    out_ty = grad_logits_ptr.dtype.element_ty
    for blk in range(split, tl.cdiv(body, BLOCK_V), SPLITS):
        rel = blk * BLOCK_V + tl.arange(0, BLOCK_V)
        inside = rel < body
        x = tl.load(logits_ptr + start + rel, mask=inside, other=float("-inf")).to(tl.float32) * inv_temperature
        y = 0.0
        if FULL_KL:
            y = tl.load(ref_logits_ptr + start + rel, mask=inside, other=0.0).to(tl.float32) * inv_temperature
        g = _grad_terms(x, y, head + rel, local, g_lp, g_ent, g_kl, shift, log_sum, mean_xs, shift_y, mean_diff,
                        WITH_ENTROPY, FULL_KL)
        tl.store(grad_logits_ptr + out_start + rel, (g * inv_temperature).to(out_ty), mask=inside)
    if split == 0:
        cols, valid = _edge_columns(head, body, V, VEC)
        x = tl.load(logits_ptr + row_off + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        y = 0.0
        if FULL_KL:
            y = tl.load(ref_logits_ptr + row_off + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        g = _grad_terms(x, y, cols, local, g_lp, g_ent, g_kl, shift, log_sum, mean_xs, shift_y, mean_diff,
                        WITH_ENTROPY, FULL_KL)
        tl.store(grad_logits_ptr + out_row + cols, (g * inv_temperature).to(out_ty), mask=valid)


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


def aligned_base(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(base, offset, align): a 1-D view of x's storage from the 16-byte boundary at or before x's first element to
    its last (its pointer is what the kernel gets: Triton then specialises it as 16-byte aligned), x's element offset
    in it, and the base's own misalignment in elements (0, unless the storage does not start on a boundary: then x
    itself). A view such as logits[:, 1:] keeps 128-bit loads this way; its rows' own misalignment is the kernels'
    head."""
    size = x.element_size()
    shift = (x.data_ptr() % 16) // size
    if shift == 0 or x.data_ptr() % size or x.storage_offset() < shift:
        return x, 0, shift
    return x.as_strided((span(x) + shift,), (1,), x.storage_offset() - shift), shift, 0


def _layout(logits: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(B, T, V, stride_b, stride_t) of a [B, T, V] tensor with a contiguous last dim."""
    B, T, V = logits.shape
    return B, T, V, logits.stride(0), logits.stride(1)


def _num_splits(device: torch.device, N: int, blocks: int) -> int:
    """Programs per row: on a GPU enough for about 4 programs per SM (at least one body block each); 1 under the
    interpreter (tests patch this to exercise the partial-state combine)."""
    if device.type != "cuda" or N == 0:
        return 1
    return max(1, min(triton.cdiv(4 * sm_count(device), N), blocks))


def launch_config(N: int, V: int, device: torch.device, invariant: bool = False) -> tuple[int, int, int]:
    """(BLOCK_V, SPLITS, num_warps). With few rows a row is split over several programs in smaller blocks, which
    changes the order of its reductions with N; ``invariant`` gives every N the configuration of a large batch (one
    program per row, the widest block), so a row's values do not depend on how many rows the call has."""
    if triton_interpreting():
        block_v = min(triton.next_power_of_2(max(V, 1)), _MAX_BLOCK_V_INTERPRETER)
    else:
        wide = invariant or N >= 4 * sm_count(device)
        block_v = min(triton.next_power_of_2(max(V, 1)), _MAX_BLOCK_V_GPU if wide else 1024)
    splits = 1 if invariant else _num_splits(device, N, triton.cdiv(V, block_v))
    return block_v, splits, 8 if block_v >= 2048 else 4


def logprob_fwd(logits, labels, temperature: float, ignore_index: int, vocab_start: int, with_entropy: bool,
                invariant: bool = False):
    """Shard-local forward: logits [B, T, V] or [N, V] (last dim contiguous, any other strides), labels [N] int64
    -> (row_max, log_sum, target, mean_xs), fp32 [N]; mean_xs is (0,) unless ``with_entropy``. ``invariant``: the
    launch configuration does not depend on N (``launch_config``)."""
    logits = _as_3d(logits)
    B, T, V, stride_b, stride_t = _layout(logits)
    N = B * T
    target = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=logits.device)
        return empty, torch.empty_like(empty), target, torch.empty_like(empty)
    block_v, splits, num_warps = launch_config(N, V, logits.device, invariant)
    parts = torch.empty((3, N, splits), dtype=torch.float32, device=logits.device)
    # A row's head (the columns before its first 16-byte boundary) depends on where the row lies in memory, hence
    # on its place in the call; the invariant mode walks every row from its column 0 in blocks of BLOCK_V instead
    # (VEC = 1: no head, no pack hints), so the order of its reductions is the same wherever it lies.
    vec = 1 if invariant else 16 // logits.element_size()
    base, offset, align = aligned_base(logits)
    with on_device(logits):
        _logprob_fwd_kernel[(N, splits)](
            base, labels, parts, target, N, T, stride_b, stride_t, V, offset, align, 1.0 / temperature, ignore_index,
            vocab_start, WITH_ENTROPY=with_entropy, SPLITS=splits, VEC=vec, HINT=align == 0, BLOCK_V=block_v,
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    m, s, t = parts.unbind(0)
    if splits == 1:
        row_max, total = m[:, 0], s[:, 0]
        mean_xs = t[:, 0] / total if with_entropy else t.new_empty(0)
    else:  # the programs' states of a row combined as shards are (see the ops module)
        row_max = m.amax(dim=1)
        shift = torch.where(row_max == float("-inf"), 0.0, row_max)[:, None]
        scale = torch.exp(m - shift)
        total = (s * scale).sum(1)
        mean_xs = t.new_empty(0)
        if with_entropy:  # each program's t is relative to its own max: move it to the row's
            moved = t + torch.where(s > 0, s * (m - shift), 0.0)
            mean_xs = (moved * scale).sum(1) / total
    return row_max, torch.log(total), target, mean_xs


def logprob_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature: float,
                ignore_index: int, vocab_start: int, full_kl=None, in_place: bool = False):
    """Shard-local backward: -> d(logits) of logits' shape and dtype, laid out by ``new_grad``.

    grad_entropy and entropy are fp32 [N], or both of shape (0,) when there is no entropy output. ``full_kl``:
    (g_kl [N], ref_logits (logits' shape and strides), ref_shift [N], mean_diff [N]) adds g_kl * d KL(p || q) /
    d logits in the same pass (ops.ppo_actor_loss's kl_estimator="full"). ``in_place`` (logits contiguous, as the
    C++ op logprob_bwd_inplace asks): d(logits) is written over logits and logits returned; each element is read by
    the program that then writes its gradient, so no second buffer is needed.
    """
    base, offset, align = aligned_base(logits)
    if in_place and not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous to take its gradient in place, got strides {logits.stride()}")
    grad_logits = logits if in_place else new_grad(logits)
    logits, out = _as_3d(logits), _as_3d(grad_logits)
    B, T, V, stride_b, stride_t = _layout(logits)
    N = B * T
    if N == 0:
        return grad_logits
    vec = 16 // logits.element_size()
    if in_place:  # the output rows are the input rows, reached from the same base
        buffer, phase = base, offset
    else:
        phase = grad_logits.storage_offset()
        buffer = grad_logits.as_strided((span(grad_logits) + phase,), (1,), 0)  # the allocation: 16-byte aligned
    with_entropy = grad_entropy.numel() > 0
    if full_kl is not None:
        g_kl, ref_logits, ref_shift, mean_diff = full_kl
        ref_logits = _as_3d(ref_logits)
        ref_base, ref_offset, ref_align = aligned_base(ref_logits)
        if ref_logits.stride() != logits.stride() or (ref_offset, ref_align) != (offset, align):
            raise ValueError("ref_logits must have the strides and 16-byte alignment of logits")
    else:
        g_kl = ref_base = ref_shift = mean_diff = row_max
    block_v, splits, num_warps = launch_config(N, V, logits.device)
    # Output row n starts at phase + b * out_stride_b + t * out_stride_t of an aligned buffer: it shares the input
    # row's 16-byte phase when the strides agree modulo the pack (always, when new_grad kept logits' own).
    out_stride_b, out_stride_t = out.stride(0), out.stride(1)
    same = (buffer.data_ptr() % 16 == 0 and (phase - offset) % vec == 0 and (stride_t - out_stride_t) % vec == 0
            and (B == 1 or (stride_b - out_stride_b) % vec == 0))
    with on_device(logits):
        _logprob_bwd_kernel[(N, splits)](
            buffer, grad_logp, grad_entropy if with_entropy else grad_logp, base, labels, row_max, log_sum,
            entropy if with_entropy else row_max, ref_base, g_kl, ref_shift, mean_diff, T, stride_b, stride_t,
            out_stride_b, out_stride_t, phase, V, offset, align, 1.0 / temperature, ignore_index, vocab_start,
            WITH_ENTROPY=with_entropy,
            FULL_KL=full_kl is not None, SPLITS=splits, VEC=vec, HINT=align == 0,
            HINT_OUT=bool(align == 0 and same),
            BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return grad_logits
