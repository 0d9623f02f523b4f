"""GPU-sized checks run by bench/gpu_check.sh on a real GPU (not collected by the CPU test suite: tests/ is).

Every check compares against float64 references (on a random subset of rows where the full reference would not fit)
and cannot pass without CUDA: the first test asserts the device, the Triton interpreter being off and the CUDA
extension being loaded, and every other one runs on ``cuda`` tensors.

    python -m pytest -q bench/gpu_tests.py --junitxml=junit.xml
"""

import os

import pytest
import torch

from instructrl_fast import _ext, batch_invariant, ops
from instructrl_fast.backend import use_backend
from instructrl_fast.ops.policy_loss import LOSS_TYPES, RS_OPTIONS, PolicyLossConfig, RolloutCorrection
from tests.reference import (
    entropy_ref,
    gae_ref,
    gather_logprobs_ref,
    linear_logprobs_ref,
    pad_packed,
    ppo_policy_loss_ref,
    ppo_value_loss_ref,
)

IGNORE = -100
CUDA = torch.device("cuda")
LOGPROB_BACKENDS = ["triton", "cuda"]


def test_environment():
    assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "TRITON_INTERPRET=1: the Triton kernels would not compile"
    assert _ext.HAS_CUDA_EXT, f"the CUDA extension instructrl_fast._C_cuda is not loaded: {_ext.CUDA_EXT_ERROR}"


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _subset_check(logits, labels, lp, ent, grad, g_lp, g_ent, rows, tol):
    """Rows are independent: the float64 reference of a row subset checks the outputs and gradients of those rows."""
    flat = logits.reshape(-1, logits.shape[-1])
    x = flat[rows].double().requires_grad_()
    ref_lp, ref_ent = gather_logprobs_ref(x, labels.reshape(-1)[rows], ignore_index=IGNORE)
    ((ref_lp * g_lp.reshape(-1)[rows]).sum() + (ref_ent * g_ent.reshape(-1)[rows]).sum()).backward()
    assert _err(lp.reshape(-1)[rows], ref_lp) < tol
    assert _err(ent.reshape(-1)[rows], ref_ent) < tol
    assert _err(grad.reshape(-1, logits.shape[-1])[rows], x.grad) < tol


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("V", [50257, 128256])
def test_gather_logprobs_32k_rows(backend, V):
    """32768 rows of GPT-2's and Llama-3's vocab in bf16 (several blocks per row; 32768 x 128256 > 2^31 elements)."""
    torch.manual_seed(0)
    N = 32768
    logits = (torch.randn(N, V, device=CUDA) * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (N,), device=CUDA)
    labels[::7] = IGNORE
    g_lp, g_ent = torch.randn(N, device=CUDA), torch.rand(N, device=CUDA)
    with use_backend(backend):
        lp, ent = ops.gather_logprobs(logits, labels, ignore_index=IGNORE, with_entropy=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    rows = torch.cat([torch.randint(0, N, (48,), device=CUDA), torch.tensor([0, 7, N - 1], device=CUDA)])
    # bf16 inputs, fp32 outputs: the quantised logits are the input, so fp32-level agreement on the outputs; the
    # gradient is rounded to bf16 once (relative 2^-8 of values <= 1).
    _subset_check(logits.detach(), labels, lp, ent, logits.grad, g_lp, g_ent, rows, tol=1e-2)
    assert _err(lp.reshape(-1)[rows], gather_logprobs_ref(logits.detach()[rows].double(), labels[rows],
                                                          ignore_index=IGNORE)[0]) < 1e-4
    del logits
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_few_rows_and_strided_slices(backend):
    """Rollout-time calls (8 rows: the Triton kernels split rows across programs) and TRL's logits[:, :-1][:, -k:]
    on a [4, 1025, 50257] tensor, read in place."""
    torch.manual_seed(1)
    few = torch.randn(8, 128256, device=CUDA, requires_grad=True)
    labels = torch.randint(0, 128256, (8,), device=CUDA)
    g = torch.randn(8, device=CUDA)
    with use_backend(backend):
        lp, ent = ops.gather_logprobs(few, labels, temperature=0.7, with_entropy=True)
    ((lp + ent) * g).sum().backward()
    x = few.detach().double().requires_grad_()
    ref_lp, ref_ent = gather_logprobs_ref(x, labels, 0.7)
    ((ref_lp + ref_ent) * g).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(few.grad.double(), x.grad, rtol=1e-4, atol=1e-6)

    base = (torch.randn(4, 1025, 50257, device=CUDA) * 2).bfloat16().requires_grad_()
    view = base[:, :-1][:, -512:]
    labels = torch.randint(0, 50257, (4, 512), device=CUDA)
    g_lp, g_ent = torch.randn(4, 512, device=CUDA), torch.rand(4, 512, device=CUDA)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with use_backend(backend):
        lp, ent = ops.gather_logprobs(view, labels, with_entropy=True)
    extra = torch.cuda.memory_allocated() - before
    assert extra < 4 * 512 * 64, f"the forward allocated {extra} bytes: a copy of the logits?"
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    rows = torch.randint(0, 4 * 512, (32,), device=CUDA)
    _subset_check(view.detach(), labels, lp, ent, base.grad[:, :-1][:, -512:], g_lp, g_ent, rows, tol=1e-2)


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_actor_loss_full_kl_and_misaligned_views_on_cuda(backend):
    """ppo_actor_loss with the exact full-vocabulary KL (its gradient folded into the log-prob backward, written in
    place over each chunk's logits: logprob_bwd_inplace on CUDA) at N = 1024, V = 50257, D = 512 fp32 against the
    float64 reference; then the shard-local backward with the KL term on a TRL-style misaligned bf16 view, whose
    d(logits) is laid out as new_grad (rows at their input rows' 16-byte phase) and matches the contiguous copy's."""
    from instructrl_fast.kernels._launch import new_grad
    from instructrl_fast.ops import ActorLossConfig
    from instructrl_fast.ops.logprob import shard_bwd
    from tests.reference import ppo_actor_loss_ref

    torch.manual_seed(7)
    B, T, D, V = 2, 512, 512, 50257
    hidden = (torch.randn(B, T, D, device=CUDA) / 8).requires_grad_()
    weight = (torch.randn(V, D, device=CUDA) / 8).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.05 * torch.randn_like(hidden), weight.detach()
    labels = torch.randint(0, V, (B, T), device=CUDA)
    old, adv = torch.randn(B, T, device=CUDA) * 0.1 - 10, torch.randn(B, T, device=CUDA)
    mask = torch.rand(B, T, device=CUDA) > 0.1
    cfg = {"kl_coef": 0.2, "kl_estimator": "full", "entropy_coef": 0.01}
    with use_backend(backend):
        loss, _ = ops.ppo_actor_loss(hidden, weight, labels, old, adv, mask, config=ActorLossConfig(**cfg),
                                     ref_hidden=ref_hidden, ref_weight=ref_weight)
    loss.backward()
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref, _ = ppo_actor_loss_ref(h, w, labels, old, adv, mask, ref_hidden=ref_hidden.double(),
                                ref_weight=ref_weight.double(), **cfg)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w.grad, rtol=1e-3, atol=1e-6)

    base, ref_base = ((torch.randn(4, 257, V, device=CUDA) * 2).bfloat16() for _ in range(2))
    for rows in (slice(1, None), slice(None, -1)):
        view, ref_view = base[:, rows], ref_base[:, rows]
        N = view.shape[0] * view.shape[1]
        lab = torch.randint(0, V, (N,), device=CUDA)
        stats = view.float().reshape(N, V).amax(-1), torch.full((N,), 8.0, device=CUDA)
        g = torch.randn(N, device=CUDA)
        ref_shift, mean_diff = ref_view.float().reshape(N, V).amax(-1), torch.zeros(N, device=CUDA)
        grads = [shard_bwd(backend, g, g[:0], x, lab, *stats, g[:0], 1.0, IGNORE, 0, full_kl=(g, y, ref_shift,
                                                                                               mean_diff))
                 for x, y in ((view, ref_view), (view.contiguous(), ref_view.contiguous()))]
        if backend == "cuda":
            assert grads[0].stride() == new_grad(view).stride() == view.stride()
        torch.testing.assert_close(grads[0], grads[1])  # the same formula; packs and scalars may round apart


def test_k_labels_entropy_and_linear_on_cuda():
    torch.manual_seed(2)
    logits = torch.randn(64, 50257, device=CUDA, requires_grad=True)
    labels = torch.randint(0, 50257, (64, 5), device=CUDA, dtype=torch.int32)
    lp, ent = ops.gather_logprobs(logits, labels, with_entropy=True)
    (lp.sum() + ent.sum() + ops.entropy(logits).sum()).backward()
    x = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = gather_logprobs_ref(x, labels)
    (ref_lp.sum() + 2 * ref_ent.sum()).backward()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), entropy_ref(logits.detach()), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=1e-4, atol=1e-6)

    # linear_logprobs in bf16 (dW accumulated in place in fp32): within 2x of the bf16 composite's error.
    hidden = (torch.randn(4096, 1024, device=CUDA) / 4).bfloat16().requires_grad_()
    weight = (torch.randn(50257, 1024, device=CUDA) / 32).bfloat16().requires_grad_()
    labels = torch.randint(0, 50257, (4096,), device=CUDA)
    ops.linear_logprobs(hidden, weight, labels).sum().backward()
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    linear_logprobs_ref(h, w, labels)[0].sum().backward()
    hc, wc = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    torch.log_softmax(hc @ wc.T, -1).gather(-1, labels[:, None]).sum().backward()
    assert _err(weight.grad, w.grad) <= 2 * _err(wc.grad, w.grad) + 1e-5
    assert _err(hidden.grad, h.grad) <= 2 * _err(hc.grad, h.grad) + 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU: the cross-device launch needs two")
def test_launch_on_the_tensors_device():
    """A tensor on cuda:1 while cuda:0 is current: every kernel must launch on cuda:1."""
    logits = torch.randn(16, 50257, device="cuda:1", requires_grad=True)
    labels = torch.randint(0, 50257, (16,), device="cuda:1")
    with torch.cuda.device(0), use_backend("triton"):
        lp = ops.gather_logprobs(logits, labels)
        lp.sum().backward()
        kl = ops.kl_penalty(lp.detach(), lp.detach() * 0.9, estimator="k3")
    ref = gather_logprobs_ref(logits.detach().double(), labels)[0]
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=2e-5)
    assert kl.device == logits.device


def test_torch_compile_fullgraph_loss_on_cuda():
    """The PPO policy loss on fused log-probs, compiled with inductor (fullgraph), equals eager, forward and grad."""
    torch.manual_seed(3)
    logits = (torch.randn(4, 64, 50257, device=CUDA) * 2).bfloat16()
    labels = torch.randint(0, 50257, (4, 64), device=CUDA)
    old = torch.randn(4, 64, device=CUDA) * 0.1 - 3
    adv, mask = torch.randn(4, 64, device=CUDA), torch.rand(4, 64, device=CUDA) > 0.2

    def loss_fn(x):
        lp, ent = ops.gather_logprobs(x, labels, with_entropy=True)
        loss, _ = ops.ppo_policy_loss(lp, old, adv, mask)
        return loss - 0.01 * ent.mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        x = logits.clone().requires_grad_()
        value = fn(x)
        value.backward()
        results.append((value.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-2, atol=1e-5)


@torch.no_grad()
def test_cuda_graph_captured_decode():
    """A model decode step (Triton decode attention, KV-cache writes, fused log-probs of the next token) captured in
    a CUDA graph and replayed for 6 steps equals the same steps run eagerly on a second cache."""
    from instructrl_fast.model import GPT, GPTConfig

    torch.manual_seed(4)
    model = GPT(GPTConfig.from_name("test-small")).to(CUDA).eval()
    B, P, N = 4, 16, 6
    prompt = torch.randint(0, 512, (B, P), device=CUDA)
    mask = torch.ones(B, P + N, dtype=torch.long, device=CUDA)
    mask[0, :3] = 0  # left padding

    def run(capture: bool):
        cache = model.setup_kv_cache(B, P + N)
        h = model(prompt, mask[:, :P], cache, torch.arange(P, device=CUDA))[:, -1]
        token = model.logits(h[:, None])[:, 0].argmax(-1)
        pos = torch.full((1,), P, dtype=torch.long, device=CUDA)

        def step():
            h = model(token[:, None], mask, cache, pos)[:, -1]
            shard = model.logits(h[:, None])[:, 0]
            return shard.argmax(-1), ops.gather_logprobs(shard, shard.argmax(-1))

        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the graph, on the cache's copy
                saved = [(c.k_cache.clone(), c.v_cache.clone()) for c in cache]
                step()
                for c, (k, v) in zip(cache, saved):
                    c.k_cache.copy_(k)
                    c.v_cache.copy_(v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                next_token, logp = step()
        outs = []
        for _ in range(N):
            if capture:
                graph.replay()
                nt, lp = next_token.clone(), logp.clone()
            else:
                nt, lp = step()
            outs.append((nt, lp))
            token.copy_(nt)
            pos += 1
        return outs

    eager, graphed = run(False), run(True)
    for (t_e, lp_e), (t_g, lp_g) in zip(eager, graphed):
        assert torch.equal(t_e, t_g)
        torch.testing.assert_close(lp_g, lp_e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_and_group_advantages_never_sync_on_cuda(loss_type):
    """ops.policy_loss (every type, with a sequence-level rollout correction and every rejection option) and
    ops.group_advantages make no host sync on CUDA (torch's sync debug mode raises on one) at a realistic batch,
    and their triton results equal the torch backend's."""
    torch.manual_seed(5)
    B, T = 1024, 512
    logp = -torch.rand(B, T, device=CUDA)
    old = logp + 0.3 * torch.randn(B, T, device=CUDA)
    adv = torch.randn(B, T, device=CUDA)
    mask = torch.rand(B, T, device=CUDA) < 0.9
    correction = RolloutCorrection(is_level="sequence", is_batch_normalize=True, rs=tuple(RS_OPTIONS),
                                   rs_thresholds=tuple((None, 50.0) for _ in RS_OPTIONS))
    scores = torch.randint(0, 2, (B,), device=CUDA).float()
    group = (torch.arange(B, device=CUDA) // 16)[torch.randperm(B, device=CUDA)]
    results = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ("torch", "triton"):
            x = logp.clone().requires_grad_()
            with use_backend(backend):
                loss, stats = ops.policy_loss(x, old, adv, mask, config=PolicyLossConfig(loss_type=loss_type),
                                              rollout_logp=old + 0.1, correction=correction)
                loss.backward()
                advantages = ops.group_advantages(scores, group, mask, estimator="grpo")
            results[backend] = (loss.detach(), stats["clipfrac"], stats["approx_kl"], x.grad, advantages)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if loss_type != "clip_cov":  # clip_cov draws its tokens at random
        for ours, ref in zip(results["triton"], results["torch"], strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_packed_gae_and_ppo_losses_on_cuda(backend):
    """A verl-sized packed batch (512 sequences of 0..4095 tokens, about 1M in all, bf16, int32 cu_seqlens):
    GAE and both PPO losses forward and backward make no host sync, equal the float64 references on the padded
    rows (GAE on a subset of sequences, the longest included), and equal the same backend on the padded layout."""
    torch.manual_seed(6)
    S = 512
    lengths = torch.randint(0, 4096, (S,), device=CUDA)
    lengths[::37] = 0  # empty sequences
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    N = int(cu[-1])
    mask = torch.rand(1, N, device=CUDA) < 0.9
    rewards, values, logp = torch.randn(3, 1, N, device=CUDA).bfloat16()
    old, old_values = (torch.cat([logp, values]).float() + 0.3 * torch.randn(2, N, device=CUDA)).bfloat16()
    returns = values + 0.5
    adv = torch.randn(1, N, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with use_backend(backend):
            out_adv, out_ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, cu_seqlens=cu)
            x, v = logp.clone().requires_grad_(), values.clone().requires_grad_()
            policy, stats = ops.ppo_policy_loss(x, old, adv, mask, clip_eps_high=0.28, dual_clip=3.0,
                                                reduction="seq_mean_token_mean", cu_seqlens=cu)
            value, _ = ops.ppo_value_loss(v, old_values, returns, mask, reduction="seq_mean_token_sum",
                                          cu_seqlens=cu)
            (policy * 0.7 + value).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    rows = {name: pad_packed(t, cu) for name, t in (("r", rewards), ("v", values), ("lp", logp), ("old", old),
                                                        ("old_v", old_values), ("adv", adv), ("ret", returns))}
    m = pad_packed(mask, cu, False)
    subset = torch.cat([torch.randint(0, S, (24,), device=CUDA), lengths.argmax()[None]])
    ref_adv, ref_ret = gae_ref(rows["r"][subset], rows["v"][subset], m[subset], 0.99, 0.95)
    assert _err(pad_packed(out_adv, cu)[subset].cpu(), ref_adv) < 1e-4
    assert _err(pad_packed(out_ret, cu)[subset].cpu(), ref_ret) < 1e-4
    x64, v64 = rows["lp"].double().requires_grad_(), rows["v"].double().requires_grad_()
    ref_policy = ppo_policy_loss_ref(x64, rows["old"].double(), rows["adv"].double(), m, 0.2, 0.28, 3.0,
                                     "seq_mean_token_mean")
    ref_value = ppo_value_loss_ref(v64, rows["old_v"].double(), rows["ret"].double(), m, 0.2, "seq_mean_token_sum")
    (ref_policy[0] * 0.7 + ref_value[0]).backward()
    assert _err(policy, ref_policy[0]) < 1e-5 and _err(value, ref_value[0]) < 1e-5
    assert _err(stats["clipfrac"], ref_policy[1]) < 1e-5 and _err(stats["approx_kl"], ref_policy[2]) < 1e-5
    # the gradients come back in logp's / values' dtype (bf16): one rounding of values <= 1 / S
    assert _err(pad_packed(x.grad, cu), x64.grad) < 1e-5 and _err(pad_packed(v.grad, cu), v64.grad) < 1e-5

    with use_backend(backend):
        pad_adv, _ = ops.gae(rows["r"], rows["v"], m, gamma=0.99, lam=0.95)
        pad_policy, _ = ops.ppo_policy_loss(rows["lp"], rows["old"], rows["adv"], m, clip_eps_high=0.28,
                                            dual_clip=3.0, reduction="seq_mean_token_mean")
    torch.testing.assert_close(pad_packed(out_adv, cu), pad_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy, pad_policy, rtol=1e-5, atol=1e-6)


def test_invariant_matmul_on_cuda():
    """The batch-invariant GEMM (kernels/invariant_matmul.py) at model sizes in bf16: a row's bits do not depend on
    M (a decode step's 64 rows, a micro-batch's 4096) or on its place; error within 2x of cuBLAS's bf16 GEMM."""
    torch.manual_seed(5)
    x = torch.randn(4096, 4096, device=CUDA).bfloat16()
    w = (torch.randn(12288, 4096, device=CUDA) / 64).bfloat16()
    full = batch_invariant.matmul_t(x, w)
    for rows in (slice(0, 64), slice(1000, 1001), slice(4032, 4096)):
        assert torch.equal(batch_invariant.matmul_t(x[rows], w), full[rows]), rows
    perm = torch.randperm(4096, device=CUDA)[:300]
    assert torch.equal(batch_invariant.matmul_t(x[perm], w), full[perm])
    rows = torch.randint(0, 4096, (64,), device=CUDA)
    expected = x[rows].double() @ w.double().T
    assert _err(full[rows], expected) <= 2 * _err(x[rows] @ w.T, expected) + 1e-3


def test_invariant_attention_on_cuda():
    """The batch-invariant attention kernel (kernels/invariant_attention.py) through batch_invariant.attend: a
    1000-token sequence's outputs are the same bits in a training call (left padded, in a batch of 4) and in decode
    steps (one query against a 1100-slot cache), and within 2x of the bf16 composite's error against float64."""
    torch.manual_seed(6)
    H, Dh, n = 16, 128, 1000
    seqs = [tuple(torch.randn(H, L, Dh, device=CUDA).bfloat16() for _ in range(3)) for L in (n, 300, 700, 999)]

    def batch(order, pads, S, first, last):
        B = len(order)
        k = torch.zeros(B, H, S, Dh, device=CUDA, dtype=torch.bfloat16)
        v, q = torch.zeros_like(k), torch.zeros(B, H, last - first, Dh, device=CUDA, dtype=torch.bfloat16)
        usable = torch.zeros(B, S, dtype=torch.bool, device=CUDA)
        k_pos = torch.zeros(B, S, dtype=torch.int64, device=CUDA)
        for b, (i, pad) in enumerate(zip(order, pads)):
            sq, sk, sv = seqs[i]
            L = sk.shape[1]
            k[b, :, pad:pad + L], v[b, :, pad:pad + L] = sk, sv
            part = sq[:, first:last]
            q[b, :, :part.shape[1]] = part
            k_pos[b, pad:pad + L] = torch.arange(L, device=CUDA)
            usable[b, pad:pad + min(L, last)] = True
        q_pos = torch.arange(first, last, device=CUDA).expand(B, -1).contiguous()
        return q, k, v, q_pos, k_pos, usable

    args = batch([1, 0, 2, 3], [700, 0, 300, 1], 1000, 0, n)
    train = batch_invariant.attend(*args, Dh**-0.5)[1]
    for t in (0, 31, 32, 500, n - 1):
        step = batch_invariant.attend(*batch([0, 3], [100, 0], 1100, t, t + 1), Dh**-0.5)[0]
        assert torch.equal(step[:, 0], train[:, t]), t
    q, k, v, q_pos, k_pos, usable = (a[1:2] for a in args)
    expected = batch_invariant._attend(q.double().cpu(), k.double().cpu(), v.double().cpu(), q_pos.cpu(),
                                       k_pos.cpu(), usable.cpu(), Dh**-0.5)
    mask = k_pos[0][None, :] <= q_pos[0][:, None]
    composite = torch.softmax(((q.float() @ k.float().transpose(-1, -2)) * Dh**-0.5).masked_fill(~mask, -torch.inf),
                              -1).bfloat16() @ v
    assert _err(train.cpu(), expected[0]) <= 2 * _err(composite[0].cpu(), expected[0]) + 1e-3
