"""ppo_actor_loss on packed batches (cu_seqlens): the packed [1, N] batch against the same op on the padded [S, L]
rows of the same sequences (loss, every metric, d hidden, d weight) and against the float64 reference on the padded
rows, for every reduction, a fused type, gspo and sequence-level corrections; and the checks of the packed layout."""

import itertools

import pytest
import torch
import torch.distributed as dist

from instructrl_fast.backend import use_backend
from instructrl_fast.ops import ActorLossConfig, PolicyLossConfig, ppo_actor_loss
from tests._dist import leave_worker
from tests.conftest import DEVICE
from tests.ops._sync import NoHostSync, as_on_device
from tests.ops.test_actor_loss import (
    BACKENDS,
    CORRECTIONS,
    GRAD_TOL,
    IGNORE,
    WORLD,
    _assert_matches,
    _inputs,
    _ours,
    _policy_setup,
    _reference,
    _spawn_tp,
    assert_shard_matches,
)
from tests.reference import policy_actor_loss_ref, unpad_rows

# a fully masked sequence (the second, as _inputs masks row 1), an empty one, a single token, the longest one
LENGTHS = [5, 6, 0, 1, 9, 4]
L = max(LENGTHS)
NON_TRITON = [b for b in BACKENDS if b.values[0] != "triton"]
TRITON = [b for b in BACKENDS if b.values[0] == "triton"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _cu(lengths=LENGTHS, dtype=torch.int64):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=DEVICE)


def _cut(mask, lengths=LENGTHS):
    """The padded mask [S, L] with every position past its sequence's length masked."""
    return mask & (torch.arange(mask.shape[1], device=mask.device) < torch.tensor(lengths, device=mask.device)[:, None])


def _pack(x, cu):
    """[S, L, ...] rows -> the packed [1, N, ...] batch."""
    return None if x is None else unpad_rows(x, cu)[None]


def _assert_packed_equals_padded(packed, padded, cu):
    """(loss, stats, d hidden, d weight) of the packed call against the padded call's, d hidden packed back."""
    loss, stats, gh, gw = padded
    _assert_matches(packed, (loss.double(), {k: v.double() for k, v in stats.items()}, _pack(gh, cu).double(),
                             gw.double()))


# ---------------------------------------------------------------------------------------------------------------
# The PPO surrogate (no policy type): every reduction, the estimated and the full KL.
# ---------------------------------------------------------------------------------------------------------------

PPO_CASES = [
    pytest.param({"reduction": r, "kl_coef": 0.1, "entropy_coef": 0.05, "dual_clip": 2.0}, "logp", id=r)
    for r in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
] + [pytest.param({"reduction": "seq_mean_token_mean", "kl_coef": 0.2, "kl_estimator": "full"}, "full",
                  id="full-kl")]


def _ppo_case(backend, fields, ref_kind, temperature=1.0):
    hidden, weight, labels, old_logp, adv, mask, ref_logp, ref_hidden, ref_weight = _inputs(
        len(LENGTHS), L, 16, 257, temperature=temperature, noncontiguous=False)
    mask, cu = _cut(mask), _cu()
    ref_kw = {"ref_logp": ref_logp} if ref_kind == "logp" else {"ref_hidden": ref_hidden, "ref_weight": ref_weight}
    rest = (labels, old_logp, adv, mask)
    cfg = ActorLossConfig(**fields)
    padded = _ours(backend, hidden, weight, rest, cfg, temperature, ref_kw)
    packed_kw = {k: _pack(v, cu) if k != "ref_weight" else v for k, v in ref_kw.items()}
    packed = _ours(backend, _pack(hidden, cu), weight, tuple(_pack(x, cu) for x in rest), cfg, temperature,
                   {**packed_kw, "cu_seqlens": cu})
    _assert_packed_equals_padded(packed, padded, cu)
    ref_loss, ref_stats, ref_gh, ref_gw = _reference(hidden, weight, rest, fields, temperature, ref_kw)
    _assert_matches(packed, (ref_loss, ref_stats, _pack(ref_gh, cu), ref_gw))
    assert packed[2].shape == (1, int(cu[-1]), 16) and packed[2].abs().sum() > 0


@pytest.mark.parametrize("backend", NON_TRITON)
@pytest.mark.parametrize("fields,ref_kind", PPO_CASES)
def test_ppo_packed_equals_padded(backend, fields, ref_kind):
    _ppo_case(backend, fields, ref_kind, temperature=0.8)


@pytest.mark.parametrize("backend", TRITON)
def test_ppo_packed_equals_padded_triton(backend):
    _ppo_case(backend, {"reduction": "seq_mean_token_mean", "kl_coef": 0.1, "entropy_coef": 0.05}, "logp")


# ---------------------------------------------------------------------------------------------------------------
# Policy types and rollout correction: fused (vanilla, dppo_kl), two-pass (gspo, geo_mean, bypass), sequence levels.
# ---------------------------------------------------------------------------------------------------------------

POLICY_REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
POLICY_CASES = [("vanilla", "none"), ("vanilla", "seq"), ("dppo_kl", "tis"), ("gspo", "none"), ("gspo", "seq"),
                ("geo_mean", "bypass"), ("vanilla", "bypass_seq")]
# bypass mode with sequence-level weights and rejection: its surviving mask, per sequence, comes after the first walk
BYPASS_SEQ = {"is_level": "sequence", "is_threshold": 2.0, "rs": ("seq_mean_k3",), "rs_thresholds": ((None, 0.08),),
              "reference": "current"}


def _policy_case(backend, loss_type, reduction, corr_name):
    # seed 3: each correction rejects some tokens of these sequences, not all
    hidden, weight, rest, cfg, kwargs, ref_kw = _policy_setup(loss_type, reduction, corr_name,
                                                              shape=(len(LENGTHS), L, 16, 257), seed=3)
    labels, old_logp, adv, mask = rest
    rest, cu = (labels, old_logp, adv, _cut(mask)), _cu()
    torch.manual_seed(0)
    padded = _ours(backend, hidden, weight, rest, cfg, 1.0, kwargs)
    packed = _ours(backend, _pack(hidden, cu), weight, tuple(_pack(x, cu) for x in rest), cfg, 1.0,
                   {**{k: _pack(v, cu) for k, v in kwargs.items()}, "cu_seqlens": cu})
    _assert_packed_equals_padded(packed, padded, cu)
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = policy_actor_loss_ref(h, w, *rest, ignore_index=IGNORE, **ref_kw)
    ref.backward(torch.tensor(1.7, dtype=torch.float64, device=ref.device))  # test_actor_loss's UPSTREAM
    torch.testing.assert_close(packed[0].double(), ref.detach(), **TOL)
    torch.testing.assert_close(packed[2].double(), _pack(h.grad, cu), **GRAD_TOL)
    torch.testing.assert_close(packed[3].double(), w.grad, **GRAD_TOL)
    assert packed[2].abs().sum() > 0
    return packed


@pytest.mark.parametrize("backend", NON_TRITON)
@pytest.mark.parametrize("reduction", POLICY_REDUCTIONS)
@pytest.mark.parametrize("loss_type,corr_name", POLICY_CASES)
def test_policy_packed_equals_padded(backend, loss_type, corr_name, reduction, monkeypatch):
    monkeypatch.setitem(CORRECTIONS, "bypass_seq", BYPASS_SEQ)
    _, stats, _, _ = _policy_case(backend, loss_type, reduction, corr_name)
    if corr_name != "none":
        assert 0 < float(stats["rollout_rs_masked_fraction"]) < 1  # the rejection drops some tokens, not all


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("loss_type,corr_name", [("vanilla", "seq"), ("gspo", "none")])
def test_policy_packed_equals_padded_triton(backend, loss_type, corr_name):
    _policy_case(backend, loss_type, "seq_mean_token_mean", corr_name)


def _tp_packed_worker(rank: int, init_file: str, backends: list[str]) -> None:
    """A packed batch under a 2-way vocab split: a fused type with a token correction, the two-pass gspo with a
    sequence correction, and the PPO surrogate, each equal to the unsharded packed call on every rank."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        V = 131  # per rank
        shard, cu = slice(rank * V, (rank + 1) * V), _cu()
        for name in backends:
            for loss_type, corr_name in (("dppo_kl", "tis"), ("gspo", "seq"), (None, "none")):
                hidden, weight, rest, cfg, kwargs, _ = _policy_setup(loss_type or "vanilla", "seq_mean_token_mean",
                                                                     corr_name, shape=(len(LENGTHS), L, 8, WORLD * V))
                if loss_type is None:  # the plain PPO surrogate (no policy type)
                    cfg = ActorLossConfig(reduction="seq_mean_token_mean", kl_coef=0.1, entropy_coef=0.05)
                rest = tuple(_pack(x, cu) for x in (*rest[:3], _cut(rest[3])))
                packed_kw = {**{k: _pack(v, cu) for k, v in kwargs.items()}, "cu_seqlens": cu}
                ref = _ours(name, _pack(hidden, cu), weight, rest, cfg, 0.9, packed_kw)
                sharded = _ours(name, _pack(hidden, cu), weight[shard], rest, cfg, 0.9, packed_kw,
                                tp_group=dist.group.WORLD)
                assert_shard_matches(sharded, ref, shard, f"rank {rank}, backend {name}, {loss_type}, {corr_name}")
                assert sharded[2].abs().sum() > 0 and sharded[3].abs().sum() > 0
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.dist
def test_vocab_parallel_packed_equals_unsharded():
    _spawn_tp(_tp_packed_worker)


# ---------------------------------------------------------------------------------------------------------------
# Layouts, checks, host syncs.
# ---------------------------------------------------------------------------------------------------------------


def _packed_inputs(loss_type="gspo", corr_name="seq", reduction="seq_mean_token_mean"):
    hidden, weight, rest, cfg, kwargs, _ = _policy_setup(loss_type, reduction, corr_name,
                                                         shape=(len(LENGTHS), L, 16, 257))
    cu = _cu()
    rest = tuple(_pack(x, cu) for x in (*rest[:3], _cut(rest[3])))
    return _pack(hidden, cu), weight, rest, cfg, {k: _pack(v, cu) for k, v in kwargs.items()}, cu


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["cu32", "cu64"])
def test_flat_layout_and_int32_offsets_give_the_same_result(cu_dtype):
    """[N, D] / [N] inputs and int32 offsets give bit for bit the [1, N, D] / [1, N] int64 result."""
    hidden, weight, rest, cfg, kwargs, cu = _packed_inputs()
    ref = _ours("torch", hidden, weight, rest, cfg, 1.0, {**kwargs, "cu_seqlens": cu})
    flat = _ours("torch", hidden[0], weight, tuple(x[0] for x in rest), cfg, 1.0,
                 {**{k: v[0] for k, v in kwargs.items()}, "cu_seqlens": cu.to(cu_dtype)})
    assert flat[2].shape == hidden.shape[1:]
    for a, b in zip((flat[0], *flat[1].values(), flat[2], flat[3]), (ref[0], *ref[1].values(), ref[2][0], ref[3])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_packed_inputs_raise():
    """Offsets that do not fit the tokens, a batch that is not one row, a missing norm_length: errors naming them."""
    hidden, weight, rest, cfg, kwargs, cu = _packed_inputs()
    N = hidden.shape[1]

    def call(h=hidden, r=rest, c=cu, config=cfg):
        return ppo_actor_loss(h, weight, *r, config=config, ignore_index=IGNORE, cu_seqlens=c, **kwargs)

    for bad, what in [([1, 5, N], "start at 0"), ([0, 5, N - 1], "end at"), ([0, 7, 5, N], "non-decreasing")]:
        with pytest.raises(ValueError, match=f"cu_seqlens must .*{what}"):
            call(c=torch.tensor(bad, device=DEVICE))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        call(c=cu.float())
    with pytest.raises(ValueError, match="cu_seqlens must have 1 dimensions"):
        call(c=cu[None])
    with pytest.raises(ValueError, match=r"hidden must be packed as \[1, total_tokens, D\]"):
        call(h=hidden.reshape(2, N // 2, -1) if N % 2 == 0 else hidden.expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"old_logp must be packed as \[1, total_tokens\]"):
        call(r=(rest[0], rest[1].expand(2, -1), *rest[2:]))
    with pytest.raises(ValueError, match="mask"):
        call(r=(*rest[:3], rest[3][:, :-1]))
    norm_cfg = ActorLossConfig(policy=PolicyLossConfig(loss_type="gspo", reduction="seq_mean_token_sum_norm"),
                               correction=cfg.correction, kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef)
    with pytest.raises(ValueError, match="norm_length is required"):
        call(config=norm_cfg)


@pytest.mark.parametrize("loss_type,corr_name", [("dppo_kl", "seq"), ("gspo", "bypass")])
def test_packed_no_host_sync(loss_type, corr_name, monkeypatch):
    """Per-sequence weights, the sequence-level correction and the two-pass walk on a packed batch: no op reads
    device data back (the offsets' data check then runs on the device), forward or backward."""
    from instructrl_fast.ops import logprob, packing

    as_on_device(monkeypatch)
    for module in (logprob, packing):
        monkeypatch.setattr(module, "eager_data_checks", lambda x: False)
    hidden, weight, rest, cfg, kwargs, cu = _packed_inputs(loss_type, corr_name)
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with NoHostSync(), use_backend("torch"):
        loss, _ = ppo_actor_loss(h, w, *rest, config=cfg, ignore_index=IGNORE, cu_seqlens=cu, **kwargs)
        loss.backward()
    assert h.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", NON_TRITON)
def test_packed_with_head_options_equals_padded(backend):
    """The LM-head options (bias, softcap, logit_scale) on a packed batch: loss, metrics and the gradients w.r.t.
    hidden, weight and bias equal the padded call's."""
    hidden, weight, rest, cfg, kwargs, _ = _policy_setup("gspo", "seq_mean_token_mean", "seq",
                                                         shape=(len(LENGTHS), L, 16, 257), seed=3)
    rest, cu = (*rest[:3], _cut(rest[3])), _cu()
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(h, r, kw):
        h, w, b = (x.detach().clone().requires_grad_() for x in (h, weight, bias))
        with use_backend(backend):
            loss, stats = ppo_actor_loss(h, w, *r, config=cfg, ignore_index=IGNORE, bias=b, softcap=3.0,
                                         logit_scale=0.8, **kw)
        loss.backward()
        return loss.detach(), stats, h.grad, w.grad, b.grad

    padded = run(hidden, rest, kwargs)
    packed = run(_pack(hidden, cu), tuple(_pack(x, cu) for x in rest),
                 {**{k: _pack(v, cu) for k, v in kwargs.items()}, "cu_seqlens": cu})
    torch.testing.assert_close(packed[0], padded[0], **TOL)
    assert packed[1].keys() == padded[1].keys()
    for name in padded[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], **TOL, msg=name)
    torch.testing.assert_close(packed[2], _pack(padded[2], cu), **GRAD_TOL)
    for ours, theirs in zip(packed[3:], padded[3:]):
        torch.testing.assert_close(ours, theirs, **GRAD_TOL)
    assert packed[4].abs().sum() > 0
