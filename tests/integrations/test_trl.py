"""TRL drop-ins against the installed TRL (1.16) itself where it can be imported, else against re-implementations of
TRL's formulas written from its source (1.9's PPO masked_whiten, 1.16's inline GRPO / RLOO losses); and real tiny
GRPOTrainer / RLOOTrainer runs with and without patch_trl()."""

import math
import tempfile
from types import SimpleNamespace

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
trl_kernels = pytest.importorskip("trl.kernels")

from instructrl_fast import ops
from instructrl_fast.integrations import patch_trl, unpatch
from instructrl_fast.integrations import trl as fast
from tests.conftest import DEVICE

# TRL's own functions, held before any patch in an object that a patch's scan does not look into (it replaces
# module globals, plain module-level dicts and class attributes that are the originals)
TRL = SimpleNamespace(selective=trl_utils.selective_log_softmax, entropy=trl_utils.entropy_from_logits,
                      both=trl_utils.selective_log_softmax_and_entropy, chunked=trl_kernels.ChunkedLogProbFunction)


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    unpatch()


def _logits(shape, dtype=torch.float32, scale=4.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _error(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("multi", [False, True], ids=["index[...]", "index[...,K]"])
def test_selective_log_softmax_matches_trl(dtype, index_dtype, multi):
    logits = _logits((3, 6, 41), dtype)
    index = torch.randint(0, 41, (3, 6, 4) if multi else (3, 6), device=DEVICE)
    x = logits.clone().requires_grad_()
    ours = fast.selective_log_softmax(x, index.to(index_dtype))
    grad = torch.randn_like(ours)
    ours.backward(grad)
    y = logits.clone().requires_grad_()
    theirs = TRL.selective(y, index)
    theirs.backward(grad)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(x.grad, y.grad, **tol)


def test_selective_log_softmax_116_arguments():
    logits, index = _logits((4, 7, 33)), torch.randint(0, 33, (4, 7), device=DEVICE)
    row_mask = torch.rand(4, 7, device=DEVICE) > 0.3
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = fast.selective_log_softmax(x, index, 0.7, row_mask)
    theirs = TRL.selective(y, index, temperature=0.7, row_mask=row_mask)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert (ours[~row_mask] == 0).all() and (x.grad[~row_mask] == 0).all()
    with pytest.raises(ValueError, match="row_mask"):
        fast.selective_log_softmax(logits, index, row_mask=row_mask[:, :3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_rounded_once(dtype):
    """TRL computes half-precision log-softmax in the half dtype; ours in fp32, rounded once to the same dtype:
    error against float64 at most TRL's (plus one rounding)."""
    logits, index = _logits((4, 8, 50), dtype), torch.randint(0, 50, (4, 8), device=DEVICE)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, index[..., None])[..., 0]
    ours, theirs = fast.selective_log_softmax(logits, index), TRL.selective(logits, index)
    assert ours.dtype == theirs.dtype == dtype
    assert _error(ours, exact) <= 2 * _error(theirs, exact) + 1e-2
    entropy = fast.entropy_from_logits(logits)
    p = torch.softmax(logits.double(), -1)
    assert entropy.dtype == dtype
    assert _error(entropy, -(p * p.log()).sum(-1)) <= 2 * _error(TRL.entropy(logits), -(p * p.log()).sum(-1)) + 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_from_logits_matches_trl(dtype):
    logits = _logits((2, 5, 3, 29), dtype)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, theirs = fast.entropy_from_logits(x, chunk_size=4), TRL.entropy(y, chunk_size=4)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    assert ours.dtype == dtype and ours.shape == (2, 5, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        fast.entropy_from_logits(logits, chunk_size=0)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(entropy_requires_grad):
    logits, index = _logits((3, 9, 45)), torch.randint(0, 45, (3, 9), device=DEVICE)
    row_mask = torch.ones(3, 9, dtype=torch.long, device=DEVICE)
    row_mask[1, 4:] = 0
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = fast.selective_log_softmax_and_entropy(x, index, entropy_requires_grad, 1.3, row_mask)
    theirs = TRL.both(y, index, entropy_requires_grad=entropy_requires_grad, temperature=1.3, row_mask=row_mask)
    g1, g2 = torch.randn(3, 9, device=DEVICE), torch.randn(3, 9, device=DEVICE)
    for out in (ours, theirs):
        loss = (out[0] * g1).sum() + ((out[1] * g2).sum() if entropy_requires_grad else 0)
        loss.backward()
        assert out[1].requires_grad == entropy_requires_grad
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o.detach(), t.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)  # two fp32 computations of an entropy gradient


def trl19_masked_whiten(values, mask, shift_mean=True):
    """TRL 1.9, trl/experimental/ppo/ppo_trainer.py: masked_mean / masked_var (unbiased) / masked_whiten."""
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = ((values - mean) ** 2 * mask).sum() / n * (n / (n - 1))
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5)])
def test_masked_whiten_every_position(shift_mean, shape):
    values = torch.randn(*shape, device=DEVICE) * 3 + 5
    mask = torch.rand(*shape, device=DEVICE) > 0.4
    ours = fast.masked_whiten(values, mask, shift_mean)
    assert ours.dtype == values.dtype and ours.shape == values.shape
    torch.testing.assert_close(ours.double(), trl19_masked_whiten(values.double(), mask.double(), shift_mean),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        fast.masked_whiten(values, torch.zeros_like(mask))


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_chunked_logprob_function_matches_trl(temperature, outputs):
    hidden = torch.randn(2, 11, 32, device=DEVICE)[:, :-1].reshape(-1, 32)  # as TRL passes it: shifted, flattened
    weight = torch.randn(27, 32, device=DEVICE) * 0.3
    targets = torch.randint(0, 27, (20,), device=DEVICE)
    grads, results = [torch.randn(20, device=DEVICE), torch.randn(20, device=DEVICE)], []
    for F in (fast.ChunkedLogProbFunction, TRL.chunked):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = F.apply(h, w, None, targets, temperature, 32768, None, 1.0, outputs)
        assert len(out) == 5 and all(x is None for x in out[2:]) and (out[1] is None) == ("entropy" not in outputs)
        loss = (out[0] * grads[0]).sum() + ((out[1] * grads[1]).sum() if out[1] is not None else 0)
        loss.backward()
        results.append((out[0].detach(), h.grad, w.grad) + ((out[1].detach(),) if out[1] is not None else ()))
    for o, t in zip(*results, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="is_top1"):
        fast.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("is_top1",))


@pytest.mark.parametrize("softcap,logit_scale", [(None, 0.5), (4.0, 1.0), (4.0, 1.7)])
def test_chunked_logprob_function_head_options_match_trl(softcap, logit_scale):
    """An LM-head bias, Gemma-2's final soft-capping and a logit scale (Cohere's; Granite's 1 / logits_scaling), as
    TRL's add_fused_lm_head passes them: outputs and the gradients of hidden, weight and bias equal TRL's own."""
    hidden = torch.randn(20, 32, device=DEVICE)
    weight = torch.randn(27, 32, device=DEVICE)
    bias = torch.randn(27, device=DEVICE) * 2
    targets = torch.randint(0, 27, (20,), device=DEVICE)
    grads, results = [torch.randn(20, device=DEVICE), torch.randn(20, device=DEVICE)], []
    for F in (fast.ChunkedLogProbFunction, TRL.chunked):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        out = F.apply(h, w, b, targets, 0.9, 32768, softcap, logit_scale, ("entropy",))
        ((out[0] * grads[0]).sum() + (out[1] * grads[1]).sum()).backward()
        results.append((out[0].detach(), out[1].detach(), h.grad, w.grad, b.grad))
    for o, t in zip(*results, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)
    plain = fast.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.9, 32768, None, 1.0, ())[0]
    assert (plain - results[0][0]).abs().max() > 1e-2  # the options are exercised


def trl116_grpo_loss(logps, old, adv, mask, loss_type, eps_low, eps_high, delta, beta, ref, normalizer):
    """TRL 1.16, GRPOTrainer._compute_loss for importance_sampling_level="token" (no vLLM correction, no entropy or
    off-policy mask, one process): the loss and the clip / KL metrics."""
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    metrics = {}
    if beta != 0.0:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * normalizer)
    else:
        loss = (per_token * mask).sum() / torch.as_tensor(normalizer).clamp(min=1.0)
    low = ((coef_1 < 1 - eps_low) & (adv < 0)).float()
    high = ((coef_1 > 1 + eps_high) & (adv > 0)).float()
    region = (low.bool() | high.bool()).float()
    for name, x in (("low_mean", low), ("high_mean", high), ("region_mean", region)):
        metrics[f"clip_ratio/{name}"] = (x * mask).sum() / mask.sum().clamp(min=1.0)
    rows = mask.sum(-1)
    metrics["clip_ratio/low_min"] = torch.from_numpy(((low * mask).sum(-1) / rows).numpy()).nan_to_num(math.inf).min()
    metrics["clip_ratio/high_max"] = ((high * mask).sum(-1) / rows).nan_to_num(-math.inf).max()
    return loss, metrics


@pytest.mark.parametrize("loss_type", list(fast.GRPO_LOSS_TYPES))
@pytest.mark.parametrize("delta, beta", [(None, 0.0), (1.5, 0.04)])
def test_grpo_loss_matches_trl_formula(loss_type, delta, beta):
    B, T = 6, 7
    mask = (torch.rand(B, T, device=DEVICE) > 0.2).float()
    mask[2] = 0  # a row without tokens: skipped by TRL's low_min / high_max
    logps = -torch.rand(B, T, device=DEVICE) * 2
    old = logps + 0.5 * torch.randn(B, T, device=DEVICE)
    ref = logps + 0.3 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)
    normalizer = {"dr_grpo": 9, "dapo": torch.tensor(31.0)}.get(loss_type)
    x = logps.clone().requires_grad_()
    loss, metrics = fast.grpo_loss(x, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                                   delta=delta, beta=beta, ref_per_token_logps=ref, normalizer=normalizer)
    loss.backward()
    x64 = logps.double().requires_grad_()
    ref_loss, ref_metrics = trl116_grpo_loss(x64, old.double(), adv.double(), mask.double(), loss_type, 0.2, 0.28,
                                             delta, beta, ref.double(), normalizer)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach().double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in metrics.items():
        torch.testing.assert_close(value.double(), ref_metrics[key].double(), rtol=1e-5, atol=1e-6, msg=key)
    assert ref_metrics["clip_ratio/region_mean"] > 0


def test_grpo_loss_refuses_what_is_not_a_dual_clip():
    z = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(NotImplementedError, match="delta"):
        fast.grpo_loss(z, z, z[:, 0], z, loss_type="grpo", epsilon_high=0.28, delta=1.1)
    with pytest.raises(ValueError, match="loss_type"):
        fast.grpo_loss(z, z, z[:, 0], z, loss_type="cispo")
    with pytest.raises(ValueError, match="normalizer"):
        fast.grpo_loss(z, z, z[:, 0], z, loss_type="dapo")


def test_rloo_loss_matches_trl_formula():
    B, T = 8, 6
    mask = (torch.rand(B, T, device=DEVICE) > 0.2).float()
    logps = -torch.rand(B, T, device=DEVICE)
    old = (logps * mask).sum(1) + 0.4 * torch.randn(B, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)
    x = logps.clone().requires_grad_()
    loss, metrics = fast.rloo_loss(x, old, adv, mask, epsilon_low=0.2, epsilon_high=0.3)
    loss.backward()
    # TRL 1.16, RLOOTrainer._compute_loss: a sequence-level ratio, the clipped loss averaged over sequences
    x64 = logps.double().requires_grad_()
    coef_1 = torch.exp((x64 * mask).sum(1) - old.double())
    ref_loss = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.3) * adv).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss.detach().double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    low, high = ((coef_1 < 0.8) & (adv < 0)).double(), ((coef_1 > 1.3) & (adv > 0)).double()
    expected = {"clip_ratio/low_mean": low.mean(), "clip_ratio/high_mean": high.mean(),
                "clip_ratio/region_mean": torch.maximum(low, high).mean(), "clip_ratio/low_min": low.min(),
                "clip_ratio/high_max": high.max()}
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key].double(), value.detach(), msg=key)


def _tiny_run(tmp: str, algorithm: str) -> list[dict]:
    """A real TRL GRPOTrainer / RLOOTrainer: a 2-layer Llama (hidden 64), a character tokenizer built here, an
    in-memory dataset, CPU fp32, 3 steps with 2 iterations per generation (ratios != 1) and a KL term (so a
    reference model too)."""
    from datasets import Dataset
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(f"{tmp}/model")  # a path: TRL builds the reference model from it

    def reward(completions, **_):
        return [c.count("a") - 0.1 * len(c) for c in completions]

    # bf16=False: TRL's own fused head forms bf16 logits under a bf16 autocast (ours stays fp32); compare in fp32
    common = {"output_dir": f"{tmp}/out", "per_device_train_batch_size": 4, "num_generations": 4,
              "max_completion_length": 8, "max_steps": 3, "learning_rate": 5e-3, "logging_steps": 1,
              "report_to": "none", "use_cpu": True, "bf16": False, "num_iterations": 2, "beta": 0.04,
              "save_strategy": "no", "seed": 0, "disable_tqdm": True}
    if algorithm == "grpo":
        trainer_cls, args = GRPOTrainer, GRPOConfig(**common, epsilon=0.1, loss_type="dapo")
    else:
        trainer_cls, args = RLOOTrainer, RLOOConfig(**common)
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "the cat", "zz top"] * 2})
    trainer = trainer_cls(model=f"{tmp}/model", reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    return trainer.state.log_history


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trainer_with_patch_trl_logs_the_same_metrics(monkeypatch, algorithm):
    pytest.importorskip("datasets")
    with tempfile.TemporaryDirectory() as tmp:
        plain = _tiny_run(tmp, algorithm)
    calls = []
    linear_logprobs = ops.linear_logprobs
    monkeypatch.setattr(ops, "linear_logprobs", lambda *a, **k: calls.append(1) or linear_logprobs(*a, **k))
    replaced = patch_trl()
    assert replaced["trl.trainer.utils._ChunkedLogProbFunction"] is TRL.chunked
    assert replaced["trl.trainer.utils.selective_log_softmax"] is TRL.selective
    with tempfile.TemporaryDirectory() as tmp:
        patched = _tiny_run(tmp, algorithm)
    assert calls  # the patched run scored its completions with ops.linear_logprobs
    timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    compared = 0
    assert len(plain) == len(patched) == 4
    for a, b in zip(plain, patched, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(timing):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
            compared += 1
    assert compared > 40 and any(a.get("clip_ratio/region_mean", 0) > 0 for a in plain)


def test_patch_trl_replaces_every_copy_and_unpatch_restores():
    import trl.trainer.grpo_trainer  # noqa: F401  (a trainer module that imported the utils)

    replaced = patch_trl()
    assert trl_utils.selective_log_softmax is fast.selective_log_softmax
    assert trl_kernels.ChunkedLogProbFunction is fast.ChunkedLogProbFunction
    assert trl_utils._ChunkedLogProbFunction is fast.ChunkedLogProbFunction
    assert patch_trl() == {}  # a second call finds nothing left to replace
    with pytest.raises(TypeError):
        replaced["x"] = None  # read-only
    unpatch()
    assert trl_utils.selective_log_softmax is TRL.selective and trl_utils._ChunkedLogProbFunction is TRL.chunked
    assert trl_kernels.ChunkedLogProbFunction is TRL.chunked
