"""GPT model: config checks, forward vs a float64 reference, padding, KV-cache decode, heads, init, the 175B preset
on the meta device."""

import os

import pytest
import torch

from instructrl_fast.backend import triton_interpreting, use_backend
from instructrl_fast.model import GPT, GPTConfig, use_attention_backend
from instructrl_fast.parallel.shards import tp_specs
from tests.model._reference import reference_hidden

NEEDS_INTERPRETER = pytest.mark.skipif(not triton_interpreting(), reason="CPU tensors reach the Triton kernel only "
                                       "under TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
# An odd vocabulary padded to a multiple of 8 (so the padded rows are exercised), 4 heads of 8.
CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=101, vocab_multiple=8, block_size=32)


def _batch(B=3, T=11, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    return idx * mask, mask


# -------------------------------------------------------------------------------------------------------------------
# config
# -------------------------------------------------------------------------------------------------------------------
def test_presets_shapes():
    c = GPTConfig.from_name("gpt3-1.3b")
    assert (c.n_layer, c.d_model, c.n_head, c.d_head, c.d_attn, c.d_ff) == (24, 2048, 24, 128, 3072, 8192)
    assert (c.vocab_size, c.padded_vocab_size, c.block_size) == (50257, 50304, 2048)
    c = GPTConfig.from_name("gpt3-6.7b")
    assert (c.n_layer, c.d_model, c.n_head, c.d_head) == (32, 4096, 32, 128)
    c = GPTConfig.from_name("gpt3-175b", dropout=0.2)
    assert (c.n_layer, c.d_model, c.n_head, c.dropout) == (96, 12288, 96, 0.2)
    assert GPTConfig.from_name("test-tiny").padded_vocab_size == 256


@pytest.mark.parametrize("kw, match", [
    ({"n_layer": 2, "n_head": 3, "d_model": 32}, "divisible by n_head"),
    ({"n_layer": 0, "n_head": 4, "d_model": 32}, "n_layer"),
    ({"n_layer": 2, "n_head": 4, "d_model": 32, "dropout": 1.0}, "dropout"),
    ({"n_layer": 2, "n_head": 4, "d_model": 32, "vocab_size": 2.5}, "vocab_size"),
    ({"n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": -1}, "d_ff"),
])
def test_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_config_unknown_preset_and_positional():
    with pytest.raises(ValueError, match="name must be one of"):
        GPTConfig.from_name("gpt4")
    with pytest.raises(TypeError):
        GPTConfig(2, 4, 32)  # kw_only


def test_gpt3_175b_on_meta_needs_no_memory():
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt3-175b"))
    grown = rss() - before
    n = model.num_params()
    assert abs(n - 174.6e9) / 174.6e9 < 0.005, n
    assert all(p.is_meta for p in model.parameters())
    assert grown < 512 * 2**20, f"building on meta grew RSS by {grown / 2**20:.0f} MiB"


def test_gpt3_175b_tp8_plan_on_meta_with_a_fake_process_group():
    """TP = 8 simulated in one process (a fake process group): each rank holds 1/8 of every sharded tensor."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = GPTConfig.from_name("gpt3-175b")
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    try:
        with torch.device("meta"):
            model = GPT(cfg, tp_group=dist.group.WORLD)
        sharded = tp_specs(model)
        local = model.num_params()
        replicated = sum(p.numel() for n, p in model.named_parameters() if n not in sharded)
        assert model.num_params(local=False) == (local - replicated) * 8 + replicated
        assert abs(model.num_params(local=False) - 174.6e9) / 174.6e9 < 0.005
        assert model.lm_weight.shape == (50304 // 8, 12288) and model.vocab_start == 3 * 50304 // 8
        assert model.blocks[0].attn.qkv.weight.shape == (3 * 12288 // 8, 12288)
        assert model.blocks[0].mlp.proj.weight.shape == (12288, 4 * 12288 // 8)
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------------------
# forward
# -------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_float64_reference(padded):
    model = GPT(CFG)
    idx, mask = _batch()
    mask = mask if padded else None
    out = model(idx, mask)
    ref = reference_hidden(model.state_dict(), CFG, idx, mask)
    keep = torch.ones(idx.shape, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(out.double()[keep], ref[keep], rtol=1e-5, atol=2e-5)


def test_left_padding_does_not_change_real_tokens():
    model = GPT(CFG)
    idx, mask = _batch()
    out = model(idx, mask)
    alone = model(idx[:1, 4:])  # row 0 without its 4 padding tokens
    torch.testing.assert_close(out[0, 4:], alone[0], rtol=1e-5, atol=1e-5)


def test_forward_double_precision_and_dropout_determinism():
    model = GPT(CFG.replace(dropout=0.5)).double()
    idx, mask = _batch()
    model.eval()
    ref = reference_hidden(model.state_dict(), CFG, idx, mask)
    torch.testing.assert_close(model(idx, mask)[mask.bool()], ref[mask.bool()], rtol=1e-10, atol=1e-10)
    model.train()  # dropout active: a different function, so the reference no longer matches
    assert (model(idx, mask) - ref).abs()[mask.bool()].max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_kv_cache_decode_equals_full_forward(attn):
    """Prefill 5 tokens, then decode one at a time: every step's hidden state equals the full forward's."""
    model = GPT(CFG).eval()
    idx, mask = _batch(T=12)
    full = model(idx, mask)
    B, T = idx.shape
    cache = model.setup_kv_cache(B, 16)
    P = 5
    forced_op = "triton" if attn == "triton" else None
    with torch.no_grad(), use_attention_backend(attn), use_backend(forced_op):
        h = model(idx[:, :P], mask[:, :P], cache, torch.arange(P))
        steps = [h]
        for t in range(P, T):
            steps.append(model(idx[:, t:t + 1], mask[:, :t + 1], cache, torch.tensor([t])))
    got = torch.cat(steps, dim=1)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], full.detach()[keep], rtol=1e-5, atol=1e-5)
    logits_full, logits_cached = model.logits(full), model.logits(got)
    torch.testing.assert_close(logits_cached[keep], logits_full.detach()[keep], rtol=1e-5, atol=1e-5)


def test_token_logprobs_match_reference_and_backprop():
    model = GPT(CFG)
    idx, mask = _batch()
    labels = idx[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logp, ent = model.token_logprobs(idx[:, :-1], labels, mask[:, :-1], temperature=0.8, with_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    h = reference_hidden(model.state_dict(), CFG, idx[:, :-1], mask[:, :-1])
    logits = h @ model.lm_weight.detach().double().T / 0.8
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = ref.masked_fill(labels == -100, 0.0)
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    valid = labels != -100
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double()[valid], ref_ent[valid], rtol=1e-5, atol=2e-5)
    (-logp.sum()).backward()
    assert model.lm_weight.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_scalar_head():
    model = GPT(CFG, head="scalar")
    idx, mask = _batch()
    h = model(idx, mask)
    s = model.score(h)
    assert s.shape == idx.shape and s.dtype == torch.float32
    torch.testing.assert_close(s, (h @ model.score_head.weight.T + model.score_head.bias)[..., 0])
    with pytest.raises(ValueError, match="'lm' head"):
        model.token_logprobs(idx, idx)
    with pytest.raises(ValueError, match="'scalar' head"):
        GPT(CFG).score(h)


# -------------------------------------------------------------------------------------------------------------------
# init, meta, errors
# -------------------------------------------------------------------------------------------------------------------
def test_init_is_deterministic_and_works_after_meta():
    a = GPT(CFG)
    with torch.device("meta"):
        b = GPT(CFG)
    b.to_empty(device="cpu")
    b.init_weights(0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    b.init_weights(1)
    assert not torch.equal(a.wte.weight, b.wte.weight)
    stds = {n: p.std().item() for n, p in a.named_parameters() if p.dim() == 2}
    assert abs(stds["wte.weight"] - 0.02) < 0.003
    assert stds["blocks.0.mlp.proj.weight"] < 0.6 * stds["blocks.0.mlp.fc.weight"]  # 1 / sqrt(2 n_layer) scaling
    assert torch.equal(a.blocks[0].ln_1.weight, torch.ones(32)) and not a.blocks[0].attn.qkv.bias.any()


def test_forward_rejects_bad_input():
    model = GPT(CFG)
    idx, mask = _batch()
    with pytest.raises(TypeError, match="idx"):
        model(idx.float())
    with pytest.raises(ValueError, match="attention_mask"):
        model(idx, mask[:, :-1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="input_pos"):
        model(idx, mask, model.setup_kv_cache(3, 16), torch.arange(2))
    with pytest.raises(ValueError, match="head must be one of"):
        GPT(CFG, head="value")


def test_attention_backend_choice():
    from instructrl_fast.backend import BackendError
    from instructrl_fast.model import choose_backend

    cpu = torch.device("cpu")
    assert choose_backend(cpu, torch.float32, decode=True) == "sdpa"  # CPU: always SDPA unless forced
    with use_attention_backend("triton"):
        if not triton_interpreting():
            pytest.skip("CPU tensors reach the Triton kernel only under TRITON_INTERPRET=1 (conftest, no GPU)")
        assert choose_backend(cpu, torch.float32, decode=True) == "triton"
        assert choose_backend(cpu, torch.float32, decode=False) == "sdpa"  # the kernel serves decode steps only
    with use_attention_backend("flash"), pytest.raises(BackendError, match="flash"):
        choose_backend(cpu, torch.float32, decode=False)
    with pytest.raises(ValueError, match="attention backend must be one of"), use_attention_backend("xformers"):
        pass


def test_init_distributed_without_torchrun_is_one_process(monkeypatch):
    from instructrl_fast.parallel import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = init_distributed(tp_size=1)
    assert (state.world_size, state.tp_size, state.dp_size, state.tp_group, state.is_main) == (1, 1, 1, None, True)
    assert init_distributed(tp_size=1, device="cpu").device == torch.device("cpu")  # the device is decided here
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        init_distributed(tp_size=1, device="meta")
    with pytest.raises(ValueError, match="tp_size"):
        init_distributed(tp_size=0)
    with pytest.raises(ValueError, match="divide the world size"):
        init_distributed(tp_size=2)
