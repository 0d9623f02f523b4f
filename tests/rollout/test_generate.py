"""generate(): greedy equals a step-by-step full-forward decode, rollout log-probs equal the training forward's,
EOS / masks, the triton decode backend, bad input."""

import pytest
import torch

from instructrl_fast.backend import triton_interpreting, use_backend
from instructrl_fast.model import GPT, GPTConfig, use_attention_backend
from instructrl_fast.rng import sample_keys
from instructrl_fast.rollout import generate
from instructrl_fast.rollout.sampling import sample

CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=101, vocab_multiple=8, block_size=40)
P, N = 7, 9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def _prompts():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, CFG.vocab_size, (3, P), generator=g)
    mask = torch.ones(3, P, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids * mask, mask


def _greedy_reference(model, ids, mask, n):
    """No cache: run the full forward on the growing sequence and take the argmax over the real vocabulary."""
    seq, m = ids, mask
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model.logits(model(seq, m))[:, -1, : CFG.vocab_size]
            tok = logits.double().argmax(-1)
            out.append(tok)
            seq = torch.cat([seq, tok[:, None]], 1)
            m = torch.cat([m, torch.ones_like(tok)[:, None]], 1)
    return torch.stack(out, 1)


def _training_logprobs(model, out, temperature):
    seq = out.sequences
    labels = seq[:, 1:].masked_fill(out.response_mask[:, 1:] == 0, -100)
    with torch.no_grad():
        logp = model.token_logprobs(seq[:, :-1], labels, out.attention_mask[:, :-1], temperature=temperature)
    return logp[:, P - 1:]  # column P + n of sequences is predicted at position P + n - 1


def test_greedy_matches_full_forward_decode(model):
    ids, mask = _prompts()
    out = generate(model, ids, mask, max_new_tokens=N, temperature=0.0)
    assert out.sequences.shape == (3, P + N) and torch.equal(out.sequences[:, :P], ids)
    assert torch.equal(out.sequences[:, P:], _greedy_reference(model, ids, mask, N))
    assert out.response_mask[:, P:].all() and not out.response_mask[:, :P].any()
    assert torch.equal(out.attention_mask[:, :P], mask)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 20, 0.9), (0.0, None, None)])
def test_rollout_logprobs_equal_training_logprobs(model, temperature, top_k, top_p):
    ids, mask = _prompts()
    out = generate(model, ids, mask, max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=5, generator=torch.Generator().manual_seed(4))
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (3, N)
    expect = _training_logprobs(model, out, temperature or 1.0)
    assert (out.logprobs - expect).abs().max() <= 1e-5
    assert out.logprobs[out.response_mask[:, P:] == 1].lt(0).all()
    aligned = out.response_logprobs_aligned
    assert aligned.shape == out.sequences.shape and torch.equal(aligned[:, P:], out.logprobs)


def test_eos_ends_rows_and_masks(model):
    ids, mask = _prompts()
    free = generate(model, ids, mask, max_new_tokens=N, temperature=0.0)
    eos = int(free.sequences[0, P + 2])  # row 0 emits it at step 2 (maybe earlier rows/steps too)
    out = generate(model, ids, mask, max_new_tokens=N, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    for b in range(3):
        gen = free.sequences[b, P:].tolist()
        end = gen.index(eos) + 1 if eos in gen else N  # tokens kept, EOS included
        assert out.sequences[b, P:P + end].tolist() == gen[:end]
        assert out.sequences[b, P + end:].eq(0).all()
        assert out.response_mask[b, P:].tolist() == [1] * end + [0] * (N - end)
        assert out.attention_mask[b, P:].tolist() == [1] * end + [0] * (N - end)
        assert out.logprobs[b, end:].eq(0).all() and out.logprobs[b, :end].lt(0).all()


def test_early_stop_keeps_shapes(model):
    ids, mask = _prompts()
    first = generate(model, ids, mask, max_new_tokens=1, temperature=0.0).sequences[:, P]
    ids_same = ids[:1].expand(3, P).clone()  # three equal rows: all end at the first step
    mask_same = mask[:1].expand(3, P).clone()
    out = generate(model, ids_same, mask_same, max_new_tokens=N, temperature=0.0, eos_token_id=int(first[0]),
                   stop_check_every=2)
    assert out.sequences.shape == (3, P + N) and out.logprobs.shape == (3, N)
    assert out.response_mask[:, P:].sum(1).tolist() == [1, 1, 1]


@pytest.mark.skipif(not triton_interpreting(), reason="CPU tensors reach the Triton kernel only under "
                    "TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
def test_triton_decode_backend_gives_the_same_rollout(model):
    ids, mask = _prompts()
    ref = generate(model, ids, mask, max_new_tokens=4, temperature=0.0)
    with use_attention_backend("triton"), use_backend("triton"):
        out = generate(model, ids, mask, max_new_tokens=4, temperature=0.0)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_dropout_is_off_during_generation_and_mode_restored():
    m = GPT(CFG.replace(dropout=0.5)).train()
    ids, mask = _prompts()
    a = generate(m, ids, mask, max_new_tokens=3, temperature=0.0)
    b = generate(m, ids, mask, max_new_tokens=3, temperature=0.0)
    assert torch.equal(a.sequences, b.sequences) and m.training


@pytest.mark.parametrize("kw, exc, match", [
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"max_new_tokens": 40}, ValueError, "block_size"),
    ({"max_new_tokens": 2, "temperature": -0.5}, ValueError, "temperature"),
    ({"max_new_tokens": 2, "eos_token_id": 101}, ValueError, "eos_token_id"),
    ({"max_new_tokens": 2, "stop_check_every": 0}, ValueError, "stop_check_every"),
])
def test_generate_rejects_bad_arguments(model, kw, exc, match):
    ids, mask = _prompts()
    with pytest.raises(exc, match=match):
        generate(model, ids, mask, **kw)


def test_generate_rejects_bad_tensors(model):
    ids, mask = _prompts()
    with pytest.raises(TypeError, match="prompt_ids"):
        generate(model, ids.float(), mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(TypeError, match="model"):
        generate(GPT(CFG, head="scalar"), ids, mask, max_new_tokens=2)


def test_keyed_sampling_belongs_to_the_row(model):
    """With sample_keys each row's draws are hashed from its key: the same row sampled alone, or after other rows,
    gets the same tokens (what makes PPO's rollouts independent of the dp split), and the draws follow softmax."""
    ids, mask = _prompts()
    keys = sample_keys(0, 1, torch.tensor([5, 6, 7]))
    both = generate(model, ids, mask, max_new_tokens=N, temperature=1.0, sample_keys=keys)
    alone = generate(model, ids[1:], mask[1:], max_new_tokens=N, temperature=1.0, sample_keys=keys[1:])
    assert torch.equal(both.sequences[1:], alone.sequences)
    torch.testing.assert_close(both.logprobs[1:], alone.logprobs)
    other = generate(model, ids, mask, max_new_tokens=N, temperature=1.0, sample_keys=keys + 1)
    assert not torch.equal(both.sequences, other.sequences)
    # the exponential race with hashed uniforms samples softmax: token frequencies over many keys at one step
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    drawn = sample(logits, temperature=1.0, vocab_size=4, keys=sample_keys(3, 0, torch.arange(20000)), step=0)
    freq = torch.bincount(drawn, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), atol=0.015, rtol=0)  # 5 sd at p=0.64
    with pytest.raises(ValueError, match="sample_keys"):
        generate(model, ids, mask, max_new_tokens=N, sample_keys=keys[:2])
