"""The ``instructrl-fast`` command line.

  instructrl-fast run [--size s|m|l]      the whole recipe for one size on the embedded task, then the result table
                                          (size s: ~3 min at one thread on a 2-core CPU)
  instructrl-fast reproduce               every size and method: the Figure-1 table and plot (results.json;
                                          ~24 min at one thread)
  instructrl-fast sft | rm | ppo | eval   one stage, on the embedded task or on your data (JSONL, a tokenizer.json,
                                          a GPT-2-family checkpoint folder)

Every command takes ``--out DIR`` (metrics.csv, TensorBoard events, checkpoints, model.safetensors), ``--preset``
(``demo``, ``micro``, ``instructgpt-1.3b`` / ``-6.7b`` / ``-175b``) and ``--resume`` (continue from the newest
checkpoints; finished stages are loaded, not rerun). Scale out with torchrun: ``torchrun --nproc-per-node N
instructrl-fast ... --tp T`` runs T-way tensor parallelism and N / T data-parallel replicas (FSDP2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

DEFAULT_RUN_SIZE = "s"


def _common(p: argparse.ArgumentParser, *, out_required: bool = False) -> None:
    p.add_argument("--out", type=Path, required=out_required, default=None if out_required else Path("runs/default"),
                   help="output folder (metrics, checkpoints, weights)")
    p.add_argument("--preset", default="demo", help="demo (default), micro, instructgpt-1.3b/-6.7b/-175b")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoints in --out")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 for the CPU presets demo / micro, whose models are too "
                        "small for intra-op parallelism, else the usable cores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size; under torchrun the other world / tp processes are data parallel")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 compute with fp32 master weights, or fp32 (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each transformer block in backward (default: on for the instructgpt presets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default=DEFAULT_RUN_SIZE, help="model shape: a size of the preset (s, m, l)")
    p.add_argument("--init", type=Path, default=None,
                   help="starting weights: a .safetensors file written by a stage, or a GPT-2-family HF folder")
    p.add_argument("--tokenizer", type=Path, default=None, help="a HF tokenizer.json (default: bytes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructrl-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="all stages for one size on the embedded task, then the result table")
    _common(p)
    p.add_argument("--size", default=DEFAULT_RUN_SIZE, help="which base size (s, m, l); default s")
    p.add_argument("--batch-invariant", action="store_true",
                   help="PPO with batch-invariant kernels: rollout log-probs == training log-probs, bitwise")

    p = sub.add_parser("reproduce", help="all sizes and methods: the Figure-1 table and plot")
    _common(p)

    p = sub.add_parser("sft", help="supervised fine-tuning on demonstrations")
    _common(p, out_required=True)
    _stage_args(p)
    p.add_argument("--data", type=Path, default=None, help="JSONL of {prompt, response} (default: the demo task)")
    p.add_argument("--val-data", type=Path, default=None, help="JSONL of {prompt, response} for validation loss")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)

    p = sub.add_parser("rm", help="reward model on K-way rankings")
    _common(p, out_required=True)
    _stage_args(p)
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL of {prompt, responses, ranking} (default: the demo task)")
    p.add_argument("--val-data", type=Path, default=None)
    p.add_argument("--demos", type=Path, default=None,
                   help="JSONL of {prompt, response}: the RM is shifted so these score 0 on average "
                        "(default: the best-ranked response of each comparison)")
    p.add_argument("--lr", type=float, default=None)

    p = sub.add_parser("ppo", help="PPO (or PPO-ptx with --ptx) against a reward model")
    _common(p, out_required=True)
    _stage_args(p)
    p.add_argument("--rm", type=Path, required=True, help="the reward model's model.safetensors (from `rm`)")
    p.add_argument("--rm-size", default=None, help="the RM's model shape (default: --size)")
    p.add_argument("--prompts", type=Path, default=None, help="JSONL of {prompt} (default: the demo task)")
    p.add_argument("--ptx", action="store_true", help="PPO-ptx: mix the pretraining log-likelihood in")
    p.add_argument("--corpus", type=Path, default=None,
                   help="pretraining text for --ptx, documents separated by blank lines (default: the demo corpus)")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--batch-invariant", action="store_true",
                   help="PPO with batch-invariant kernels: rollout log-probs == training log-probs, bitwise")

    p = sub.add_parser("eval", help="evaluate policies with the gold labeler, or answer prompts from a JSONL")
    _common(p, out_required=True)
    p.add_argument("--policy", action="append", required=True, metavar="NAME=PATH[:SIZE]",
                   help="a policy to evaluate (repeatable); the first one is the win-rate reference")
    p.add_argument("--prompts", type=Path, default=None,
                   help="JSONL of {prompt}: write responses.jsonl instead of the gold evaluation")
    p.add_argument("--tokenizer", type=Path, default=None)

    p = sub.add_parser("export", help="a stage's weights (any mesh) as a GPT-2 folder transformers loads")
    p.add_argument("path", type=Path, help="a stage output folder, a .safetensors file, a ckpt folder or a checkpoint")
    p.add_argument("out", type=Path, help="the GPT-2 folder to write (config.json + model.safetensors)")
    p.add_argument("--module", default=None, help="which model of a checkpoint (default: ema, policy or model)")
    p.set_defaults(threads=None)
    return parser


# -------------------------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------------------------


def _setup(args):
    """Threads, device, distributed state, the preset; returns (cfg, ParallelState)."""
    from instructrl_fast.parallel import init_distributed
    from instructrl_fast.train.config import preset

    # Measured on the 2-core CI machine (demo-s, one pretraining step): 0.17 s at 1 thread, 0.74 s at 2 when a
    # second process is busy: OpenMP barriers dominate matmuls this small, so the CPU presets default to 1 thread.
    threads = args.threads or (1 if args.preset in ("demo", "micro") else len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    state = init_distributed(args.tp)  # world = dp x tp; one output folder, each file written by the first rank
    cfg = preset(args.preset)
    if args.precision is not None:
        cfg = dataclasses.replace(cfg, precision=args.precision)
    if args.activation_checkpointing is not None:
        cfg = dataclasses.replace(cfg, activation_checkpointing=args.activation_checkpointing)
    if getattr(args, "batch_invariant", False):
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, batch_invariant=True),
                                  ppo_ptx=dataclasses.replace(cfg.ppo_ptx, batch_invariant=True))
    if args.quiet or not state.is_main:
        _quiet(cfg)
    return cfg, state


def _quiet(cfg) -> None:
    for stage in (*cfg.pretrain.values(), cfg.sft, cfg.ppo_init, cfg.rm, cfg.ppo, cfg.ppo_ptx):
        stage.loop.progress = False


def _device(args, state) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return state.device


def _tokenizer(path):
    from instructrl_fast.data import load_tokenizer

    return load_tokenizer(path)


def _model(args, cfg, tok, size: str, head: str = "lm", *, state=None, init: Path | None = None,
           frozen: bool = False):
    """A GPT of ``size``'s shape (or an HF checkpoint's) on the mesh, with ``init``'s weights if given."""
    from instructrl_fast.parallel import build_gpt, parallel_state
    from instructrl_fast.train.checkpoint import load_weights
    from instructrl_fast.train.config import model_config

    state = dataclasses.replace(state or parallel_state(), device=_device(args, state or parallel_state()))
    hf_dir = init is not None and init.is_dir()  # a GPT-2-family transformers checkpoint
    if hf_dir:
        from instructrl_fast.model import hf

        mcfg = hf.config_from_hf(json.loads((init / "config.json").read_text()))
    elif size not in cfg.pretrain:
        raise SystemExit(f"--size must be one of {tuple(cfg.pretrain)} for preset {cfg.name}, got {size!r}")
    else:
        mcfg = model_config(cfg.pretrain[size].model, vocab_size=tok.vocab_size, block_size=cfg.block_size)
    precision = cfg.precision or ("bf16" if state.device.type == "cuda" else "fp32")
    build = lambda h: build_gpt(mcfg, h, state=state, precision=precision, frozen=frozen,
                                activation_checkpointing=cfg.activation_checkpointing)
    if hf_dir:  # built on the mesh (FSDP2 too), then each rank reads its slices
        return hf.load_gpt2_weights(str(init), build(head))
    model = build(head)
    if init is not None:
        if head == "scalar":
            from instructrl_fast.train.pipeline import init_from

            return init_from(model, load_weights(init, build("lm")))
        load_weights(init, model)
    return model


def _pairs(records) -> list[tuple[str, str]]:
    return [(r["prompt"], r["response"]) for r in records]


def _split_val(items: list, n_val: int) -> tuple[list, list]:
    n_val = min(n_val, max(1, len(items) // 10))
    return items[n_val:], items[:n_val]


def _write(out: Path, name: str, obj) -> None:
    from instructrl_fast.parallel import parallel_state

    if not parallel_state().is_main:  # one writer per file
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(obj, indent=1, default=float) + "\n")


# -------------------------------------------------------------------------------------------------------------------
# commands
# -------------------------------------------------------------------------------------------------------------------


def cmd_run(args, *, all_sizes: bool = False) -> dict:
    from instructrl_fast.train.pipeline import Pipeline

    cfg, state = _setup(args)
    if not all_sizes:
        cfg = cfg.only(args.size)
    log = print if state.is_main else (lambda *a, **k: None)
    pipe = Pipeline(cfg, args.out, resume=args.resume, device=_device(args, state), log=log)
    return pipe.run()


def cmd_sft(args) -> dict:
    from instructrl_fast.data import DemoTask, load_sft_jsonl
    from instructrl_fast.train.checkpoint import save_weights
    from instructrl_fast.train.pipeline import set_dropout
    from instructrl_fast.train.sft import train_sft

    cfg, state = _setup(args)
    tok = _tokenizer(args.tokenizer)
    sc = cfg.sft
    if args.data is not None:
        demos = _pairs(load_sft_jsonl(args.data))
        val = _pairs(load_sft_jsonl(args.val_data)) if args.val_data else None
        if val is None:
            demos, val = _split_val(demos, 64)
    else:
        task = DemoTask(cfg.data_seed)
        demos = _pairs(task.demonstrations(sc.n_demos))
        val = [(p.text, " " + p.answer) for p in task.prompts("val", 64)]
    changes = {"n_demos": len(demos), "batch_size": min(sc.batch_size, len(demos))}
    changes["micro_batch_size"] = min(sc.micro_batch_size, changes["batch_size"])
    if args.epochs:
        changes["epochs"] = args.epochs
    if args.lr:
        changes["optim"] = dataclasses.replace(sc.optim, lr=args.lr)
    sc = dataclasses.replace(sc, **changes)
    model = set_dropout(_model(args, cfg, tok, args.size, state=state, init=args.init), sc.dropout)
    metrics = train_sft(sc, model, tok, demos, val, args.out, resume=args.resume)
    save_weights(args.out / "model.safetensors", set_dropout(model, 0.0))
    _write(args.out, "result.json", metrics)
    if state.is_main:
        print(json.dumps(metrics))
    return metrics


def cmd_rm(args) -> dict:
    from instructrl_fast.data import DemoTask, GoldLabeler, load_comparisons_jsonl, load_sft_jsonl
    from instructrl_fast.train.checkpoint import save_weights
    from instructrl_fast.train.reward import RewardModel, train_reward_model

    cfg, state = _setup(args)
    tok = _tokenizer(args.tokenizer)
    rc = cfg.rm
    if args.data is not None:
        comps = load_comparisons_jsonl(args.data)
        val = load_comparisons_jsonl(args.val_data) if args.val_data else None
        if val is None:
            comps, val = _split_val(comps, rc.n_val_comparisons)
    else:
        task = DemoTask(cfg.data_seed)
        data = task.comparisons(rc.n_comparisons + rc.n_val_comparisons, GoldLabeler(cfg.data_seed))
        comps, val = data[:rc.n_comparisons], data[rc.n_comparisons:]
    if args.demos is not None:
        demos = _pairs(load_sft_jsonl(args.demos))
    else:
        demos = [(c["prompt"], c["responses"][c["ranking"][0]]) for c in comps]
    batch = min(rc.batch_size, len(comps))
    rc = dataclasses.replace(rc, n_comparisons=len(comps), batch_size=batch,
                             micro_batch_size=min(rc.micro_batch_size, batch),
                             **({"optim": dataclasses.replace(rc.optim, lr=args.lr)} if args.lr else {}))
    rm = RewardModel(_model(args, cfg, tok, args.size, "scalar", state=state, init=args.init))
    metrics = train_reward_model(rc, rm, tok, comps, val, demos, args.out, resume=args.resume)
    save_weights(args.out / "model.safetensors", rm)
    _write(args.out, "result.json", metrics)
    if state.is_main:
        print(json.dumps(metrics))
    return metrics


def _read_corpus(path: Path) -> list[str]:
    docs = [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no documents (separate documents with a blank line)")
    return docs


def cmd_ppo(args) -> dict:
    from instructrl_fast.data import DemoTask, load_prompts_jsonl
    from instructrl_fast.train.batching import chunk_corpus
    from instructrl_fast.train.checkpoint import load_weights, save_weights
    from instructrl_fast.train.pipeline import init_from
    from instructrl_fast.train.ppo import train_ppo
    from instructrl_fast.train.reward import RewardModel

    cfg, state = _setup(args)
    tok = _tokenizer(args.tokenizer)
    pc = cfg.ppo_ptx if args.ptx else cfg.ppo
    task = DemoTask(cfg.data_seed)
    if args.prompts is not None:
        prompts = [p.text for p in load_prompts_jsonl(args.prompts)]
    else:
        prompts = [p.text for p in task.prompts("train", pc.n_prompts)]
    rollout = min(pc.rollout_batch_size, len(prompts))
    minibatch = min(pc.minibatch_size, rollout)
    episodes = args.episodes or pc.n_episodes
    pc = dataclasses.replace(pc, n_prompts=len(prompts), rollout_batch_size=rollout, minibatch_size=minibatch,
                             micro_batch_size=min(pc.micro_batch_size, minibatch),
                             n_episodes=max(rollout, episodes // rollout * rollout))
    ptx = None
    if args.ptx:
        docs = _read_corpus(args.corpus) if args.corpus else task.pretraining_corpus(cfg.pretrain["s"].n_docs)
        ptx = chunk_corpus(docs, tok, pc.ptx_seq_len)
    policy = _model(args, cfg, tok, args.size, state=state, init=args.init)
    ref = _model(args, cfg, tok, args.size, state=state, init=args.init, frozen=True)
    # the RM has the policy's shape unless --rm-size names another (an HF-initialised policy: the HF shape)
    rm_shape = args.init if args.init is not None and args.init.is_dir() and args.rm_size is None else None
    rm_size = args.rm_size or args.size
    rm = load_weights(args.rm, RewardModel(_model(args, cfg, tok, rm_size, "scalar", state=state, init=rm_shape,
                                                   frozen=True)))
    value = init_from(_model(args, cfg, tok, rm_size, "scalar", state=state, init=rm_shape), rm.body)
    ema, metrics = train_ppo(pc, policy, value, ref, rm, tok, prompts, args.out, ptx_chunks=ptx, resume=args.resume)
    save_weights(args.out / "model.safetensors", ema)
    _write(args.out, "result.json", metrics)
    if state.is_main:
        print(json.dumps(metrics))
    return metrics


def cmd_eval(args) -> dict:
    from instructrl_fast.data import DemoTask, GoldLabeler, load_prompts_jsonl, save_jsonl
    from instructrl_fast.train import evaluate as ev
    from instructrl_fast.train.generation import respond

    cfg, state = _setup(args)
    tok = _tokenizer(args.tokenizer)
    policies = {}
    for spec in args.policy:
        name, sep, rest = spec.partition("=")
        if not sep:
            raise SystemExit(f"--policy must be NAME=PATH[:SIZE], got {spec!r}")
        path, _, size = rest.partition(":")
        policies[name] = _model(args, cfg, tok, size or DEFAULT_RUN_SIZE, state=state, init=Path(path))
    ec = cfg.eval
    gen = {n: (lambda texts, m=m: respond(m, tok, texts, max_new_tokens=ec.max_new_tokens,
                                          temperature=ec.temperature)) for n, m in policies.items()}
    if args.prompts is not None:
        prompts = load_prompts_jsonl(args.prompts)
        rows = [{"prompt": p.text, **{n: r for n, r in zip(gen, resp)}}
                for p, *resp in zip(prompts, *(ev.collect_responses(g, prompts) for g in gen.values()))]
        if state.is_main:  # every rank generated the same responses; one writes them
            save_jsonl(args.out / "responses.jsonl", rows)
            print(f"wrote {len(rows)} rows to {args.out / 'responses.jsonl'}")
        return {"rows": len(rows)}
    task, labeler = DemoTask(cfg.data_seed), GoldLabeler(cfg.data_seed)
    prompts = task.prompts("test", ec.n_test_prompts)
    answers = {n: ev.collect_responses(g, prompts) for n, g in gen.items()}
    reference = next(iter(answers))
    results = {n: {**ev.evaluate_policy(a, prompts, labeler),
                   "win_rate": ev.win_rate(a, answers[reference], prompts, labeler, ec.seed)}
               for n, a in answers.items()}
    _write(args.out, "eval.json", results)
    for n, r in results.items():
        if state.is_main:
            print(f"{n}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()))
    return results


def cmd_export(args) -> dict:
    from instructrl_fast.train.export import export_gpt2

    out = export_gpt2(args.path, args.out, module=args.module)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return {"out": str(out)}


COMMANDS = {"run": cmd_run, "reproduce": lambda a: cmd_run(a, all_sizes=True), "sft": cmd_sft, "rm": cmd_rm,
            "ppo": cmd_ppo, "eval": cmd_eval, "export": cmd_export}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"instructrl-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
