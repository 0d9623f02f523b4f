"""What makes the demo's held-out instruction kind answerable: base + SFT at size s under three task variants.

The demo holds out ``top``: the ``max`` skill under a word only the pretraining corpus uses, in the same shape (a
three-letter word, three digits). Two variants replace it, everything else equal:
  - ``largest``: the same skill under a longer word, which moves the digits to other offsets;
  - ``min``: a skill fine-tuning never teaches, under a pretraining-only word of the same shape.
For each variant this trains the demo preset's base model and SFT model of size s (the last SFT epoch; ``run``
selects among epochs by RM score, so its SFT model can differ) and prints, for the prompted base model ("GPT
(prompted)") and the SFT model, greedy and sampled at T=1, the share of right answers on the held-out kind and on
``max`` (its trained twin), over ``--prompts-per-kind`` test prompts of each kind.

    python bench/heldout_ablation.py --out runs/heldout-ablation     # about 3 min of CPU per variant at 1 thread

``--run RUN`` instead judges the five models of a finished ``instructrl-fast run`` (size s: GPT, GPT (prompted),
SFT, PPO, PPO-ptx) on ``--prompts-per-kind`` prompts of ``top`` and of ``max`` (``run`` itself sees 32 of each, too
few to compare models on one kind).

Writes ``heldout_ablation.json`` (``heldout_run.json`` with ``--run``) under ``--out``, and a copy in
bench/results/instructgpt_demo/heldout/ unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrl_fast.data import task as demo_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "instructgpt_demo" / "heldout"


def _solve_min(arg: str) -> str:
    return str(min(int(d) for d in arg.split()))


def _wrong_min(arg: str, rng) -> str:
    vals = [int(d) for d in arg.split()]
    return rng.choice([str(max(vals)), str(vals[0]), str(min(vals) + 1)])


# each a kind spec like KINDS' entries (argument maker, solver, wrong-answer maker), built from max's
VARIANTS = {
    "top": None,  # the demo task as it is
    "largest": demo_task.KINDS["max"],
    "min": dataclasses.replace(demo_task.KINDS["max"], solve=_solve_min, wrong=_wrong_min),
}


@contextlib.contextmanager
def task_variant(heldout: str):
    """The demo task with ``heldout`` in place of ``top`` (in the pretraining corpus and the test split)."""
    kinds, saved = demo_task.KINDS, dict(demo_task.KINDS)
    saved_cls, saved_init = demo_task.DemoTask.kinds, demo_task.DemoTask.__init__
    try:
        if VARIANTS[heldout] is not None:
            kinds.pop("top")
            kinds[heldout] = VARIANTS[heldout]
            demo_task.DemoTask.kinds = tuple(kinds)

            def init(self, seed=0, *, heldout=heldout, courtesy=0.6):
                saved_init(self, seed, heldout=heldout, courtesy=courtesy)

            demo_task.DemoTask.__init__ = init
        yield
    finally:
        kinds.clear()
        kinds.update(saved)
        demo_task.DemoTask.kinds, demo_task.DemoTask.__init__ = saved_cls, saved_init


def measure(heldout: str, out: Path, per_kind: int) -> dict:
    from instructrl_fast.parallel import init_distributed
    from instructrl_fast.train.config import preset

    with task_variant(heldout):
        pipe = _pipeline(preset("demo").only("s"), out / heldout, init_distributed(1))
        t0 = time.process_time()
        base, sft = pipe.base("s"), pipe.sft("s")
        cpu = time.process_time() - t0
        prompts = [p for p in pipe.task.prompts("test", per_kind * len(pipe.task.kinds))
                   if p.kind in (heldout, "max")]
        row = {"heldout": heldout, "n_per_kind": per_kind, "train_cpu_s": round(cpu, 1)}
        for name, model, prefix in (("GPT (prompted)", base, pipe.task.few_shot_prefix()), ("SFT", sft, "")):
            row.update({f"{name} {key}": v for key, v in _correct(pipe, model, prompts, prefix, heldout).items()})
    return row


def _correct(pipe, model, prompts, prefix: str, heldout: str) -> dict[str, float]:
    """``model``'s share of right answers on ``heldout`` and on ``max``, keyed "<greedy|sampled> <kind>"."""
    from instructrl_fast.train import evaluate as ev

    out = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        found = ev.evaluate_policy(pipe.answers(model, prompts, temperature=temperature, prefix=prefix), prompts,
                                   pipe.labeler)
        out.update({f"{mode} {kind}": found[f"correct/{kind}"] for kind in (heldout, "max")})
    return out


def judge_run(run: Path, per_kind: int) -> list[dict]:
    """Right answers on ``top`` and ``max`` of each model of the finished size-s ``run``, greedy and sampled."""
    from instructrl_fast.parallel import init_distributed
    from instructrl_fast.train.assembly import RESULT
    from instructrl_fast.train.config import preset
    from instructrl_fast.weights import load_weights

    pipe = _pipeline(preset("demo").only("s"), run, init_distributed(1))
    prompts = [p for p in pipe.task.prompts("test", per_kind * len(pipe.task.kinds)) if p.kind in ("top", "max")]
    models = {"GPT": ("base-s", ""), "GPT (prompted)": ("base-s", pipe.task.few_shot_prefix()), "SFT": ("sft-s", ""),
              "PPO": ("ppo-s", ""), "PPO-ptx": ("ppo-ptx-s", "")}
    rows = []
    for method, (stage, prefix) in models.items():
        model = load_weights(run / stage / RESULT, pipe.model("s"))
        rows.append({"method": method, "stage": stage, "n_per_kind": per_kind,
                     **_correct(pipe, model, prompts, prefix, "top")})
    return rows


def _pipeline(cfg, out: Path, parallel):
    from instructrl_fast.train.pipeline import Pipeline

    return Pipeline(cfg, out, parallel=parallel, resume=True, log=lambda *a: None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/heldout-ablation"), help="training folders")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {tuple(VARIANTS)}")
    p.add_argument("--prompts-per-kind", type=int, default=64, help="test prompts of each kind (default 64)")
    p.add_argument("--run", type=Path, default=None, metavar="RUN",
                   help="judge the models of this finished `instructrl-fast run` (size s) instead of training")
    p.add_argument("--no-save", action="store_true", help="do not copy the JSON into bench/results/")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {bad}; choose from {tuple(VARIANTS)}")
    if args.prompts_per_kind < 1:
        p.error(f"--prompts-per-kind must be >= 1, got {args.prompts_per_kind}")
    torch.set_num_threads(1)
    from bench.common import git_sha

    if args.run is not None:
        if not (args.run / "ppo-ptx-s" / "model.safetensors").is_file():
            p.error(f"--run {args.run}: no finished `instructrl-fast run` of size s there (no ppo-ptx-s/)")
        rows = judge_run(args.run, args.prompts_per_kind)
        print(f"{args.run}: right answers on top (held out) / on max (trained), {args.prompts_per_kind} prompts each; "
              f"greedy | sampled at T=1")
        for r in rows:
            print(f"  {r['method']:<15} {r['greedy top']:.3f} / {r['greedy max']:.3f} | "
                  f"{r['sampled top']:.3f} / {r['sampled max']:.3f}")
        _write(args, "heldout_run.json", {"git_sha": git_sha(), "threads": 1, "run": str(args.run), "rows": rows})
        return
    rows = []
    for v in variants:
        rows.append(measure(v, args.out, args.prompts_per_kind))
        r = rows[-1]
        print(f"held-out {v:<8} (trained {r['train_cpu_s']:.0f} s CPU)  correct on {v} / on max, greedy | sampled:")
        for name in ("GPT (prompted)", "SFT"):
            print(f"  {name:<15} {r[f'{name} greedy {v}']:.3f} / {r[f'{name} greedy max']:.3f} | "
                  f"{r[f'{name} sampled {v}']:.3f} / {r[f'{name} sampled max']:.3f}", flush=True)
    _write(args, "heldout_ablation.json", {"git_sha": git_sha(), "threads": 1, "rows": rows})


def _write(args, name: str, report: dict) -> None:
    for folder in (args.out, None if args.no_save else RESULTS):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
