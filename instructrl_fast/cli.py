"""instructrl-fast: the InstructGPT recipe (SFT -> reward model -> PPO-ptx) on an embedded task or on your data.

Every command takes --out DIR (metrics.csv, TensorBoard events, checkpoints, model.safetensors, result.json),
--preset (demo, micro, instructgpt-1.3b / -6.7b / -175b) and --resume (continue from the newest checkpoint; finished
stages are loaded, not rerun). A model.safetensors carries its shape and tokenizer: a command that reads one needs
no --size or --tokenizer. --init also takes a stage's output folder, a GPT-2-family Hugging Face folder (its
tokenizer.json is used when present) or a stage's checkpoint (a ckpt folder or one ckpt/step_* folder). Stages
checkpoint as they go (--ckpt-every); SIGTERM or Ctrl-C writes a checkpoint and stops, and --resume continues bit
for bit. Scale out with torchrun: torchrun --nproc-per-node N -m instructrl_fast.cli ... --tp T runs T-way tensor
parallelism and N / T data-parallel replicas (FSDP2).
`instructrl-fast COMMAND --help` lists a command's options.

Structure (for adding a command): ``build_parser()`` calls one ``_<command>_parser`` per command, which declares it
with a one-line help and its options (shared ones through ``add_common_options`` / ``add_model_options``);
``COMMANDS`` maps each to its ``cmd_*`` handler, which parses, builds the configs and calls a stage (the commands'
data and ``eval``'s evaluation live in ``train.commands``); ``main`` turns user errors into
``instructrl-fast CMD: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# Only the standard library at module level: `--help` and argument errors must not wait for torch (~1 s to
# import); every handler imports what it needs.

DEFAULT_RUN_SIZE = "s"
PROG = "instructrl-fast"


class UserError(ValueError):
    """A problem with the user's input; main prints it after the ``instructrl-fast CMD: error:`` prefix."""


# -------------------------------------------------------------------------------------------------------------------
# argument types and shared options
# -------------------------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (an explicit 0 is rejected, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def device_name(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N (checked against the installed torch when the command starts)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def ckpt_every(text: str) -> tuple[int, float]:
    """argparse type: the checkpoint cadence as (optimizer steps, minutes), from STEPS, MINUTESm or STEPS,MINUTESm
    (e.g. 500, 10m, 500,10m: whichever comes first); 0 alone: only at the end of each stage and on a signal."""
    steps, minutes = 0, 0.0
    for part in text.split(","):
        try:
            if part.endswith("m"):
                minutes = float(part[:-1])
                ok = 0.0 < minutes < float("inf")
            else:
                steps = int(part)
                ok = steps > 0 or text == "0"
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected STEPS, MINUTESm or STEPS,MINUTESm with positive numbers "
                                             f"(e.g. 500,10m), or 0, got {text!r}")
    return steps, minutes


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def betas(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated distinct finite floats >= 0 (KL coefficients)."""
    values = tuple(nonnegative_float(part) for part in text.split(","))
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct values, got {text!r}")
    return values


def add_common_options(p: argparse.ArgumentParser, *, out_required: bool = False) -> None:
    """--out, --preset, --resume, --overwrite, --ckpt-every, --threads, --device, --tp, --precision,
    --activation-checkpointing, --quiet: every training command has them."""
    p.add_argument("--out", type=Path, required=out_required, default=None if out_required else Path("runs/default"),
                   help="output folder (metrics, checkpoints, weights)" + ("" if out_required else
                                                                           "; default runs/default"))
    p.add_argument("--preset", default="demo", help="demo (default), micro, instructgpt-1.3b/-6.7b/-175b")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoints (the same command and options)")
    p.add_argument("--overwrite", action="store_true", help="delete the files of an earlier run in --out first")
    p.add_argument("--ckpt-every", type=ckpt_every, default=None, metavar="STEPS,MINUTESm",
                   help="checkpoint each stage every STEPS optimizer steps and every MINUTES of wall time, "
                        "whichever comes first (e.g. 500,10m or 10m; 0: only at the end; default: the preset's, "
                        "demo 250,1m, instructgpt 30m)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: 1 for the CPU presets demo / micro, whose models are too "
                        "small for intra-op parallelism, else the usable cores)")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel size; under torchrun the other world / tp processes are data parallel")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 compute with fp32 master weights, or fp32 (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each transformer block in backward (default: on for the instructgpt presets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--size, --init, --tokenizer: what a training stage starts from."""
    p.add_argument("--size", default=None,
                   help="shape of a new model: a size of the preset (s, m, l; default s). Weights given with --init "
                        "carry their own shape")
    p.add_argument("--init", type=Path, default=None,
                   help="starting weights: a stage's output folder or its model.safetensors, a GPT-2-family HF "
                        "folder, a stage's ckpt folder or one of its checkpoints")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a HF tokenizer.json (default: the one stored with --init's weights or in its HF folder, "
                        "else bytes)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The top-level help: the description as written, then one line per command."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=20, width=118)
        self._action_max_length = 18  # argparse measures the command names too short: "reproduce" wrapped its help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\nStructure")[0],
        formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add in (_run_parser, _reproduce_parser, _sft_parser, _rm_parser, _ppo_parser, _eval_parser, _plan_parser,
                _export_parser):
        add(sub)
    return parser


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole recipe for one size on the embedded task, then the result table "
                                   "(demo: minutes)")
    add_common_options(p)
    p.add_argument("--size", default=DEFAULT_RUN_SIZE, help="which base size (s, m, l); default s")
    p.add_argument("--batch-invariant", action="store_true",
                   help="PPO with batch-invariant kernels: rollout log-probs == training log-probs, bitwise")


def _reproduce_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="every size and method: the Figure-1 table and plot (demo: ~8x `run`); "
                                         "with --kl-sweep, PPO at several KL coefficients")
    add_common_options(p)
    p.add_argument("--kl-sweep", action="store_true",
                   help="instead: PPO from one size's PPO init and RM at each KL coefficient, each judged by the gold "
                        "labeler (kl_sweep.txt / .json / .png; demo: 6 betas at 16,384 episodes)")
    p.add_argument("--from", dest="source", type=Path, default=None, metavar="RUN",
                   help="with --kl-sweep: take sft-SIZE/, rm/ and ppo-init-SIZE/ from this finished `run` folder "
                        "(default: train them into --out first)")
    p.add_argument("--size", default=None, help="with --kl-sweep: which base size (s, m, l); default s")
    p.add_argument("--betas", type=betas, default=None, metavar="B1,B2,...",
                   help="with --kl-sweep: the KL coefficients (default: the preset's; demo 0,0.02,0.08,0.3,1,3)")
    p.add_argument("--episodes", type=positive_int, default=None,
                   help="with --kl-sweep: PPO episodes of every run (default: the preset's; demo 16384)")
    p.add_argument("--ptx", action="store_true",
                   help="with --kl-sweep: sweep PPO-ptx (the preset's pretraining mix, gamma and LR) instead of PPO")


def _sft_parser(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (JSONL of {prompt, response})")
    add_common_options(p, out_required=True)
    add_model_options(p)
    p.add_argument("--data", type=Path, default=None, help="JSONL of {prompt, response} (default: the demo task)")
    p.add_argument("--val-data", type=Path, default=None,
                   help="JSONL of {prompt, response} for the validation loss (default: 10%% of --data, at most 64)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the data (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")


def _rm_parser(sub) -> None:
    p = sub.add_parser("rm", help="a reward model on K-way rankings (JSONL of {prompt, responses, ranking})")
    add_common_options(p, out_required=True)
    add_model_options(p)
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL of {prompt, responses, ranking} (default: the demo task)")
    p.add_argument("--val-data", type=Path, default=None)
    p.add_argument("--demos", type=Path, default=None,
                   help="JSONL of {prompt, response}: the RM is shifted so these score 0 on average "
                        "(default: the best-ranked response of each comparison)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")


def _ppo_parser(sub) -> None:
    p = sub.add_parser("ppo", help="PPO, or PPO-ptx with --ptx, against a reward model")
    add_common_options(p, out_required=True)
    add_model_options(p)
    p.add_argument("--rm", type=Path, required=True,
                   help="the reward model: the output folder of `rm` or its model.safetensors")
    p.add_argument("--rm-size", default=None,
                   help="the RM's shape, only for weights saved without one (default: --size)")
    p.add_argument("--prompts", type=Path, default=None, help="JSONL of {prompt} (default: the demo task)")
    p.add_argument("--ptx", action="store_true", help="PPO-ptx: mix the pretraining log-likelihood in")
    p.add_argument("--kl-coef", type=nonnegative_float, default=None,
                   help="beta, the per-token KL penalty against the starting policy (default: the preset's: demo "
                        "0.08, instructgpt 0.02)")
    p.add_argument("--ptx-coef", type=positive_float, default=None,
                   help="gamma of PPO-ptx, the weight of the pretraining log-likelihood (with --ptx; default: the "
                        "preset's, 27.8)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="pretraining text for --ptx, documents separated by blank lines (default: the demo corpus)")
    p.add_argument("--episodes", type=positive_int, default=None,
                   help="total episodes, a multiple of the rollout batch (default: the preset's)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="PPO with batch-invariant kernels: rollout log-probs == training log-probs, bitwise")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate policies with the gold labeler, or answer prompts from a JSONL")
    add_common_options(p, out_required=True)
    p.add_argument("--policy", action="append", required=True, metavar="NAME=PATH[:SIZE]",
                   help="a policy to evaluate (repeatable): a stage's output folder, a weights file, a HF folder or "
                        "a checkpoint; the first one is the win-rate reference. SIZE only for weights saved without "
                        "their shape")
    p.add_argument("--prompts", type=Path, default=None,
                   help="JSONL of {prompt}: write responses.jsonl instead of the gold evaluation")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a HF tokenizer.json, only for weights saved without their tokenizer")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="a stage's weights (written at any mesh) as a folder transformers loads: "
                                      "a policy, a reward model or a value model, with its tokenizer")
    p.add_argument("path", type=Path, help="a stage output folder, a .safetensors file, a ckpt folder or a checkpoint")
    p.add_argument("out", type=Path, help="the folder to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--module", default=None,
                   help="which model of a checkpoint (default: ema, policy or model; value for PPO's value model)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a HF tokenizer.json, only for weights saved without their tokenizer (a checkpoint)")


# -------------------------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------------------------


def _setup(args):
    """Threads, device, distributed state, the preset, the checkpoint cadence, the output folder (``outdir``);
    returns (cfg, ParallelState)."""
    import dataclasses
    import os

    import torch

    from instructrl_fast.parallel import init_distributed
    from instructrl_fast.train import outdir
    from instructrl_fast.train.config import preset

    cfg = preset(args.preset)  # first: a bad --preset is reported before anything starts
    # Measured on the 2-core CI machine (demo-s, one pretraining step): 0.17 s at 1 thread, 0.74 s at 2 when a
    # second process is busy: OpenMP barriers dominate matmuls this small, so the CPU presets default to 1 thread.
    threads = args.threads or (1 if args.preset in ("demo", "micro") else len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    if args.precision is not None:
        cfg = dataclasses.replace(cfg, precision=args.precision)
    if args.activation_checkpointing is not None:
        cfg = dataclasses.replace(cfg, activation_checkpointing=args.activation_checkpointing)
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: " + (f"this torch ({torch.__version__}) is built without CUDA"
                                                       if torch.version.cuda is None else "no GPU is visible"))
    if args.ckpt_every is not None:
        steps, minutes = args.ckpt_every
        cfg = cfg.with_checkpoints(every_steps=steps, every_minutes=minutes)
    # world = dp x tp on --device (decided here, once); one output folder, each file written by the first rank
    state = init_distributed(args.tp, device=args.device)
    if args.command == "eval":
        args.out.mkdir(parents=True, exist_ok=True)
    else:
        outdir.prepare(args.out, _identity(args), resume=args.resume, overwrite=args.overwrite)
    if getattr(args, "batch_invariant", False):
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, batch_invariant=True),
                                  ppo_ptx=dataclasses.replace(cfg.ppo_ptx, batch_invariant=True))
    if args.quiet or not state.is_main:
        for loop in cfg.loops():
            loop.progress = False
    return cfg, state


# Options that do not change what a run computes: --resume may differ in them (checkpoints reshard to another --tp,
# activation checkpointing recomputes the same activations).
_NOT_IDENTITY = ("command", "out", "resume", "overwrite", "ckpt_every", "threads", "device", "quiet", "tp",
                 "activation_checkpointing")


def _identity(args) -> dict:
    """What ``outdir.prepare`` records of a command: its name and the options that decide its result."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
               if k not in _NOT_IDENTITY}
    return {"command": args.command, "options": options}


def _log(state):
    """print on the first rank, nothing on the others (every rank runs the same stage)."""
    return print if state.is_main else (lambda *a, **k: None)


def _check_size(cfg, size: str, option: str = "--size") -> str:
    if size not in cfg.pretrain:
        raise UserError(f"{option} must be one of {tuple(cfg.pretrain)} for preset {cfg.name}, got {size!r}")
    return size


def _shape(cfg, size: str | None, option: str = "--size"):
    """The ``assembly.Shape`` of ``size`` (a size of the preset; None: the default, which nothing is checked
    against)."""
    from instructrl_fast.train.assembly import Shape
    from instructrl_fast.train.config import model_config

    name = _check_size(cfg, size or DEFAULT_RUN_SIZE, option)
    return Shape(config=lambda vocab: model_config(cfg.pretrain[name].model, vocab_size=vocab,
                                                   block_size=cfg.block_size),
                 option=f"{option} {size}" if size else None)


def _builder(cfg, state):
    """How this command builds models: on the mesh and device of ``state``, in ``--precision`` (default bf16 on a
    GPU)."""
    from instructrl_fast.train.assembly import Builder

    return Builder.for_run(cfg, state)


def _warn_truncated(state, path: Path | None, pairs: list[tuple[str, str]], tok, length: int, what: str) -> None:
    """One warning per file whose examples do not fit the model's context (``batching.fit`` cuts them)."""
    from instructrl_fast.train.batching import n_truncated

    if path is None or not state.is_main or not (n := n_truncated(pairs, tok, length)):
        return
    print(f"{PROG}: warning: {path}: {n} of {len(pairs)} {what} exceed the model's {length} tokens (block_size "
          f"plus the one shifted out, with bos and eos); their prompts are cut from the left, and a response that "
          f"alone is too long loses its end but keeps its eos", file=sys.stderr)


def _write(state, out: Path, name: str, obj) -> None:
    if not state.is_main:  # one writer per file
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(obj, indent=1, default=float) + "\n")


def _finish(args, state, returned: dict) -> dict:
    """The stage's final metrics (the last logged value of every metric, then its final validation metrics):
    printed and written to ``<out>/result.json``."""
    from instructrl_fast.train.logging import last_values

    if not state.is_main:  # the first rank logged the metrics and reports them
        return returned
    csv_path = args.out / "metrics.csv"
    metrics = {**(last_values(csv_path) if csv_path.is_file() else {}), **returned}
    _write(state, args.out, "result.json", metrics)
    print(json.dumps(metrics))
    return metrics


# -------------------------------------------------------------------------------------------------------------------
# commands: one handler each
# -------------------------------------------------------------------------------------------------------------------


def cmd_run(args, *, all_sizes: bool = False) -> dict:
    from instructrl_fast.train.pipeline import Pipeline

    cfg, state = _setup(args)
    if not all_sizes:
        cfg = cfg.only(_check_size(cfg, args.size))
    pipe = Pipeline(cfg, args.out, parallel=state, resume=args.resume, log=_log(state))
    return pipe.run()


def cmd_reproduce(args) -> dict:
    if not args.kl_sweep:
        for option, value in (("--from", args.source), ("--size", args.size), ("--betas", args.betas),
                              ("--episodes", args.episodes), ("--ptx", args.ptx or None)):
            if value is not None:
                raise UserError(f"{option} needs --kl-sweep")
        return cmd_run(args, all_sizes=True)
    return cmd_kl_sweep(args)


def cmd_kl_sweep(args) -> dict:
    import dataclasses

    from instructrl_fast.train.assembly import RESULT
    from instructrl_fast.train.pipeline import Pipeline

    size = args.size or DEFAULT_RUN_SIZE
    if args.source is not None:  # before _setup creates --out: a wrong --from leaves nothing behind
        needed = [args.source / stage / RESULT for stage in (f"sft-{size}", "rm", f"ppo-init-{size}")]
        if missing := [str(p) for p in needed if not p.is_file()]:
            raise UserError(f"--from {args.source}: no finished run of size {size} there (missing "
                            f"{', '.join(missing)}); give the --out of an `{PROG} run --size {size}`")
        if args.source.resolve() == args.out.resolve():
            raise UserError(f"--from {args.source} is --out as well: the sweep needs a folder of its own")
    cfg, state = _setup(args)
    cfg = cfg.only(_check_size(cfg, size))
    given = {k: v for k, v in (("betas", args.betas), ("n_episodes", args.episodes)) if v is not None}
    sweep = dataclasses.replace(cfg.kl_sweep, ptx=args.ptx or cfg.kl_sweep.ptx, **given)
    if (n := sweep.n_episodes) is not None and n % cfg.ppo.rollout_batch_size:
        raise UserError(f"--episodes must be a multiple of the PPO rollout batch ({cfg.ppo.rollout_batch_size} "
                        f"in preset {cfg.name}), got {n}")
    cfg = dataclasses.replace(cfg, kl_sweep=sweep)
    pipe = Pipeline(cfg, args.out, parallel=state, resume=args.resume, log=_log(state))
    return pipe.kl_sweep(size, args.source)


def _sft_config(args, sc, n_demos: int):
    """The SFT config of ``sft``'s options: batch sizes fitted to ``n_demos``, epochs and learning rate."""
    import dataclasses

    changes = {"n_demos": n_demos, "batch_size": min(sc.batch_size, n_demos)}
    changes["micro_batch_size"] = min(sc.micro_batch_size, changes["batch_size"])
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.lr is not None:
        changes["optim"] = dataclasses.replace(sc.optim, lr=args.lr)
    return dataclasses.replace(sc, **changes)


def cmd_sft(args) -> dict:
    from instructrl_fast.train.assembly import load_model
    from instructrl_fast.train.commands import sft_data
    from instructrl_fast.train.pipeline import resuming, set_dropout
    from instructrl_fast.train.sft import train_sft
    from instructrl_fast.weights import save_weights

    cfg, state = _setup(args)
    demos, val = sft_data(cfg, args.data, args.val_data)
    sc = _sft_config(args, cfg.sft, len(demos))
    model, tok = load_model(_builder(cfg, state), args.init, shape=_shape(cfg, args.size), tokenizer=args.tokenizer)
    for path, pairs in ((args.data, demos), (args.val_data, val)):
        _warn_truncated(state, path, pairs, tok, model.config.block_size + 1, "demonstrations")
    set_dropout(model, sc.dropout)
    with resuming(args.out, args.resume, _log(state)):
        returned = train_sft(sc, model, tok, demos, val, args.out, parallel=state, resume=args.resume)
    save_weights(args.out / "model.safetensors", set_dropout(model, 0.0), tokenizer=tok)
    return _finish(args, state, returned)


def cmd_rm(args) -> dict:
    import dataclasses

    from instructrl_fast.train.assembly import load_model, stored_kind
    from instructrl_fast.train.commands import rm_data
    from instructrl_fast.train.pipeline import resuming
    from instructrl_fast.train.reward import RewardModel, train_reward_model
    from instructrl_fast.weights import save_weights

    cfg, state = _setup(args)
    comps, val, demos = rm_data(cfg, args.data, args.val_data, args.demos)
    rc, batch = cfg.rm, min(cfg.rm.batch_size, len(comps))
    rc = dataclasses.replace(rc, n_comparisons=len(comps), batch_size=batch,
                             micro_batch_size=min(rc.micro_batch_size, batch),
                             **({"optim": dataclasses.replace(rc.optim, lr=args.lr)} if args.lr is not None else {}))
    want = "reward" if stored_kind(args.init) == "reward" else "scalar"  # continue training a reward model
    body, tok = load_model(_builder(cfg, state), args.init, shape=_shape(cfg, args.size), want=want,
                           tokenizer=args.tokenizer)
    rm = body if want == "reward" else RewardModel(body)
    for path, items in ((args.data, comps), (args.val_data, val)):
        pairs = [(c["prompt"], r) for c in items for r in c["responses"]]
        _warn_truncated(state, path, pairs, tok, rm.config.block_size, "ranked responses")
    _warn_truncated(state, args.demos, demos, tok, rm.config.block_size, "demonstrations")
    with resuming(args.out, args.resume, _log(state)):
        returned = train_reward_model(rc, rm, tok, comps, val, demos, args.out, parallel=state, resume=args.resume)
    save_weights(args.out / "model.safetensors", rm, tokenizer=tok)
    return _finish(args, state, returned)


def _ppo_config(args, pc, n_prompts: int):
    """The PPO config of ``ppo``'s options: batch sizes fitted to ``n_prompts``, episodes and coefficients."""
    import dataclasses

    rollout = min(pc.rollout_batch_size, n_prompts)
    minibatch = min(pc.minibatch_size, rollout)
    if args.episodes is None:  # the preset's episode count, rounded down to whole rollout batches of these prompts
        episodes = max(rollout, pc.n_episodes // rollout * rollout)
    elif args.episodes % rollout:
        raise UserError(f"--episodes must be a multiple of the rollout batch size {rollout} (the preset's "
                        f"{pc.rollout_batch_size}, at most the number of prompts), got {args.episodes}")
    else:
        episodes = args.episodes
    if args.ptx_coef is not None and not args.ptx:
        raise UserError("--ptx-coef weighs PPO-ptx's pretraining term: give --ptx with it")
    coefs = {k: v for k, v in (("kl_coef", args.kl_coef), ("ptx_coef", args.ptx_coef)) if v is not None}
    return dataclasses.replace(pc, n_prompts=n_prompts, rollout_batch_size=rollout, minibatch_size=minibatch,
                               micro_batch_size=min(pc.micro_batch_size, minibatch), n_episodes=episodes, **coefs)


def cmd_ppo(args) -> dict:
    from instructrl_fast.train.assembly import ppo_models
    from instructrl_fast.train.batching import chunk_corpus
    from instructrl_fast.train.commands import ppo_prompts, ptx_documents
    from instructrl_fast.train.pipeline import resuming
    from instructrl_fast.train.ppo import train_ppo
    from instructrl_fast.weights import save_weights

    cfg, state = _setup(args)
    pc = cfg.ppo_ptx if args.ptx else cfg.ppo
    prompts = ppo_prompts(cfg, pc, args.prompts)
    pc = _ppo_config(args, pc, len(prompts))
    # A legacy RM (saved without its shape) has the policy's size unless --rm-size names another.
    rm_shape = _shape(cfg, args.rm_size or args.size, "--rm-size" if args.rm_size else "--size")
    policy, ref, value, rm, tok = ppo_models(_builder(cfg, state), args.init, args.rm,
                                             shape=_shape(cfg, args.size), rm_shape=rm_shape,
                                             tokenizer=args.tokenizer)
    limit = policy.config.block_size - pc.max_new_tokens  # PPOStage keeps the last `limit` tokens of bos + prompt
    if args.prompts is not None and state.is_main and (n := sum(len(tok.encode(p, bos=True)) > limit for p in prompts)):
        print(f"{PROG}: warning: {args.prompts}: {n} of {len(prompts)} prompts exceed {limit} tokens (block_size "
              f"{policy.config.block_size} less {pc.max_new_tokens} for the response, with bos); they are cut from "
              "the left", file=sys.stderr)
    ptx = chunk_corpus(ptx_documents(cfg, args.corpus), tok, pc.ptx_seq_len) if args.ptx else None
    with resuming(args.out, args.resume, _log(state)):
        ema, returned = train_ppo(pc, policy, value, ref, rm, tok, prompts, args.out, parallel=state, ptx_chunks=ptx,
                                  resume=args.resume)
    save_weights(args.out / "model.safetensors", ema, tokenizer=tok)
    return _finish(args, state, returned)


def _policy_specs(specs: list[str]) -> list[tuple[str, Path, str | None]]:
    """(name, path, size or None) of each ``--policy NAME=PATH[:SIZE]``."""
    out, names = [], set()
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise UserError(f"--policy must be NAME=PATH[:SIZE], got {spec!r}")
        if name in names:
            raise UserError(f"--policy names {name!r} twice")
        names.add(name)
        path, _, size = rest.partition(":")
        out.append((name, Path(path), size or None))
    return out


def cmd_eval(args) -> dict:
    from instructrl_fast.data import load_prompts_jsonl, save_jsonl
    from instructrl_fast.train.assembly import load_model
    from instructrl_fast.train.commands import answer_prompts, judge_policies

    cfg, state = _setup(args)
    builder = _builder(cfg, state)
    policies = {name: load_model(builder, path, shape=_shape(cfg, size), tokenizer=args.tokenizer)
                for name, path, size in _policy_specs(args.policy)}
    if args.prompts is not None:
        prompts = load_prompts_jsonl(args.prompts)
        if not prompts:
            raise UserError(f"{args.prompts}: no prompts")
        rows = answer_prompts(policies, prompts, cfg.eval, parallel=state)
        if state.is_main:  # every rank holds every response (respond gathers them); one rank writes them
            save_jsonl(args.out / "responses.jsonl", rows)
            print(f"wrote {len(rows)} rows to {args.out / 'responses.jsonl'}")
        return {"rows": len(rows)}
    results = judge_policies(policies, cfg.eval, data_seed=cfg.data_seed, parallel=state)
    _write(state, args.out, "eval.json", results)
    for n, r in results.items():
        if state.is_main:
            print(f"{n}: " + ", ".join(f"{k}={v:.0f}" if k == "n" else f"{k}={v:.3f}" for k, v in r.items()))
    return results


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU and stage, and time per PPO iteration, of a run on a cluster",
                       description="Plan a run: per GPU and per stage (sft, rm, ppo-rollout, ppo-train, "
                                   "ppo-ptx-train) the memory of each term against --gpu-memory, the largest "
                                   "micro-batches that fit and the time per PPO iteration. Parameter counts come "
                                   "from the model built on the meta device under a fake process group of the "
                                   "planned world (see instructrl_fast/plan.py for every formula).")
    p.add_argument("--preset", default=None, help="instructgpt-1.3b, instructgpt-6.7b or instructgpt-175b "
                                                  "(the trainer presets of GPT-3 shapes)")
    p.add_argument("--config", action="append", default=[], metavar="ROLE=NAME|JSON",
                   help="a model's shape (repeatable; ROLE: policy, reference, reward, value): a GPTConfig preset "
                        "such as gpt3-6.7b or a JSON file of GPTConfig fields")
    p.add_argument("--gpus", type=positive_int, required=True, help="GPUs in the run (dp = gpus / tp)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    p.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: the preset's setting, else off)")
    for name, what in (("sft", "SFT sequences"), ("rm", "RM prompts (each with --rm-responses sequences)"),
                       ("ppo", "PPO episodes"), ("rollout", "episodes generated at once per dp replica")):
        p.add_argument(f"--{name}-micro-batch", type=positive_int, default=None, help=f"{what} per micro-batch")
    p.add_argument("--rm-responses", type=int, default=None, help="K responses per ranked prompt (default 9)")
    p.add_argument("--seq-len", type=int, default=None, help="SFT / RM sequence length (default: the context)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per episode")
    p.add_argument("--response-len", type=int, default=None, help="generated tokens per episode")
    p.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak per GPU (default: H100 SXM, 989 bf16 / 495 TF32)")
    p.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth per GPU, TB/s (default 3.35)")
    p.add_argument("--interconnect-gbps", type=float, default=None,
                   help="network bandwidth per GPU across dp, GB/s (default 50: one 400 Gb/s NIC per GPU)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan(args) -> dict:
    from instructrl_fast import plan as planner

    configs = {}
    for item in args.config:
        role, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config must be ROLE=NAME|JSON, got {item!r}")
        try:
            configs[role] = planner.load_model_config(value)
        except TypeError as e:  # a JSON file with unknown or mistyped GPTConfig fields
            raise ValueError(f"--config {item!r}: {e}") from e
    try:
        spec = _plan_spec(args, configs)
    except ValueError as e:  # PlanSpec names its fields; the user knows them as options
        raise UserError(re.sub(r"(?:PlanSpec\.)?\b(" + "|".join(_PLAN_OPTIONS) + r")\b",
                               lambda m: _PLAN_OPTIONS[m.group(1)], str(e))) from e
    plan = planner.make_plan(spec)
    out = plan.to_json()
    print(json.dumps(out, indent=1) if args.json else plan.to_text())
    return out


# PlanSpec's fields as the options that set them, for error messages
_PLAN_OPTIONS = {"gpus": "--gpus", "tp": "--tp", "gpu_memory_gib": "--gpu-memory", "precision": "--precision",
                 "sft_micro_batch": "--sft-micro-batch", "rm_micro_batch": "--rm-micro-batch",
                 "ppo_micro_batch": "--ppo-micro-batch", "rollout_micro_batch": "--rollout-micro-batch",
                 "rm_responses": "--rm-responses", "seq_len": "--seq-len", "prompt_len": "--prompt-len",
                 "response_len": "--response-len", "mfu": "--mfu", "peak_tflops": "--peak-tflops",
                 "hbm_tbps": "--hbm-tbps", "interconnect_gbps": "--interconnect-gbps", "preset": "--preset"}


def _plan_spec(args, configs):
    from instructrl_fast import plan as planner

    return planner.preset_spec(
        args.preset, configs=configs, gpus=args.gpus, tp=args.tp, gpu_memory_gib=args.gpu_memory,
        precision=args.precision, activation_checkpointing=args.activation_checkpointing,
        sft_micro_batch=args.sft_micro_batch, rm_micro_batch=args.rm_micro_batch, rm_responses=args.rm_responses,
        ppo_micro_batch=args.ppo_micro_batch, rollout_micro_batch=args.rollout_micro_batch, seq_len=args.seq_len,
        prompt_len=args.prompt_len, response_len=args.response_len, mfu=args.mfu, peak_tflops=args.peak_tflops,
        hbm_tbps=args.hbm_tbps, interconnect_gbps=args.interconnect_gbps)


def cmd_export(args) -> dict:
    from instructrl_fast.data.tokenizer import load_tokenizer
    from instructrl_fast.train.export import export_gpt2

    tok = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    out, architecture = export_gpt2(args.path, args.out, module=args.module, tokenizer=tok)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote a {architecture} to {out} ({', '.join(files)})")
    if "tokenizer.json" not in files:
        print(f"{PROG}: note: no tokenizer was stored with {args.path}: give --tokenizer to write one",
              file=sys.stderr)
    return {"out": str(out), "architecture": architecture}


COMMANDS = {"run": cmd_run, "reproduce": cmd_reproduce, "sft": cmd_sft, "rm": cmd_rm, "ppo": cmd_ppo,
            "eval": cmd_eval, "plan": cmd_plan, "export": cmd_export}


def main(argv=None) -> int:
    """Parse ``argv`` and run its command. Returns the exit code: 0, or 2 for a user error (bad argument, file,
    shape or value), reported as ``instructrl-fast CMD: error: ...`` without a traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error (2) or the help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        from instructrl_fast.train.logging import progress_for_logs
        from instructrl_fast.train.preempt import Interrupted, Preempted, handling_signals

        with handling_signals(), progress_for_logs():
            COMMANDS[args.command](args)
        _teardown()
    except (ValueError, OSError, ImportError) as e:
        # ValueError: the library's argument checks and UserError; OSError: files that are missing,
        # unreadable or in the way; ImportError: an optional package (tokenizers, matplotlib) a given input needs.
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed (while torch was being imported)
        print(f"{PROG} {args.command}: stopped by SIGINT", file=sys.stderr)
        return 130
    except Preempted as e:
        _teardown()  # every rank stopped at the same step boundary
        _say(_stopped(args.command, e, argv))
        return e.exit_code
    except Interrupted as e:
        _say(f"{PROG} {args.command}: {e}" + ("" if args.command in ("plan", "export", "eval")
                                                else f"; {_resume_hint(argv)}"))
        return e.exit_code
    return 0


def _teardown() -> None:
    """Under torchrun: tear the process groups down before the interpreter exits."""
    if "torch.distributed" in sys.modules:
        from instructrl_fast.parallel import destroy_distributed

        destroy_distributed()


def _say(line: str) -> None:
    """Print ``line`` to stderr on the first rank only (every rank stops at the same step)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _resume_hint(argv) -> str:
    """How to continue: the same command line with --resume (and without --overwrite, which would delete it)."""
    import os
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--overwrite", "--resume")]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun: the same launch line, resuming
        return f"continue with the same torchrun line ending in: -m instructrl_fast.cli {shlex.join(args)} --resume"
    return f"continue with: {shlex.join([PROG, *args, '--resume'])}"


def _stopped(command: str, e, argv) -> str:
    """The one line a preempted command prints: which stage stopped where, its checkpoint and how to resume."""
    where = f"{e.stage} at step {e.step} of {e.max_steps}"
    saved = f"checkpoint {e.checkpoint}" if e.checkpoint is not None else "no checkpoint yet"
    return f"{PROG} {command}: {e} ({where}; {saved}); {_resume_hint(argv)}"


if __name__ == "__main__":
    sys.exit(main())
