"""``instructrl-fast plan``: memory per GPU and per stage, and time per PPO iteration, of an InstructGPT run.

Parameter counts are not a formula: ``simulate_shards`` builds each model with the project's own code
(``GPT`` with its tensor-parallel layers, then ``parallel.fsdp.apply_fsdp``) on the meta device, under a fake process
group of the planned world (``dp x tp`` ranks, a ("dp", "tp") ``DeviceMesh``), and reads this rank's shard sizes.
Everything else is arithmetic on those counts (``make_plan`` is pure given them).

What the plan assumes the trainer does (the layout of docs/DESIGN.md's scale-out section):

* FSDP2 over dp shards each trained model's (policy, value; SFT model; RM) parameters, gradients and Adam state: per
  GPU, 4 bytes of fp32 parameters (the masters; under ``bf16`` the compute copies are all-gathered in bf16), 4 bytes
  of fp32 gradients and 8 bytes of Adam moments per parameter of the shard. The EMA of the policy (decay 0.992) is an
  fp32 shard of the same layout (4 bytes per shard parameter).
* The frozen models (reference policy, reward model) hold their weights in the compute dtype (bf16, or fp32 under
  ``--precision fp32``), FSDP-sharded too, and stay resident through every PPO stage.
* For the rollout, the policy is gathered once into a TP-only inference copy (compute dtype, no FSDP: every decode
  step reads local weights) and freed before training. Gradients are freed after each optimizer step
  (``zero_grad(set_to_none=True)``), so the rollout holds none.
* The per-GPU shard of a parameter is rank 0's: FSDP2 pads every rank's shard to the first (largest) chunk's size.
* The policy's and value's PPO losses (and PPO-ptx's pretraining term) are one backward of their sum, as
  ``train.ppo.PPOStage.loss`` does: their activations are held together.

Activation bytes per transformer layer (Korthikanti et al. 2022, "Reducing activation recomputation in large
transformer models", eq. 1 under tensor parallelism without sequence parallelism, with flash attention so no
[T, T] scores are stored), for a micro-batch of b sequences of s tokens, d = d_model, A = n_head * d_head,
F = d_ff, t = TP, e = bytes per activation element (2 under bf16, 4 under fp32), m = 1 with dropout (1-byte masks)::

    b s (4 e d + 2 m d + e (4 A + 2 F) / t) + 4 b s n_head / t + 16 b s

which is Korthikanti's ``s b h (10 + 24 / t)`` at A = d, F = 4 d, e = 2, m = 1, plus what it leaves out: the fp32
softmax logsumexp of flash attention (``4 b s n_head / t``) and the two LayerNorms' fp32 mean and rstd (``16 b s``).
Checked against the tensors autograd saves in a real forward of ``GPT`` (tests/test_plan.py). With full activation
checkpointing (recompute each block in backward) a layer keeps only its input ``e b s d`` and one layer's full set
is alive during its recomputation. The head keeps the final LayerNorm's input, output and statistics
(``2 e b s d + 8 b s``) and, for the LM head, ``ops.linear_logprobs`` holds two fp32 logit chunks at its peak (its
forward and its backward's recomputation). A no-grad forward (rollout prefill, the
experience pass) holds the residual stream and one block's intermediates: ``e b s (2 d + (4 A + 2 F) / t)``.

KV cache of a rollout micro-batch: ``b (prompt + response) n_layer 2 A / t e`` bytes. Communication buffers: the
FSDP root unit's gathered parameters (the root stays unsharded from forward to backward), two gathered block units
(the current one and the prefetched next one) in the compute dtype, one block's gradients in fp32 for the
reduce-scatter while training, and a TP all-reduce buffer of ``e b s d``. Not counted: the CUDA context, the
allocator's fragmentation and NCCL's internal buffers (leave a few GiB).

Time per PPO iteration at a stated MFU and HBM bandwidth: training and the experience pass are compute-bound,
``flops_per_token`` (6 N + 12 L s d, the project's MFU formula; 8 N + 16 L s d with recomputation, a forward is a
third of the 6 N form) times tokens, over ``gpus * peak * mfu``. Decode is bandwidth-bound: each step of a dp replica
reads the TP-local inference copy and the micro-batch's KV cache once, ``(W + b ctx n_layer 2 A / t e) / (BW * util)``
summed over the steps (ctx grows by one per step); the prefill is compute-bound. Gathering the inference copy moves
``e W (dp - 1) / dp`` bytes into each GPU at the stated network bandwidth. Every response is taken to run to
``response_len`` (the worst case); TP all-reduce latency in decode and FSDP traffic in training (overlapped with
compute by prefetching) are not modelled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from instructrl_fast.checks import check_positive_int
from instructrl_fast.model.build import PRECISIONS
from instructrl_fast.model.config import GPTConfig

ROLES = ("policy", "reference", "reward", "value")
HEAD_OF = {"policy": "lm", "reference": "lm", "reward": "scalar", "value": "scalar"}
TRAINED = ("policy", "value")  # in PPO; the reference and the reward model are frozen
STAGES = ("sft", "rm", "ppo-rollout", "ppo-train", "ppo-ptx-train")
TERMS = ("parameters", "gradients", "optimizer state", "EMA", "frozen models", "inference copy", "activations",
         "KV cache", "comm buffers")
ELEMENT_BYTES = {name: (dtype or torch.float32).itemsize for name, dtype in PRECISIONS.items()}  # of the compute dtype
GiB = 2**30
# Dense tensor-core peaks of an H100 SXM (vendor sheet): bf16 989 TFLOP/s, TF32 495 TFLOP/s; HBM3 3.35 TB/s.
DEFAULT_PEAK_TFLOPS = {"bf16": 989.0, "fp32": 495.0}
DEFAULT_HBM_TBPS = 3.35


@dataclass(kw_only=True)
class PlanSpec:
    """What to plan: the four models, the cluster and the stages' batch shapes."""

    models: dict[str, GPTConfig]  # role (policy, reference, reward, value) -> shape
    gpus: int  # world size; tp must divide it (the rest is dp)
    tp: int = 1  # tensor-parallel size
    gpu_memory_gib: float = 80.0  # memory of one GPU
    precision: str = "bf16"  # compute dtype: bf16 (fp32 masters, gradients and Adam state) or fp32
    activation_checkpointing: bool = False  # recompute each block in backward (keeps its input only)
    sft_micro_batch: int = 8  # sequences per SFT forward/backward
    sft_dropout: float = 0.2  # SFT's residual dropout (1-byte masks when > 0; paper: 0.2)
    rm_micro_batch: int = 8  # prompts per RM forward/backward, each with rm_responses sequences
    rm_responses: int = 9  # K responses per ranked prompt (paper: 4..9; the largest is the worst case)
    seq_len: int = 2048  # tokens of an SFT / RM sequence (the context)
    ppo_micro_batch: int = 8  # episodes per PPO forward/backward
    rollout_micro_batch: int = 16  # episodes generated at once per dp replica (the KV cache's batch)
    rollout_batch: int = 512  # episodes per PPO iteration (paper: 512)
    ppo_epochs: int = 1  # passes over each rollout batch
    prompt_len: int = 1024  # prompt tokens of an episode
    response_len: int = 1024  # generated tokens of an episode (paper: at most 1k)
    ptx_per_episode: float = 8.0  # PPO-ptx pretraining sequences per episode (paper: 8)
    ptx_seq_len: int = 128  # tokens of a pretraining sequence in the ptx term
    mfu: float = 0.4  # model FLOPs utilisation assumed for compute-bound work
    peak_tflops: float = 0.0  # per-GPU dense peak in the compute dtype; 0: an H100 SXM's (989 bf16 / 495 TF32)
    hbm_tbps: float = DEFAULT_HBM_TBPS  # per-GPU HBM bandwidth, TB/s (H100 SXM: 3.35)
    bandwidth_utilization: float = 0.8  # share of the HBM bandwidth a decode step reaches
    interconnect_gbps: float = 50.0  # per-GPU dp network bandwidth, GB/s (one 400 Gb/s NIC per GPU, as a DGX H100)

    def __post_init__(self):
        if set(self.models) != set(ROLES):
            raise ValueError(f"models must map exactly the roles {ROLES}, got {tuple(self.models)}")
        for role, cfg in self.models.items():
            if not isinstance(cfg, GPTConfig):
                raise TypeError(f"models[{role!r}] must be a GPTConfig, got {type(cfg).__name__}")
        for name in ("gpus", "tp", "sft_micro_batch", "rm_micro_batch", "rm_responses", "seq_len", "ppo_micro_batch",
                     "rollout_micro_batch", "rollout_batch", "ppo_epochs", "prompt_len", "response_len",
                     "ptx_seq_len"):
            check_positive_int(f"PlanSpec.{name}", getattr(self, name))
        if self.gpus % self.tp:
            raise ValueError(f"PlanSpec.tp ({self.tp}) must divide gpus ({self.gpus})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"PlanSpec.precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        for name in ("gpu_memory_gib", "mfu", "hbm_tbps", "bandwidth_utilization", "interconnect_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PlanSpec.{name} must be > 0, got {getattr(self, name)!r}")
        if self.mfu > 1 or self.bandwidth_utilization > 1:
            raise ValueError("PlanSpec.mfu and PlanSpec.bandwidth_utilization must be <= 1")
        if self.peak_tflops < 0 or self.ptx_per_episode < 0 or not 0 <= self.sft_dropout < 1:
            raise ValueError("PlanSpec.peak_tflops and ptx_per_episode must be >= 0, sft_dropout in [0, 1)")
        if self.peak_tflops == 0:
            self.peak_tflops = DEFAULT_PEAK_TFLOPS[self.precision]
        for role, cfg in self.models.items():
            if self.prompt_len + self.response_len > cfg.block_size or self.seq_len > cfg.block_size:
                raise ValueError(f"prompt_len + response_len and seq_len must be <= the {role}'s block_size "
                                 f"({cfg.block_size})")

    @property
    def dp(self) -> int:
        return self.gpus // self.tp


@dataclass(kw_only=True)
class ModelShards:
    """Parameter counts of one model on one rank of the planned mesh, read from the built model."""

    params: int  # the whole model (TP = 1)
    tp_local: int  # this rank's TP shard (what the TP-only inference copy holds)
    per_gpu: int  # this rank's FSDP shard of the TP shard (rank 0: the largest, FSDP2 pads the others to it)
    block: int  # TP-local parameters of one transformer block (an FSDP unit)
    root: int  # TP-local parameters of the root FSDP unit (embeddings, final LayerNorm, head)


def simulate_shards(config: GPTConfig, head: str, *, dp: int, tp: int) -> ModelShards:
    """Build ``GPT(config, head)`` on the meta device under a fake process group of ``dp * tp`` ranks (this process
    being rank 0, whose FSDP shards are the largest), with the model's TP layers on the mesh's "tp" group and
    ``model.parallelize_gpt`` applying FSDP2 over "dp", and count the parameters rank 0 holds. Initialises and
    destroys the default process group: call it outside any distributed job. About 1.5 s for GPT-3 175B at any world
    size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from instructrl_fast.model.build import parallelize_gpt
    from instructrl_fast.model.gpt import GPT
    from instructrl_fast.parallel.dist import ParallelState, local_tensor

    if dist.is_initialized():
        raise RuntimeError("simulate_shards needs its own (fake) default process group: call it outside a "
                           "distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dp * tp)
    try:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        state = ParallelState(rank=0, world_size=dp * tp, local_rank=0, tp_size=tp, dp_size=dp,
                              device=torch.device("meta"), mesh=mesh, tp_group=mesh.get_group("tp"),
                              dp_group=mesh.get_group("dp"))
        with torch.device("meta"):
            model = GPT(config, head=head, tp_group=state.tp_group)
        tp_local = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.blocks[0].parameters())
        params = model.num_params(local=False)
        parallelize_gpt(model, state)  # FSDP2 over dp when dp > 1, as the trainers build their models
        per_gpu = sum(local_tensor(p).numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    return ModelShards(params=params, tp_local=tp_local, per_gpu=per_gpu, block=block,
                       root=tp_local - config.n_layer * block)


# ---------------------------------------------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------------------------------------------


def _train_state(shards: ModelShards) -> dict[str, int]:
    # fp32 parameters (the masters), fp32 gradients, Adam's two fp32 moments: 4 + 4 + 8 bytes per shard parameter
    return {"parameters": 4 * shards.per_gpu, "gradients": 4 * shards.per_gpu, "optimizer state": 8 * shards.per_gpu}


def _layer_activations(cfg: GPTConfig, b: int, s: int, tp: int, e: int, dropout: bool) -> int:
    """Bytes one layer keeps for backward (Korthikanti et al. 2022, flash attention; see the module docstring)."""
    m = 1 if dropout else 0
    return b * s * (4 * e * cfg.d_model + 2 * m * cfg.d_model + e * (4 * cfg.d_attn + 2 * cfg.d_ff) // tp
                    + 4 * cfg.n_head // tp + 16)


def _head_activations(cfg: GPTConfig, head: str, b: int, s: int, tp: int, e: int) -> int:
    """The final LayerNorm's input, output and statistics, plus two fp32 logit chunks of ``ops.linear_logprobs``
    for the LM head."""
    from instructrl_fast.ops.logprob import linear_chunk_rows  # the op's own chunking, so the two cannot drift

    out = 2 * e * b * s * cfg.d_model + 8 * b * s
    if head == "lm":
        v_local = cfg.padded_vocab_size // tp
        out += 2 * 4 * linear_chunk_rows(b * s, cfg.d_model, v_local) * v_local
    return out


def train_activations(cfg: GPTConfig, head: str, b: int, s: int, *, tp: int, e: int, checkpointing: bool,
                      dropout: bool = False) -> int:
    """Activation bytes of a forward + backward of ``b`` sequences of ``s`` tokens (0 when b == 0)."""
    if b == 0:
        return 0
    layer = _layer_activations(cfg, b, s, tp, e, dropout)
    kept = cfg.n_layer * e * b * s * cfg.d_model + layer if checkpointing else cfg.n_layer * layer
    return kept + _head_activations(cfg, head, b, s, tp, e)


def inference_activations(cfg: GPTConfig, head: str, b: int, s: int, *, tp: int, e: int) -> int:
    """Peak activation bytes of a no-grad forward of ``b`` sequences of ``s`` tokens."""
    if b == 0:
        return 0
    block = e * b * s * (2 * cfg.d_model + (4 * cfg.d_attn + 2 * cfg.d_ff) // tp)
    return block + _head_activations(cfg, head, b, s, tp, e)


def kv_cache_bytes(cfg: GPTConfig, b: int, s: int, *, tp: int, e: int) -> int:
    """K and V of every layer for ``b`` rows of ``s`` slots: b s n_layer 2 (A / t) e."""
    return b * s * cfg.n_layer * 2 * (cfg.d_attn // tp) * e


def _fsdp_buffers(shards: ModelShards, e: int, *, train: bool) -> int:
    """The gathered root unit + two gathered blocks (current, prefetched) [+ one block's fp32 gradients]."""
    return e * (shards.root + 2 * shards.block) + (4 * shards.block if train else 0)


def _tp_buffer(cfg: GPTConfig, b: int, s: int, tp: int, e: int) -> int:
    return e * b * s * cfg.d_model if tp > 1 else 0


@dataclass(kw_only=True)
class StagePlan:
    """One stage's memory per GPU."""

    terms: dict[str, int]  # TERMS -> bytes per GPU
    micro_batch: int  # the planned micro-batch (sequences, RM prompts, rollout episodes)
    max_micro_batch: int  # the largest micro-batch that fits (0: not even one)
    fits: bool  # total <= the GPU's memory
    advice: str = ""  # when it does not fit: the term that breaks it and a setting that fits

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass(kw_only=True)
class Plan:
    """The plan of one configuration (``make_plan``); ``to_json`` / ``to_text`` print it."""

    spec: PlanSpec
    shards: dict[str, ModelShards]  # role -> counts on rank 0
    stages: dict[str, StagePlan]
    time_s: dict[str, float]  # seconds per PPO iteration: gather, prefill, decode, experience, train, ptx, totals
    assumptions: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        spec = self.spec
        models = {}
        for role in ROLES:
            sh, bytes_per = self.shards[role], _param_bytes(role, spec)
            models[role] = {"config": dataclasses.asdict(spec.models[role]), "head": HEAD_OF[role],
                            "params": sh.params, "params_tp_local": sh.tp_local, "params_per_gpu": sh.per_gpu,
                            "param_bytes_per_gpu": bytes_per * sh.per_gpu, "bytes_per_param": bytes_per}
        stages = {name: {"terms_gib": {k: v / GiB for k, v in st.terms.items()}, "total_gib": st.total / GiB,
                         "fits": st.fits, "micro_batch": st.micro_batch, "max_micro_batch": st.max_micro_batch,
                         "advice": st.advice} for name, st in self.stages.items()}
        setup = {k: v for k, v in dataclasses.asdict(spec).items() if k != "models"}
        return {"setup": {**setup, "dp": spec.dp}, "models": models, "stages": stages,
                "time_per_ppo_iteration_s": self.time_s, "assumptions": self.assumptions}

    def to_text(self) -> str:
        return _format_text(self)


def _param_bytes(role: str, spec: PlanSpec) -> int:
    """Bytes per stored parameter: trained models keep fp32 masters, frozen ones the compute dtype."""
    return 4 if role in TRAINED else ELEMENT_BYTES[spec.precision]


def _stage_terms(stage: str, spec: PlanSpec, shards: dict[str, ModelShards], b: int) -> dict[str, int]:
    """Bytes per GPU of ``stage`` at micro-batch ``b`` (see the module docstring for every formula)."""
    e, tp, ckpt = ELEMENT_BYTES[spec.precision], spec.tp, spec.activation_checkpointing
    cfg = spec.models
    terms = dict.fromkeys(TERMS, 0)
    if stage in ("sft", "rm"):
        role = "policy" if stage == "sft" else "reward"
        rows, dropout = (b, spec.sft_dropout > 0) if stage == "sft" else (b * spec.rm_responses, False)
        terms.update(_train_state(shards[role]))
        terms["activations"] = train_activations(cfg[role], HEAD_OF[role], rows, spec.seq_len, tp=tp, e=e,
                                                 checkpointing=ckpt, dropout=dropout)
        terms["comm buffers"] = (_fsdp_buffers(shards[role], e, train=True)
                                 + _tp_buffer(cfg[role], rows, spec.seq_len, tp, e))
        return terms

    s = spec.prompt_len + spec.response_len
    for role in TRAINED:
        state = _train_state(shards[role])
        if stage == "ppo-rollout":
            state["gradients"] = 0  # freed after the last optimizer step
        for k, v in state.items():
            terms[k] += v
    terms["EMA"] = 4 * shards["policy"].per_gpu
    terms["frozen models"] = e * (shards["reference"].per_gpu + shards["reward"].per_gpu)
    if stage == "ppo-rollout":
        terms["inference copy"] = e * shards["policy"].tp_local
        terms["KV cache"] = kv_cache_bytes(cfg["policy"], b, s, tp=tp, e=e)
        # prefill of the micro-batch's prompts (sampling logits [b, V / t] fp32), then the experience pass behind it
        prefill = (inference_activations(cfg["policy"], "lm", b, spec.prompt_len, tp=tp, e=e)
                   + 4 * b * cfg["policy"].padded_vocab_size // tp)
        experience = max(inference_activations(cfg[r], HEAD_OF[r], b, s, tp=tp, e=e) for r in ROLES)
        terms["activations"] = max(prefill, experience)
        # the policy's experience forward runs on the inference copy; the others all-gather their FSDP units
        terms["comm buffers"] = (max(_fsdp_buffers(shards[r], e, train=False) for r in ("reference", "reward", "value"))
                                 + max(_tp_buffer(cfg[r], b, s, tp, e) for r in ROLES))
        return terms
    # ppo-train / ppo-ptx-train: one backward of policy loss + value loss (+ gamma * pretraining NLL)
    act = sum(train_activations(cfg[r], HEAD_OF[r], b, s, tp=tp, e=e, checkpointing=ckpt) for r in TRAINED)
    tp_buf = _tp_buffer(cfg["policy"], b, s, tp, e)
    if stage == "ppo-ptx-train":
        ptx_rows = max(1, round(spec.ptx_per_episode * b)) if b else 0
        act += train_activations(cfg["policy"], "lm", ptx_rows, spec.ptx_seq_len, tp=tp, e=e, checkpointing=ckpt)
        tp_buf = max(tp_buf, _tp_buffer(cfg["policy"], ptx_rows, spec.ptx_seq_len, tp, e))
    terms["activations"] = act
    # both models' roots stay gathered until the shared backward; one block unit (+ prefetch) is live at a time
    terms["comm buffers"] = (e * sum(shards[r].root for r in TRAINED)
                             + max(_fsdp_buffers(shards[r], e, train=True) - e * shards[r].root for r in TRAINED)
                             + tp_buf)
    return terms


def _micro_batch(stage: str, spec: PlanSpec) -> int:
    return {"sft": spec.sft_micro_batch, "rm": spec.rm_micro_batch, "ppo-rollout": spec.rollout_micro_batch,
            "ppo-train": spec.ppo_micro_batch, "ppo-ptx-train": spec.ppo_micro_batch}[stage]


def _largest_fitting(stage: str, spec: PlanSpec, shards: dict[str, ModelShards], cap: int) -> int:
    """The largest micro-batch whose total fits in ``cap`` bytes (every term grows with it): doubling, then
    bisection."""
    def fits(b):
        return sum(_stage_terms(stage, spec, shards, b).values()) <= cap

    if not fits(1):
        return 0
    hi = 1
    while fits(2 * hi) and hi < 2**20:
        hi *= 2
    lo, hi = hi, 2 * hi  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _advice(stage: str, spec: PlanSpec, shards: dict[str, ModelShards], st: StagePlan, cap: int) -> str:
    """Which term breaks the budget and a setting that fits (computed, not guessed)."""
    big = max(st.terms, key=st.terms.get)
    over = (st.total - cap) / GiB
    what = "--rollout-micro-batch" if stage == "ppo-rollout" else {
        "sft": "--sft-micro-batch", "rm": "--rm-micro-batch"}.get(stage, "--ppo-micro-batch")
    msg = f"{over:.1f} GiB over; the largest term is {big} ({st.terms[big] / GiB:.1f} GiB)."
    fixes = [f"{what} {st.max_micro_batch}"] if st.max_micro_batch >= 1 else []
    if not spec.activation_checkpointing and stage != "ppo-rollout":
        b = _largest_fitting(stage, dataclasses.replace(spec, activation_checkpointing=True), shards, cap)
        if b >= 1:
            fixes.append(f"--activation-checkpointing and {what} {min(b, st.micro_batch)}"
                         + (f" (at most {b})" if b > st.micro_batch else ""))
    if fixes:
        return msg + " Fits with " + "; or with ".join(fixes) + "."
    fixed = sum(_stage_terms(stage, spec, shards, 0).values())
    msg += f" The terms that do not depend on the micro-batch alone take {fixed / GiB:.1f} GiB."
    dp = _min_dp(stage, spec, shards, cap)
    if dp is None:
        return msg + " No dp fits at this --tp: raise --tp (or --gpu-memory)."
    return msg + (f" Fits at micro-batch 1 with about --gpus {dp * spec.tp} (dp {dp}; estimated by sharding the "
                  "FSDP terms further, re-plan to confirm).")


def _min_dp(stage: str, spec: PlanSpec, shards: dict[str, ModelShards], cap: int) -> int | None:
    """The smallest dp at which micro-batch 1 of ``stage`` fits, scaling each FSDP shard by dp / dp' (the
    unsharded terms, the inference copy and the buffers, stay); None when even an unbounded dp does not."""
    def fits(dp):
        scaled = {r: dataclasses.replace(sh, per_gpu=math.ceil(sh.per_gpu * spec.dp / dp)) for r, sh in shards.items()}
        return sum(_stage_terms(stage, spec, scaled, 1).values()) <= cap

    hi = spec.dp
    while not fits(hi):
        if hi > 2**24:
            return None
        hi *= 2
    lo = hi // 2  # not fits(lo) (or lo = spec.dp // 2, below the planned dp)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _iteration_time(spec: PlanSpec, shards: dict[str, ModelShards]) -> dict[str, float]:
    """Seconds per PPO iteration: rollout prefill + decode (per dp replica, in sequence), the experience pass,
    the PPO update and the ptx term (spread over every GPU)."""
    from instructrl_fast.train.loop import flops_per_token  # the trainer's own MFU formula

    e, tp, cfg = ELEMENT_BYTES[spec.precision], spec.tp, spec.models
    peak = spec.peak_tflops * 1e12 * spec.mfu
    bandwidth = spec.hbm_tbps * 1e12 * spec.bandwidth_utilization
    P, R, s = spec.prompt_len, spec.response_len, spec.prompt_len + spec.response_len

    def fpt(role, seq, *, train=True):  # FLOPs per token: forward + backward [+ recomputed forward], or forward
        c = cfg[role]
        f = flops_per_token(shards[role].params, c.n_layer, c.d_model, seq)
        if not train:
            return f / 3
        return f * 4 / 3 if spec.activation_checkpointing else f

    per_replica = math.ceil(spec.rollout_batch / spec.dp)
    b = min(spec.rollout_micro_batch, per_replica)
    n_micro = math.ceil(per_replica / b)
    # a replica's tp GPUs share the work: prefill is compute-bound, decode reads the TP-local weights and KV per step
    prefill = n_micro * b * P * fpt("policy", P, train=False) / (tp * peak)
    kv_per_token = kv_cache_bytes(cfg["policy"], 1, 1, tp=tp, e=e)
    decode_bytes = R * e * shards["policy"].tp_local + b * kv_per_token * (R * P + R * (R + 1) // 2)
    decode = n_micro * decode_bytes / bandwidth
    gpus_peak = spec.gpus * peak
    episodes_tokens = spec.rollout_batch * s
    experience = episodes_tokens * sum(fpt(r, s, train=False) for r in ROLES) / gpus_peak
    train = spec.ppo_epochs * episodes_tokens * (fpt("policy", s) + fpt("value", s)) / gpus_peak
    ptx_tokens = spec.ppo_epochs * spec.rollout_batch * spec.ptx_per_episode * spec.ptx_seq_len
    ptx = ptx_tokens * fpt("policy", spec.ptx_seq_len) / gpus_peak
    # each GPU receives the other dp ranks' shards of its TP-local inference copy once per iteration
    gather = e * shards["policy"].tp_local * (spec.dp - 1) / spec.dp / (spec.interconnect_gbps * 1e9)
    out = {"inference_copy_gather": gather, "rollout_prefill": prefill, "rollout_decode": decode,
           "experience": experience, "ppo_train": train, "ptx": ptx}
    out["total_ppo"] = gather + prefill + decode + experience + train
    out["total_ppo_ptx"] = out["total_ppo"] + ptx
    return out


ASSUMPTIONS = [
    ("FSDP2 over dp shards the trained models' fp32 parameters (the masters), fp32 gradients and Adam moments "
     "(4 + 4 + 8 bytes per parameter of the shard) and the policy's fp32 EMA (decay 0.992)"),
    "the reference and reward models are frozen in the compute dtype, FSDP-sharded, resident through PPO",
    ("the rollout gathers a TP-only inference copy of the policy (compute dtype, no FSDP), freed before training; "
     "gradients are freed after each optimizer step"),
    "PPO's policy and value losses (and PPO-ptx's pretraining term) are one backward: their activations add up",
    "activations: Korthikanti et al. 2022 per layer under TP, flash attention, no sequence parallelism",
    "not counted: CUDA context, allocator fragmentation, NCCL internal buffers (leave a few GiB)",
]


def make_plan(spec: PlanSpec, shards: dict[str, ModelShards] | None = None) -> Plan:
    """The plan of ``spec``. ``shards`` (role -> ModelShards on rank 0 of the planned mesh) default to
    ``simulate_shards`` of each distinct (shape, head); given them, this function is pure arithmetic."""
    if shards is None:
        shards, cache = {}, {}
        for role in ROLES:
            key = (json.dumps(dataclasses.asdict(spec.models[role]), sort_keys=True), HEAD_OF[role])
            if key not in cache:
                cache[key] = simulate_shards(spec.models[role], HEAD_OF[role], dp=spec.dp, tp=spec.tp)
            shards[role] = cache[key]
    cap = int(spec.gpu_memory_gib * GiB)
    stages = {}
    for name in STAGES:
        b = _micro_batch(name, spec)
        terms = _stage_terms(name, spec, shards, b)
        st = StagePlan(terms=terms, micro_batch=b, max_micro_batch=_largest_fitting(name, spec, shards, cap),
                       fits=sum(terms.values()) <= cap)
        if not st.fits:
            st.advice = _advice(name, spec, shards, st, cap)
        stages[name] = st
    return Plan(spec=spec, shards=shards, stages=stages, time_s=_iteration_time(spec, shards),
                assumptions=list(ASSUMPTIONS))


# ---------------------------------------------------------------------------------------------------------------
# inputs and output
# ---------------------------------------------------------------------------------------------------------------


def load_model_config(value: str) -> GPTConfig:
    """A GPTConfig from a preset name (``gpt3-175b``, ...) or a JSON file of GPTConfig fields."""
    if value in _gpt_presets():
        return GPTConfig.from_name(value)
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"a model config must be a GPTConfig preset {tuple(_gpt_presets())} or a JSON file, "
                         f"got {value!r}")
    fields = json.loads(path.read_text())
    if not isinstance(fields, dict):
        raise TypeError(f"{path}: expected a JSON object of GPTConfig fields, got {type(fields).__name__}")
    return GPTConfig(**fields)


PLAN_PRESETS = ("instructgpt-1.3b", "instructgpt-6.7b", "instructgpt-175b")  # the trainer presets of GPT-3 shapes


def _gpt_presets():
    from instructrl_fast.model.config import PRESETS

    return PRESETS


def preset_spec(preset: str | None, *, configs: dict[str, GPTConfig], gpus: int, tp: int = 1,
                **overrides) -> PlanSpec:
    """A PlanSpec from a trainer preset (``instructgpt-1.3b`` / ``-6.7b`` / ``-175b``: models, micro-batches and
    lengths from ``train.config``), with models replaced by ``configs`` and any PlanSpec field by ``overrides``
    (None values are ignored). Without a preset, ``configs`` must name the policy and the reward model (the
    reference defaults to the policy, the value model to the reward model)."""
    models, fields = {}, {}
    if preset is not None:
        from instructrl_fast.train.config import preset as trainer_preset

        if preset not in PLAN_PRESETS:
            raise ValueError(f"preset must be one of {PLAN_PRESETS} (GPT-3 shapes), got {preset!r}")
        cfg = trainer_preset(preset)
        policy = GPTConfig.from_name(cfg.pretrain[cfg.sizes[0]].model, block_size=cfg.block_size)
        reward = GPTConfig.from_name(cfg.pretrain[cfg.rm_size].model, block_size=cfg.block_size)
        models = {"policy": policy, "reference": policy, "reward": reward, "value": reward}
        ppo = cfg.ppo_ptx
        fields = {"sft_micro_batch": cfg.sft.micro_batch_size, "sft_dropout": cfg.sft.dropout,
                  "rm_micro_batch": cfg.rm.micro_batch_size, "seq_len": cfg.block_size,
                  "ppo_micro_batch": ppo.micro_batch_size, "rollout_batch": ppo.rollout_batch_size,
                  "ppo_epochs": ppo.ppo_epochs, "response_len": ppo.max_new_tokens,
                  "prompt_len": cfg.block_size - ppo.max_new_tokens, "ptx_per_episode": ppo.ptx_per_episode,
                  "ptx_seq_len": ppo.ptx_seq_len, "activation_checkpointing": cfg.activation_checkpointing}
        # the rollout engine's micro-batch, once PPOConfig has one
        if getattr(ppo, "rollout_micro_batch_size", None):
            fields["rollout_micro_batch"] = ppo.rollout_micro_batch_size
    for role, c in configs.items():
        if role not in ROLES:
            raise ValueError(f"configs keys must be among {ROLES}, got {role!r}")
        models[role] = c
    models.setdefault("reference", models.get("policy"))
    models.setdefault("value", models.get("reward"))
    if any(models.get(r) is None for r in ROLES):
        raise ValueError("without --preset, give --config policy=... and --config reward=... (the reference "
                         "defaults to the policy, the value model to the reward model)")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return PlanSpec(models=models, gpus=gpus, tp=tp, **fields)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _format_text(plan: Plan) -> str:
    spec = plan.spec
    ckpt = "on" if spec.activation_checkpointing else "off"
    head = (f"Plan: {spec.gpus} GPU{'s' if spec.gpus > 1 else ''} (dp {spec.dp} x tp {spec.tp}), {spec.precision}, "
            f"activation checkpointing {ckpt}, {spec.gpu_memory_gib:g} GiB per GPU")
    shape = (f"prompt {spec.prompt_len} + response {spec.response_len} tokens, SFT/RM sequences of {spec.seq_len}, "
             f"{spec.rollout_batch} episodes per PPO iteration, ptx {spec.ptx_per_episode:g} x {spec.ptx_seq_len} "
             "tokens per episode")
    lines = [head, shape, "",
             "| model | shape | head | parameters | TP-local | per GPU (FSDP shard) | bytes/param | GiB per GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for role in ROLES:
        c, sh, nb = spec.models[role], plan.shards[role], _param_bytes(role, spec)
        shape = f"L{c.n_layer} d{c.d_model} h{c.n_head}"
        kind = "fp32 master" if role in TRAINED else spec.precision
        lines.append(f"| {role} | {shape} | {HEAD_OF[role]} | {_count(sh.params)} | {_count(sh.tp_local)} | "
                     f"{_count(sh.per_gpu)} | {nb} ({kind}) | {nb * sh.per_gpu / GiB:.2f} |")
    lines += ["", "| GiB per GPU | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for term in TERMS:
        lines.append(f"| {term} | " + " | ".join(f"{plan.stages[s].terms[term] / GiB:.2f}" for s in STAGES) + " |")
    cap = f"{spec.gpu_memory_gib:g}"
    lines.append("| **total** | " + " | ".join(f"**{plan.stages[s].total / GiB:.2f}**" for s in STAGES) + " |")
    lines.append(f"| fits in {cap} GiB | " + " | ".join("yes" if plan.stages[s].fits else "NO" for s in STAGES) + " |")
    lines.append("| micro-batch | " + " | ".join(str(plan.stages[s].micro_batch) for s in STAGES) + " |")
    lines.append("| largest that fits | " + " | ".join(str(plan.stages[s].max_micro_batch) for s in STAGES) + " |")
    lines.append("")
    lines.append(f"micro-batch units: sft sequences, rm prompts of {spec.rm_responses} responses, ppo-rollout "
                 "episodes generated at once per dp replica, ppo-train episodes (ppo-ptx-train adds "
                 f"{spec.ptx_per_episode:g} pretraining sequences per episode)")
    for name in STAGES:
        if plan.stages[name].advice:
            lines.append(f"{name} does not fit: {plan.stages[name].advice}")
    t = plan.time_s
    timing = (f"time per PPO iteration at {spec.mfu:.0%} MFU of {spec.peak_tflops:g} TFLOP/s, "
              f"{spec.bandwidth_utilization:.0%} of {spec.hbm_tbps:g} TB/s HBM and {spec.interconnect_gbps:g} GB/s "
              f"network per GPU: inference-copy gather {t['inference_copy_gather']:.1f} s, "
              f"rollout prefill {t['rollout_prefill']:.1f} s + decode {t['rollout_decode']:.1f} s, "
              f"experience {t['experience']:.1f} s, PPO update {t['ppo_train']:.1f} s, ptx {t['ptx']:.1f} s; "
              f"PPO {t['total_ppo']:.1f} s, PPO-ptx {t['total_ppo_ptx']:.1f} s")
    lines += ["", timing]
    lines += ["", "assumptions:"] + [f"- {a}" for a in plan.assumptions]
    return "\n".join(lines)
