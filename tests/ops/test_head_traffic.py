"""The LM head's schedule moves at most 1.5x the bytes of the chunked ideal (6 N V e + 4 (N D + V D) e: every chunk
of logits written and read a constant number of times, h, W, dh and dW touched once), counted from every ATen op
that ``linear_logprobs`` and ``ppo_actor_loss`` dispatch, forward and backward, on the CPU path (the C++ log-prob
kernels), custom ops' Python bodies opened (bench/traffic.py). Fake tensors: shapes only, so it takes seconds.

A schedule that re-reads W and read-modify-writes the fp32 dW per small token chunk moves 5.8x (linear_logprobs) and
4.8x (ppo_actor_loss) the ideal at this shape (N = 8192, D = 1024, V = 50304, fp32; 166-row chunks), and 11x and 21x
per 32-row tile in the batch-invariant mode (counted on the schedule this test replaced).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.traffic import count, ideal_head_bytes
from instructrl_fast.backend import use_backend
from instructrl_fast.ops import ppo_actor_loss
from instructrl_fast.ops.actor_loss import ActorLossConfig
from instructrl_fast.ops.logprob import linear_logprobs_in_mode

N, D, V, B = 8192, 1024, 50304, 8


def _head_traffic(op: str, invariant: bool, N: int = N):
    """What one forward + backward of ``op`` moves and computes (bench.traffic.Traffic), on fake fp32 CPU tensors."""
    with FakeTensorMode(), use_backend("cpp"):
        hidden = torch.randn(B, N // B, D, requires_grad=True)
        weight = torch.randn(V, D, requires_grad=True)
        labels = torch.randint(0, V, (B, N // B))
        zeros, mask = torch.zeros(B, N // B), torch.ones(B, N // B, dtype=torch.bool)

        def step():
            if op == "linear_logprobs":
                logp, entropy = linear_logprobs_in_mode(hidden, weight, labels, temperature=1.0, ignore_index=-100,
                                                        with_entropy=True, tp_group=None, invariant=invariant)
                (logp.sum() + 0.1 * entropy.sum()).backward()
            else:
                cfg = ActorLossConfig(kl_coef=0.05, entropy_coef=0.01, batch_invariant=invariant)
                loss, _ = ppo_actor_loss(hidden, weight, labels, zeros, zeros, mask, config=cfg, ref_logp=zeros)
                loss.backward()

        return count(step)


def _head_bytes(op: str, invariant: bool) -> tuple[int, int]:
    """(bytes counted, GEMM FLOPs) of one forward + backward of ``op``."""
    traffic = _head_traffic(op, invariant)
    return traffic.bytes, traffic.flops


@pytest.mark.parametrize("invariant", [False, True], ids=["normal", "batch-invariant"])
@pytest.mark.parametrize("op", ["linear_logprobs", "ppo_actor_loss"])
def test_head_moves_at_most_1_5x_the_chunked_ideal(op, invariant):
    moved, flops = _head_bytes(op, invariant)
    ideal = ideal_head_bytes(N, D, V, 4)
    assert moved <= 1.5 * ideal, f"{op}: {moved / 1e9:.2f} GB, {moved / ideal:.2f}x the ideal {ideal / 1e9:.2f} GB"
    # and no GEMM work is spent on it: linear_logprobs recomputes the logits (8 N D V), the fused loss does not (6)
    assert flops == (8 if op == "linear_logprobs" else 6) * N * D * V


def test_counting_sees_a_small_chunk_schedule(monkeypatch):
    """The count can fail: with the former chunk size (166 rows at this shape) W and dW traffic dominate."""
    from instructrl_fast.ops import logprob

    monkeypatch.setattr(logprob, "linear_chunk_rows", lambda N, D, V: 166)
    moved, _ = _head_bytes("ppo_actor_loss", False)
    assert moved > 3 * ideal_head_bytes(N, D, V, 4)


@pytest.mark.parametrize("invariant", [False, True], ids=["normal", "batch-invariant"])
def test_one_chunk_linear_logprobs_keeps_its_logits_for_the_backward(invariant):
    """N <= r (one forward chunk, one backward vocab tile of the same [N, V]): the forward's logits serve the
    backward, so forward + backward run 3 GEMMs (logits, dW, dh) and 6 N D V FLOPs, not 4 and 8."""
    from instructrl_fast.ops.logprob import linear_chunk_rows

    n = 1024
    assert linear_chunk_rows(n, D, V) >= n
    traffic = _head_traffic("linear_logprobs", invariant, N=n)
    assert (traffic.gemms, traffic.flops) == (3, 6 * n * D * V)
