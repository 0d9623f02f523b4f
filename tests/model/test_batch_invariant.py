"""Batch-invariant mode (``instructrl_fast.batch_invariant``, ``GPT.batch_invariant``): each row's log-probs are
the same bits whatever the batch size, the row's place in it, the padding and the tokens per forward, so that the
sampler's log-probs (``generate``, the rollout engine: KV-cached, one token per row) equal the training forward's.
Bitwise (rtol = atol = 0) in fp32 on CPU, at one intra-op thread (see the module's limits)."""

import pytest
import torch
import torch.nn.functional as F

from instructrl_fast import batch_invariant
from instructrl_fast.backend import use_backend
from instructrl_fast.model import GPT, GPTConfig
from instructrl_fast.ops import gather_logprobs
from instructrl_fast.rng import sample_keys
from instructrl_fast.rollout import generate
from instructrl_fast.rollout.engine import RolloutEngine, Sampling, inference_copy, rollout_with_experience

# 2 layers, sequences up to 70 tokens: several key blocks (KEY_BLOCK = 32) and several GEMM tiles (TILE_ROWS = 32)
CFG = GPTConfig.from_name("test-tiny")
LENGTHS = [5, 17, 70, 33, 2, 12, 64, 8]
BACKENDS = ["cpp", "torch", "triton"]  # of the log-prob kernels (triton under the interpreter)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 3) -> GPT:
    model = GPT(CFG)
    model.init_weights(seed)
    model.batch_invariant = True
    return model.eval()


def _sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in LENGTHS]


def _score(model: GPT, seqs, rows: list[int], left: bool, extra: int) -> dict[int, torch.Tensor]:
    """token_logprobs of seqs[rows] in one batch, left or right padded to the longest + extra columns."""
    L = max(len(seqs[i]) for i in rows) + extra
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    starts = {}
    for r, i in enumerate(rows):
        n = len(seqs[i])
        starts[i] = L - n if left else 0
        ids[r, starts[i]:starts[i] + n], mask[r, starts[i]:starts[i] + n] = seqs[i], 1
    with torch.no_grad():
        lp = model.token_logprobs(ids[:, :-1], ids[:, 1:], mask[:, :-1])
    return {i: lp[r, starts[i]:starts[i] + len(seqs[i]) - 1] for r, i in enumerate(rows)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_do_not_depend_on_batch_or_padding(backend):
    model, seqs = _model(), _sequences()
    with use_backend(backend):
        alone = {i: _score(model, seqs, [i], True, 0)[i] for i in range(len(seqs))}
        for rows, left, extra in [([0, 1, 2], True, 3), ([2, 0, 1], False, 0), (list(range(8)), False, 5),
                                  (list(range(8))[::-1], True, 0), ([3, 5, 7], False, 1)]:
            got = _score(model, seqs, rows, left, extra)
            for i in rows:
                assert torch.equal(got[i], alone[i]), (rows, left, extra, i)
    model.batch_invariant = False  # the default kernels: same values within fp32 rounding
    ref = _score(model, seqs, list(range(8)), False, 0)
    for i in range(8):
        torch.testing.assert_close(alone[i], ref[i], rtol=0, atol=1e-5)


def test_linear_rows_are_invariant_and_correct():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(70, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    full = batch_invariant.linear(x, w, b)
    torch.testing.assert_close(full, (x.double() @ w.double().T + b.double()).float(), rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(3, 4), slice(5, 40), slice(31, 70)):
        assert torch.equal(batch_invariant.linear(x[rows], w, b), full[rows])
    assert torch.equal(batch_invariant.linear(x.view(7, 10, 48), w, b), full.view(7, 10, 40))
    assert batch_invariant.linear(x[:0], w, b).shape == (0, 40)


def test_attention_matches_sdpa_and_is_causal():
    g = torch.Generator().manual_seed(2)
    B, H, T, Dh = 3, 2, 40, 8
    q, k, v = (torch.randn(B, H, T, Dh, generator=g) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :7] = False  # left padding
    mask[2, 30:] = False  # right padding
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = batch_invariant.attend(q, k, v, pos, pos, mask, Dh**-0.5)
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=Dh**-0.5,
                                         attn_mask=(causal & mask[:, None, :])[:, None] | torch.eye(T, dtype=bool))
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref.float()[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_logprobs_equal_training_logprobs(backend):
    model = _model(seed=4)
    g = torch.Generator().manual_seed(5)
    B, P, N = 5, 12, 40
    ids = torch.randint(1, CFG.vocab_size, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for b, pad in enumerate([0, 3, 11, 6, 1]):
        mask[b, :pad] = 0
    ids = ids * mask
    keys = sample_keys(0, 1, torch.arange(B))
    with use_backend(backend):
        out = generate(model, ids, mask, max_new_tokens=N, sample_keys=keys, eos_token_id=7, pad_token_id=0,
                       stop_check_every=4)
        # one prompt at a time: the same tokens and the same log-prob bits
        for b in range(B):
            one = generate(model, ids[b:b + 1], mask[b:b + 1], max_new_tokens=N, sample_keys=keys[b:b + 1],
                           eos_token_id=7, pad_token_id=0, stop_check_every=4)
            n = one.logprobs.shape[1]
            assert torch.equal(one.sequences[0], out.sequences[b, :P + n])
            assert torch.equal(one.logprobs[0], out.logprobs[b, :n])
        seq, attn, resp = out.sequences, out.attention_mask, out.response_mask[:, P:].bool()
        assert (~resp).any() and resp.sum() > B  # some rows ended early, some ran on
        for micro in (1, 2, B):  # training micro-batches of any size
            train = torch.cat([model.token_logprobs(s[:, :-1], s[:, 1:], a[:, :-1])
                               for s, a in zip(seq.split(micro), attn.split(micro))])[:, P - 1:]
            assert torch.equal(torch.where(resp, train, 0.0), out.logprobs), micro


def test_rollout_engine_logprobs_equal_training_logprobs():
    model = _model(seed=6)
    g = torch.Generator().manual_seed(7)
    B, W, N = 7, 10, 30
    ids = torch.randint(1, CFG.vocab_size, (B, W), generator=g)
    mask = torch.ones(B, W, dtype=torch.long)
    for b in range(B):
        mask[b, : b % 4] = 0
    ids = ids * mask
    engine = RolloutEngine(inference_copy(model), slots=3, prompt_len=W,
                           sampling=Sampling(max_new_tokens=N, eos_token_id=7, pad_token_id=0))
    assert engine.model.batch_invariant  # inference_copy keeps the mode
    out, _ = rollout_with_experience(engine, ids, mask, sample_keys(0, 2, torch.arange(B)))
    seq, attn, resp = out.sequences, out.attention_mask, out.response_mask[:, W:].bool()
    with torch.no_grad():
        train = model.token_logprobs(seq[:, :-1], seq[:, 1:], attn[:, :-1])[:, W - 1:]
    assert torch.equal(torch.where(resp, train, 0.0), torch.where(resp, out.logprobs, 0.0))


def test_logprobs_entropy_and_gradients_match_default_kernels():
    seqs = _sequences()
    ids = torch.stack([s[:12] for s in seqs if len(s) >= 12])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = {}
    for mode in (True, False):
        model = _model()
        model.batch_invariant = mode
        labels = ids[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # no label at a padding query
        logp, ent = model.token_logprobs(ids[:, :-1], labels, mask[:, :-1], with_entropy=True)
        (logp.sum() + 0.5 * ent.sum()).backward()
        out[mode] = logp.detach(), ent.detach(), [p.grad for p in model.parameters()]
    (lp, en, gr), (lp0, en0, gr0) = out[True], out[False]
    torch.testing.assert_close(lp, lp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(en, en0, rtol=0, atol=1e-5)
    for a, b in zip(gr, gr0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_row_local_kernels_are_batch_invariant():
    """LayerNorm, GELU and the log-prob kernel are used as they are in the mode: check, not assume, that a row's
    bits do not depend on the rows around it (shapes as the mode feeds them: widths that are multiples of 32)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 256, generator=g)
    ln = torch.nn.LayerNorm(256)
    labels = torch.randint(0, 256, (70,), generator=g)
    full_ln, full_gelu = ln(x), F.gelu(x, approximate="tanh")
    with torch.no_grad():
        for backend in BACKENDS:
            with use_backend(backend):
                full_lp = gather_logprobs(x, labels)
                for rows in (slice(0, 1), slice(5, 6), slice(3, 35), slice(40, 70)):
                    assert torch.equal(gather_logprobs(x[rows], labels[rows]), full_lp[rows]), (backend, rows)
        for rows in (slice(0, 1), slice(5, 6), slice(3, 35), slice(40, 70)):
            assert torch.equal(ln(x[rows]), full_ln[rows])
            assert torch.equal(F.gelu(x[rows], approximate="tanh"), full_gelu[rows])


def test_bf16_autocast_scores_and_generate_are_invariant():
    """--precision bf16 on CPU (autocast: the tile GEMMs and the attention's products in bf16, LayerNorm and the
    log-probs in fp32): the same bitwise properties."""
    model, seqs = _model(), _sequences()
    model.compute_dtype = torch.bfloat16
    alone = {i: _score(model, seqs, [i], True, 0)[i] for i in range(len(seqs))}
    got = _score(model, seqs, list(range(8)), False, 5)
    assert all(torch.equal(got[i], alone[i]) for i in range(8))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, CFG.vocab_size, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = generate(model, ids * mask, mask, max_new_tokens=30, sample_keys=sample_keys(0, 0, torch.arange(4)))
    with torch.no_grad():
        train = model.token_logprobs(out.sequences[:, :-1], out.sequences[:, 1:], out.attention_mask[:, :-1])
    assert torch.equal(train[:, 9:], out.logprobs)
    model.compute_dtype = None
    assert (_score(model, seqs, [2], True, 0)[2] - alone[2]).abs().max() > 1e-4  # bf16 really ran


def test_bf16_autocast_training_step_is_as_accurate_as_the_default():
    """The mode's backward under bf16 autocast (the tiled GEMM's and the attention's plain backward): its gradients
    are as close to the fp32 gradients as the default kernels' bf16 gradients are (within 2x, relative to the max)."""
    seqs = _sequences()
    ids = torch.stack([s[:12] for s in seqs if len(s) >= 12])
    grads = {}
    for name, mode, dtype in (("bi", True, torch.bfloat16), ("default", False, torch.bfloat16), ("fp32", False, None)):
        model = _model()
        model.train().compute_dtype = dtype
        model.batch_invariant = mode
        model.token_logprobs(ids[:, :-1], ids[:, 1:]).sum().backward()
        grads[name] = [p.grad for p in model.parameters()]
    for bi, default, ref in zip(grads["bi"], grads["default"], grads["fp32"]):
        assert bi.dtype == torch.float32
        scale = ref.abs().max()
        assert (bi - ref).abs().max() / scale <= 2 * (default - ref).abs().max() / scale + 1e-6


def test_activation_checkpointing_recomputes_in_the_mode():
    """The recompute of a checkpointed block runs the mode's kernels too (else torch.utils.checkpoint raises: the
    two modes save different tensors): the same values and gradients as without checkpointing."""
    seqs = _sequences()
    ids = torch.stack([s[:12] for s in seqs if len(s) >= 12])
    out = {}
    for ckpt in (True, False):
        model = _model()
        model.train().activation_checkpointing = ckpt
        logp = model.token_logprobs(ids[:, :-1], ids[:, 1:])
        logp.sum().backward()
        out[ckpt] = logp.detach(), [p.grad for p in model.parameters()]
    assert torch.equal(out[True][0], out[False][0])
    for a, b in zip(out[True][1], out[False][1]):
        assert torch.equal(a, b)
