"""A naive float64 GPT forward written from the architecture's formulas (loops over layers and heads, an explicit
mask), the ground truth for the model tests. It reads the weights of a TP = 1 ``GPT`` state dict."""

from __future__ import annotations

import math

import torch


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_hidden(state: dict, config, idx: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """[B, T] ids -> [B, T, D] float64 final hidden states. Real token j is visible to query i iff j <= i; positions
    count the real tokens of the row; a padding query sees only itself."""
    sd = {k: v.double() for k, v in state.items()}
    B, T = idx.shape
    H, Dh = config.n_head, config.d_head
    m = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        count = 0
        for t in range(T):
            pos[b, t] = count if m[b, t] else max(count - 1, 0)  # padding repeats the last position (or 0)
            count += int(m[b, t])
    x = sd["wte.weight"][idx] + sd["wpe.weight"][pos]
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                allowed[b, i, j] = (j <= i and bool(m[b, j])) or i == j
    for layer in range(config.n_layer):
        p = f"blocks.{layer}."
        a = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], config.layer_norm_eps)
        qkv = a @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.split(H * Dh, dim=-1)
        heads = []
        for h in range(H):
            sl = slice(h * Dh, (h + 1) * Dh)
            s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(Dh)
            s = s.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(s, dim=-1) @ v[..., sl])
        x = x + torch.cat(heads, -1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        a = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], config.layer_norm_eps)
        f = _gelu_tanh(a @ sd[p + "mlp.fc.weight"].T + sd[p + "mlp.fc.bias"])
        x = x + f @ sd[p + "mlp.proj.weight"].T + sd[p + "mlp.proj.bias"]
    return _ln(x, sd["ln_f.weight"], sd["ln_f.bias"], config.layer_norm_eps)
