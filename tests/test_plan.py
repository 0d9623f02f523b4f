"""`instructrl-fast plan`: parameter bytes against an independent fake-process-group simulation, the formulas
against their sources, the 175B PPO-ptx verdict, and the README's tables against the command that printed them.

Anything that initialises a (fake) default process group runs in a subprocess, so these tests never leave a group
behind in the pytest process.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrl_fast import plan as planner
from instructrl_fast.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# (preset, gpus, tp): every GPT-3 size (1.3B policy with the 6.7B RM, 6.7B, 175B) at several (dp, tp), including
# dp that do not divide the parameters' first dims (FSDP2 pads: the largest shard is the first rank's).
CASES = [("instructgpt-1.3b", 1, 1), ("instructgpt-1.3b", 8, 1), ("instructgpt-1.3b", 12, 4),
         ("instructgpt-6.7b", 8, 8), ("instructgpt-6.7b", 6, 2),
         ("instructgpt-175b", 256, 8), ("instructgpt-175b", 48, 16), ("instructgpt-175b", 8, 8)]

# The reference: written here from torch's public pieces, not from instructrl_fast.plan. Every rank of the world is
# a separate fake process group; we read rank 0 and the last rank, and the per-GPU memory is the larger shard.
_SIMULATE = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from instructrl_fast.model import GPT, GPTConfig

out = []
for name, head, dp, tp in json.loads(sys.argv[1]):
    per_rank = []
    for rank in sorted({0, dp * tp - 1}):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dp * tp)
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        with torch.device("meta"):
            model = GPT(GPTConfig.from_name(name), head=head, tp_group=mesh.get_group("tp"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        per_rank.append(sum(p.to_local().numel() for p in model.parameters()))
        dist.destroy_process_group()
    out.append(max(per_rank))
print(json.dumps(out))
"""


# Several `instructrl-fast plan` commands in one subprocess (one torch import): each ``main(["plan", ...])`` sets up
# and tears down its own fake process group. Prints the list of their outputs.
_PLANS = r"""
import contextlib, io, json, sys
from instructrl_fast.cli import main

out = []
for args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *args]) == 0
    out.append(buf.getvalue())
print(json.dumps(out))
"""


def _python(script: str, arg) -> list:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructrl_fast.cli", "plan", *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300, check=False)


def _plans(*commands: list[str]) -> list[dict]:
    """The ``--json`` plans of several commands."""
    return [json.loads(out) for out in _python(_PLANS, [[*c, "--json"] for c in commands])]


def _plan_json(*args: str) -> dict:
    return _plans(list(args))[0]


def _gpt3_params(cfg: GPTConfig, head: str) -> int:
    """Closed form: per block 4 d A + 2 d F + 3 A + F + 6 d (QKV, out-proj, MLP with biases, two LayerNorms);
    tied embedding V_pad d, positions S d, final LayerNorm 2 d, scalar head d + 1."""
    d, A, F = cfg.d_model, cfg.d_attn, cfg.d_ff
    n = cfg.n_layer * (4 * d * A + 2 * d * F + 3 * A + F + 6 * d) + cfg.padded_vocab_size * d
    n += cfg.block_size * d + 2 * d
    return n + (d + 1 if head == "scalar" else 0)


@pytest.fixture(scope="module")
def plans():
    outs = _plans(*(["--preset", preset, "--gpus", str(gpus), "--tp", str(tp)] for preset, gpus, tp in CASES))
    return dict(zip(CASES, outs))


def test_params_per_gpu_equal_the_simulation(plans):
    jobs, keys = [], []
    for preset, gpus, tp in plans:
        for role in planner.ROLES:
            name = {"instructgpt-1.3b": "gpt3-1.3b", "instructgpt-6.7b": "gpt3-6.7b", "instructgpt-175b": "gpt3-175b"}
            shape = name[preset] if role in ("policy", "reference") else "gpt3-6.7b"  # the paper's RM is 6B
            jobs.append((shape, planner.HEAD_OF[role], gpus // tp, tp))
            keys.append((preset, gpus, tp, role))
    unique = sorted(set(jobs))
    simulated = dict(zip(unique, _python(_SIMULATE, unique)))
    for job, (preset, gpus, tp, role) in zip(jobs, keys):
        model = plans[(preset, gpus, tp)]["models"][role]
        bytes_per = 4 if role in planner.TRAINED else 2  # fp32 masters / the bf16 frozen copies
        assert model["params_per_gpu"] == simulated[job], (preset, gpus, tp, role)
        assert model["param_bytes_per_gpu"] == bytes_per * simulated[job], (preset, gpus, tp, role)
        cfg = GPTConfig.from_name(job[0])
        assert model["params"] == _gpt3_params(cfg, job[1])


def test_gpt3_175b_is_the_papers_size(plans):
    policy = plans[("instructgpt-175b", 256, 8)]["models"]["policy"]
    assert abs(policy["params"] / 1e9 - 175) < 1  # GPT-3 175B (174.6B with the padded vocabulary)
    # TP 8 x FSDP 32: 1/8 of the blocks and the vocabulary, then 1/32 of that (the replicated biases / norms and the
    # position table are not split by TP)
    assert policy["params_tp_local"] == pytest.approx(policy["params"] / 8, rel=0.01)
    assert policy["params_per_gpu"] == pytest.approx(policy["params_tp_local"] / 32, rel=0.001)


def test_json_schema_and_totals(plans):
    out = plans[("instructgpt-1.3b", 8, 1)]
    assert set(out["stages"]) == set(planner.STAGES)
    assert set(out["models"]) == set(planner.ROLES)
    cap = out["setup"]["gpu_memory_gib"]
    for st in out["stages"].values():
        assert st["total_gib"] == pytest.approx(sum(st["terms_gib"].values()))
        assert st["fits"] == (st["total_gib"] <= cap)
        assert set(st["terms_gib"]) == set(planner.TERMS)
    assert out["stages"]["ppo-rollout"]["terms_gib"]["gradients"] == 0  # freed before the rollout
    assert out["stages"]["ppo-train"]["terms_gib"]["KV cache"] == 0
    t = out["time_per_ppo_iteration_s"]
    parts = ("inference_copy_gather", "rollout_prefill", "rollout_decode", "experience", "ppo_train")
    assert t["total_ppo"] == pytest.approx(sum(t[k] for k in parts)) and all(t[k] > 0 for k in parts)
    assert t["total_ppo_ptx"] == pytest.approx(t["total_ppo"] + t["ptx"]) and t["ptx"] > 0


def test_175b_ppo_ptx_verdict_and_advice(plans):
    """The paper's 175B PPO-ptx on 256 GPUs at TP 8 fits in 80 GiB per GPU at the preset's settings (activation
    checkpointing, PPO micro-batch 2, rollout micro-batch 16). Without recomputation at a micro-batch of 8 the
    activations break 80 GiB: the advice names them and settings that fit, and those settings do fit (and one more
    micro-batch does not)."""
    out = plans[("instructgpt-175b", 256, 8)]
    assert all(st["fits"] for st in out["stages"].values()), {k: v["total_gib"] for k, v in out["stages"].items()}
    base = ["--preset", "instructgpt-175b", "--gpus", "256", "--tp", "8"]
    (big,) = _plans([*base, "--no-activation-checkpointing", "--ppo-micro-batch", "8"])
    st = big["stages"]["ppo-ptx-train"]
    assert not st["fits"]
    assert "largest term is activations" in st["advice"]
    b = st["max_micro_batch"]
    assert 1 <= b < st["micro_batch"] and f"--ppo-micro-batch {b}" in st["advice"]
    ckpt = re.search(r"--activation-checkpointing and --ppo-micro-batch (\d+)", st["advice"])
    assert ckpt is not None
    off = [*base, "--no-activation-checkpointing"]
    fits = [o["stages"]["ppo-ptx-train"]["fits"] for o in _plans(
        [*off, "--ppo-micro-batch", str(b)], [*off, "--ppo-micro-batch", str(b + 1)],
        [*base, "--activation-checkpointing", "--ppo-micro-batch", ckpt.group(1)])]
    assert fits == [True, False, True]


def test_activation_formula_is_korthikanti():
    """A = d, F = 4 d, bf16, dropout on: Korthikanti et al. 2022 eq. 1 (TP, no SP) without the s^2 terms that flash
    attention does not store, s b h (10 + 24 / t), plus the fp32 softmax statistics 4 b s n_head / t and the
    LayerNorms' fp32 mean and rstd 16 b s."""
    cfg = GPTConfig(n_layer=3, n_head=8, d_model=64, vocab_size=512, block_size=128)
    b, s = 3, 40
    head = 2 * 2 * b * s * cfg.d_model + 8 * b * s  # the final LayerNorm's input, output, statistics
    for t in (1, 2, 4):
        layer = s * b * cfg.d_model * (10 + 24 // t) + 4 * b * s * cfg.n_head // t + 16 * b * s
        got = planner.train_activations(cfg, "scalar", b, s, tp=t, e=2, checkpointing=False, dropout=True)
        assert got == cfg.n_layer * layer + head
        ckpt = planner.train_activations(cfg, "scalar", b, s, tp=t, e=2, checkpointing=True, dropout=True)
        assert ckpt == cfg.n_layer * 2 * s * b * cfg.d_model + layer + head


def test_activation_formula_equals_what_autograd_saves():
    """fp32, TP 1, no dropout (on CPU dropout masks are saved as floats, on CUDA as bool; LayerNorm statistics of
    bf16 inputs are bf16 on CPU, fp32 on CUDA): the planned bytes equal the floating tensors autograd saves in a
    forward of the real GPT with a scalar head (an attention width other than d_model, the 1.3B preset's case).
    The CPU attention saves Q, K, V and the logsumexp, as flash attention does on a GPU."""
    cfg = GPTConfig(n_layer=2, n_head=4, d_head=24, d_model=64, vocab_size=256, block_size=64)
    model = GPT(cfg, head="scalar")
    b, s = 2, 64
    saved = {}

    def pack(t):
        if t.is_floating_point():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.score(model(torch.randint(0, 256, (b, s))))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    assert measured == planner.train_activations(cfg, "scalar", b, s, tp=1, e=4, checkpointing=False)
    assert planner.train_activations(cfg, "lm", 0, s, tp=1, e=2, checkpointing=False) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_cache_bytes_equal_the_models_cache(dtype):
    """The planned KV bytes equal what GPT.setup_kv_cache allocates (at TP 1; under TP the heads split by p)."""
    cfg = GPTConfig.from_name("gpt3-1.3b")  # d_attn 3072 != d_model: the cache is sized by the attention width
    with torch.device("meta"):
        model = GPT(cfg)
    caches = model.setup_kv_cache(4, 96, dtype=dtype, device="meta")
    allocated = sum(t.numel() * t.element_size() for c in caches for t in (c.k_cache, c.v_cache))
    e = torch.empty((), dtype=dtype).element_size()
    assert planner.kv_cache_bytes(cfg, 4, 96, tp=1, e=e) == allocated
    assert planner.kv_cache_bytes(cfg, 4, 96, tp=8, e=e) * 8 == allocated


def test_bad_input():
    tiny = GPTConfig.from_name("test-tiny")
    models = dict.fromkeys(planner.ROLES, tiny)
    kw = {"prompt_len": 32, "response_len": 32, "seq_len": 64}
    with pytest.raises(ValueError, match="tp"):
        planner.PlanSpec(models=models, gpus=6, tp=4, **kw)
    with pytest.raises(ValueError, match="precision"):
        planner.PlanSpec(models=models, gpus=1, precision="fp16", **kw)
    with pytest.raises(ValueError, match="roles"):
        planner.PlanSpec(models={"policy": tiny}, gpus=1, **kw)
    with pytest.raises(ValueError, match="block_size"):
        planner.PlanSpec(models=models, gpus=1)  # 1024 + 1024 tokens > test-tiny's 128
    with pytest.raises(ValueError, match="reward"):
        planner.preset_spec(None, configs={"policy": tiny}, gpus=1, **kw)
    proc = _cli("--config", "policy=no-such-model", "--gpus", "1")
    assert proc.returncode == 2 and "GPTConfig preset" in proc.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "instructgpt-1.3b", "--gpus", "6", "--tp", "4"], "error: --tp (4) must divide --gpus (6)"),
    (["--preset", "instructgpt-1.3b", "--gpus", "1", "--seq-len", "4096"],
     "error: --prompt-len + --response-len and --seq-len must be <= the policy's block_size (2048)"),
    (["--preset", "demo", "--gpus", "1"],  # a trainer preset plan rejects is not listed among the choices
     ("error: --preset must be one of ('instructgpt-1.3b', 'instructgpt-6.7b', 'instructgpt-175b') (GPT-3 shapes), "
      "got 'demo'")),
])
def test_cli_errors_name_the_options(argv, message):
    proc = _cli(*argv)
    assert proc.returncode == 2 and message in proc.stderr and "PlanSpec" not in proc.stderr, proc.stderr


def test_one_gpu_is_singular():
    assert "Plan: 1 GPU (dp 1 x tp 1)" in _cli("--preset", "instructgpt-1.3b", "--gpus", "1").stdout


def test_bad_config_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    proc = _cli("--config", f"policy={path}", "--config", "reward=gpt3-6.7b", "--gpus", "1")
    assert proc.returncode == 2 and "expected a JSON object" in proc.stderr


def test_config_json_and_roles(tmp_path):
    """--config takes a JSON file per role; the reference and value default to the policy and reward shapes."""
    path = tmp_path / "rm.json"
    path.write_text(json.dumps({"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 256, "block_size": 128}))
    out = _plan_json("--config", "policy=test-small", "--config", f"reward={path}", "--gpus", "4", "--tp", "2",
                     "--prompt-len", "64", "--response-len", "64", "--seq-len", "128")
    assert out["models"]["reference"]["params"] == out["models"]["policy"]["params"]
    assert out["models"]["value"]["params"] == out["models"]["reward"]["params"]
    cfg = GPTConfig(n_layer=2, n_head=4, d_model=64, vocab_size=256, block_size=128)
    assert out["models"]["reward"]["params"] == _gpt3_params(cfg, "scalar")
    assert all(st["fits"] for st in out["stages"].values())  # a tiny model fits anywhere


def test_readme_tables_are_the_commands_output():
    """Every `instructrl-fast plan ...` command in the README's "Planning a run" section prints exactly the table
    rows shown there."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Planning a run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^instructrl-fast plan (.+)$", section, flags=re.MULTILINE)
    assert len(commands) >= 3
    for command, out in zip(commands, _python(_PLANS, [c.split() for c in commands])):
        rows = [line for line in out.splitlines() if line.startswith("| ")]
        assert rows and all(row in section for row in rows), command


def test_advice_when_only_more_gpus_help():
    """175B PPO on 8 GPUs: its sharded states alone exceed 80 GiB; the advice gives the GPU count at which micro-batch
    1 fits, and re-planning there confirms it (and one dp fewer does not)."""
    out = _plan_json("--preset", "instructgpt-175b", "--gpus", "8", "--tp", "8")
    st = out["stages"]["ppo-rollout"]
    assert not st["fits"] and st["max_micro_batch"] == 0
    gpus = int(re.search(r"--gpus (\d+)", st["advice"]).group(1))
    base = ["--preset", "instructgpt-175b", "--tp", "8", "--rollout-micro-batch", "1"]
    fits = [o["stages"]["ppo-rollout"]["fits"] for o in _plans([*base, "--gpus", str(gpus)],
                                                               [*base, "--gpus", str(gpus - 8)])]
    assert fits == [True, False]
