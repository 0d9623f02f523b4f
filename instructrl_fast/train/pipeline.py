"""The whole InstructGPT recipe on the embedded task: ``instructrl-fast run`` and ``instructrl-fast reproduce``.

Per size: pretrain a base model ("GPT") -> SFT (16 epochs, candidates kept) -> one reward model, initialised from the
SFT model of ``rm_size`` and serving every size -> the SFT checkpoint chosen by mean RM score on validation prompts
-> the PPO starting policy (SFT recipe, 2 epochs, 10% pretraining data) -> PPO and PPO-ptx -> evaluation with the
gold labeler against the SFT model of the largest size (the paper's Figure 1 reference).

Output folder::

    <out>/base-<size>/  sft-<size>/  rm/  ppo-init-<size>/  ppo-<size>/  ppo-ptx-<size>/
        metrics.csv, tb/, ckpt/ (resumable), model.safetensors (the stage's result), learning_curves.png
    <out>/results.json  <out>/figure1.txt  <out>/figure1.png

``Pipeline.kl_sweep`` (``instructrl-fast reproduce --kl-sweep``) adds ``<out>/kl-sweep/beta-<beta>/`` (PPO stages)
and ``<out>/kl_sweep.json``, ``kl_sweep.txt``, ``kl_sweep.png``.

With ``resume``, a stage whose ``model.safetensors`` exists is loaded instead of trained, and an interrupted stage
continues from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from instructrl_fast.data import ByteTokenizer, DemoTask, GoldLabeler
from instructrl_fast.parallel import ParallelState
from instructrl_fast.train.assembly import RESULT, Builder, Shape, init_from, ppo_models
from instructrl_fast.train.batching import chunk_corpus
from instructrl_fast.train.checkpoint import latest_checkpoint
from instructrl_fast.train.config import PipelineConfig, model_config
from instructrl_fast.train.generation import respond
from instructrl_fast.train.ppo import train_ppo
from instructrl_fast.train.pretrain import corpus_loss, pretrain
from instructrl_fast.train.report import format_extras, format_shape, shape_checks
from instructrl_fast.train.reward import RewardModel, train_reward_model
from instructrl_fast.train.sft import candidates, select_by_reward, train_sft
from instructrl_fast.weights import load_weights, save_weights


def set_dropout(model: torch.nn.Module, p: float) -> torch.nn.Module:
    """Residual dropout of every nn.Dropout in ``model`` (SFT trains with 0.2; PPO, RM and eval use 0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    return model


@contextlib.contextmanager
def resuming(out_dir: str | os.PathLike, resume: bool, log=print, label: str = ""):
    """Around a stage's training into ``out_dir``: when ``resume``, log the checkpoint it continues from (or that
    there is none), and turn an unreadable checkpoint into a ValueError that names it and says what to do."""
    if not resume:
        yield
        return
    ckpt_dir = Path(out_dir) / "ckpt"
    ckpt = latest_checkpoint(ckpt_dir)
    log(f"{label}resuming from {ckpt}" if ckpt is not None else
        f"{label}nothing to resume in {ckpt_dir}: starting from the beginning")
    try:
        yield
    except Exception as e:
        # torch.load of a damaged state.pt raises whatever its unpickler meets (UnpicklingError, KeyError, EOFError,
        # a PytorchStreamReader RuntimeError): recognised by where it was raised, not by its type
        if ckpt is None or not any(f.f_code.co_filename.endswith(os.path.join("torch", "serialization.py"))
                                   for f, _ in traceback.walk_tb(e.__traceback__)):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"the checkpoint {ckpt} cannot be read ({type(e).__name__}: {first}); delete it to resume "
                         "from an older one, or run without --resume") from e


class Pipeline:
    """Runs the stages of ``cfg`` into ``out_dir``; each stage method returns its trained model."""

    def __init__(self, cfg: PipelineConfig, out_dir: str | os.PathLike, *, parallel: ParallelState,
                 resume: bool = False, log=print):
        self.cfg, self.out, self.resume, self.log = cfg, Path(out_dir), resume, log
        self.parallel = parallel  # every rank runs every stage; the first one writes the files
        self.tok = ByteTokenizer()
        self.task = DemoTask(cfg.data_seed)
        self.labeler = GoldLabeler(cfg.data_seed)
        self._chunks: dict[tuple, torch.Tensor] = {}
        self.timings: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}
        self.progress = cfg.sft.loop.progress
        self.builder = Builder.for_run(cfg, parallel)

    # ---------------------------------------------------------------------------------------------- helpers
    def chunks(self, n_docs: int, seq_len: int, split: str = "train") -> torch.Tensor:
        key = (n_docs, seq_len, split)
        if key not in self._chunks:
            docs = self.task.pretraining_corpus(n_docs, split=split)
            self._chunks[key] = chunk_corpus(docs, self.tok, seq_len)
        return self._chunks[key]

    def ptx_chunks(self, seq_len: int) -> torch.Tensor:
        """Pretraining windows for the SFT mix and PPO-ptx: the corpus of the smallest base model."""
        return self.chunks(self.cfg.pretrain[self.cfg.sizes[0]].n_docs, seq_len)

    def val_chunks(self) -> torch.Tensor:
        pc = self.cfg.pretrain[self.cfg.sizes[0]]
        return self.chunks(pc.micro_batch_size * max(pc.eval_batches, self.cfg.eval.n_ptx_batches) * 2, pc.seq_len,
                           "val")

    def shape(self, size: str) -> Shape:
        """The model shape of ``size`` (nothing is checked against it: the stages' files store their shapes)."""
        return Shape(config=lambda vocab: model_config(self.cfg.pretrain[size].model, vocab_size=vocab,
                                                       block_size=self.cfg.block_size))

    def model(self, size: str, head: str = "lm", *, seed: int = 0, frozen: bool = False) -> torch.nn.Module:
        """A GPT of ``size`` on the mesh (TP layers, FSDP2 over dp), initialised shard by shard from ``seed``."""
        return self.builder.build(self.shape(size).config(self.tok.vocab_size), head, frozen=frozen, seed=seed)

    def _result(self, name: str) -> Path | None:
        """The finished result of stage ``name`` when resuming, else None (the stage runs)."""
        path = self.out / name / RESULT
        if not (self.resume and path.is_file()):
            return None
        self.log(f"[{name}] finished earlier: loading {path}")
        return path

    def _timed(self, name: str, fn):
        """Run ``fn``, recording its wall time and this process's CPU time (the latter is what a shared machine
        cannot inflate: at one thread it is the wall time the stage takes on an idle core)."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        self.cpu_times[name] = self.cpu_times.get(name, 0.0) + time.process_time() - c0
        self.log(f"[{name}] {self.timings[name]:.0f}s (cpu {self.cpu_times[name]:.0f}s)")
        return out

    def _train(self, name: str, fn):
        """Run the training function ``fn`` of stage ``name`` (timed; resume reported)."""
        with resuming(self.out / name, self.resume, self.log, f"[{name}] "):
            return self._timed(name, fn)

    def _finish(self, name: str, module: torch.nn.Module) -> None:
        save_weights(self.out / name / RESULT, module, tokenizer=self.tok)
        if not self.parallel.is_main:
            return
        try:
            from instructrl_fast.train.evaluate import plot_learning_curves

            plot_learning_curves(self.out / name / "metrics.csv", self.out / name / "learning_curves.png")
        except (ImportError, RuntimeError) as e:  # matplotlib is optional
            self.log(f"[{name}] no learning-curve plot: {e}")

    # ---------------------------------------------------------------------------------------------- stages
    def base(self, size: str):
        """Pretrained base model ("GPT") of ``size``."""
        name, pc = f"base-{size}", self.cfg.pretrain[size]
        model = self.model(size, seed=pc.seed)
        if (done := self._result(name)) is not None:
            return load_weights(done, model)
        set_dropout(model, pc.dropout)
        torch.manual_seed(pc.seed)
        self._train(name, lambda: pretrain(pc, model, self.chunks(pc.n_docs, pc.seq_len), self.val_chunks(),
                                           self.out / name, parallel=self.parallel, resume=self.resume, name=name))
        self._finish(name, set_dropout(model, 0.0))
        return model

    def _demos(self, n: int) -> list[tuple[str, str]]:
        return [(d["prompt"], d["response"]) for d in self.task.demonstrations(n)]

    def _val_demos(self, n: int) -> list[tuple[str, str]]:
        return [(p.text, " " + p.answer) for p in self.task.prompts("val", n)]

    def sft(self, size: str, *, ppo_init: bool = False):
        """SFT of the base model: the baseline (all epochs; candidates kept) or the PPO starting policy."""
        sc = self.cfg.ppo_init if ppo_init else self.cfg.sft
        name = f"{'ppo-init' if ppo_init else 'sft'}-{size}"
        last = self.out / name / ("model.safetensors" if ppo_init else "last.safetensors")
        model = self.model(size)
        if self.resume and last.is_file():
            self.log(f"[{name}] finished earlier: loading {last}")
            return load_weights(last, model)
        load_weights(self.out / f"base-{size}" / RESULT, model)
        set_dropout(model, sc.dropout)
        ptx = self.ptx_chunks(self.cfg.pretrain[size].seq_len) if sc.ptx_fraction > 0 else None
        self._train(name, lambda: train_sft(sc, model, self.tok, self._demos(sc.n_demos), self._val_demos(64),
                                            self.out / name, parallel=self.parallel, ptx_chunks=ptx,
                                            resume=self.resume, name=name))
        set_dropout(model, 0.0)
        save_weights(last, model, tokenizer=self.tok)
        if ppo_init:
            self._finish(name, model)
        return model

    def reward_model(self) -> RewardModel:
        """One RM for every size, initialised from the last SFT epoch of ``rm_size``, centred on demonstrations."""
        rc, size = self.cfg.rm, self.cfg.rm_size
        sft = load_weights(self.out / f"sft-{size}" / "last.safetensors", self.model(size))
        rm = RewardModel(init_from(self.model(size, "scalar"), sft))
        if (done := self._result("rm")) is not None:
            return load_weights(done, rm).eval()
        n = rc.n_comparisons + rc.n_val_comparisons
        sampled = self._timed("rm-samples", lambda: self.sample_responses(sft, self.task.comparison_prompts(n),
                                                                           rc.model_samples, seed=rc.seed))
        data = self.task.comparisons(n, self.labeler, sampled=sampled)
        train_c, val_c = data[:rc.n_comparisons], data[rc.n_comparisons:]
        if self.parallel.is_main:
            (self.out / "rm").mkdir(parents=True, exist_ok=True)
            (self.out / "rm" / "val_comparisons.json").write_text(json.dumps(val_c))  # for rm_report
        metrics = self._train("rm", lambda: train_reward_model(rc, rm, self.tok, train_c, val_c,
                                                               self._demos(256), self.out / "rm",
                                                               parallel=self.parallel, resume=self.resume,
                                                               name="rm"))
        self.log(f"[rm] {metrics}")
        self._finish("rm", rm)
        return rm.eval()

    def rm_report(self, rm: RewardModel) -> dict[str, float]:
        """The RM's pairwise accuracy on the held-out comparisons: against their (noisy) rankings, the paper's
        validation accuracy, and against the gold scores, what the RM should have learned."""
        from instructrl_fast.train import evaluate as ev
        from instructrl_fast.train.reward import score_texts

        val = json.loads((self.out / "rm" / "val_comparisons.json").read_text())
        score = lambda prompts, responses: score_texts(rm, self.tok, list(zip(prompts, responses)))
        return {"accuracy_vs_rankings": ev.rm_accuracy(score, val, self.labeler, against="labels"),
                "accuracy_vs_gold": ev.rm_accuracy(score, val, self.labeler, against="gold"),
                "n_val_comparisons": len(val)}

    def sample_responses(self, model, prompts, k: int, *, seed: int) -> list[list[str]] | None:
        """``k`` responses per prompt sampled at temperature 1 (the RM's comparison data); None when k is 0."""
        if k == 0:
            return None
        texts = [p.text for p in prompts for _ in range(k)]
        out = []  # per 256 texts for the progress bar; each such call is its own draw, so the keys never repeat
        for i in tqdm(range(0, len(texts), 256), desc="rm-samples", disable=not self.progress):
            out += respond(model, self.tok, texts[i:i + 256], max_new_tokens=self.cfg.ppo.max_new_tokens,
                           parallel=self.parallel, temperature=1.0, batch_size=256, seed=seed, draw=i // 256)
        return [out[i * k:(i + 1) * k] for i in range(len(prompts))]

    def select_sft(self, size: str, rm: RewardModel):
        """The SFT checkpoint of ``size`` with the best mean RM score on validation prompts (paper C.1)."""
        name, sc = f"sft-{size}", self.cfg.sft
        model = self.model(size)
        if (done := self._result(name)) is not None:
            return load_weights(done, model)
        prompts = [p.text for p in self.task.prompts("val", sc.n_val_prompts)]
        best, scores = select_by_reward(candidates(self.out / name), model, rm, self.tok, prompts,
                                        max_new_tokens=sc.max_new_tokens, parallel=self.parallel)
        self.log(f"[{name}] RM score per candidate {scores}; chose {best.stem}")
        if self.parallel.is_main:
            (self.out / name / "selection.json").write_text(json.dumps({"scores": scores, "chosen": best.stem}))
        self._finish(name, model)
        return model

    def ppo(self, size: str, *, ptx: bool):
        """PPO (or PPO-ptx) from the PPO starting policy against the RM in ``rm/`` (``assembly.ppo_models``: the
        value model starts from the RM). Returns the EMA."""
        return self._ppo(f"{'ppo-ptx' if ptx else 'ppo'}-{size}", size, self.cfg.ppo_ptx if ptx else self.cfg.ppo)

    def _ppo(self, name: str, size: str, pc, source: Path | None = None):
        """PPO stage ``name`` with config ``pc`` from ``<source>/ppo-init-<size>`` and ``<source>/rm`` (default: this
        run's own folders)."""
        if (done := self._result(name)) is not None:
            return load_weights(done, self.model(size))
        source = self.out if source is None else source
        policy, ref, value, frozen_rm, _ = ppo_models(self.builder, source / f"ppo-init-{size}" / RESULT,
                                                      source / "rm" / RESULT, shape=self.shape(size),
                                                      rm_shape=self.shape(self.cfg.rm_size))
        prompts = [p.text for p in self.task.prompts("train", pc.n_prompts)]
        ptx_chunks = self.chunks(self.cfg.pretrain[self.cfg.sizes[0]].n_docs, pc.ptx_seq_len) if pc.ptx_coef else None
        torch.manual_seed(pc.seed)
        ema, _ = self._train(name, lambda: train_ppo(pc, policy, value, ref, frozen_rm, self.tok, prompts,
                                                     self.out / name, parallel=self.parallel, ptx_chunks=ptx_chunks,
                                                     resume=self.resume, gold_fn=self.gold_scores, name=name))
        self._finish(name, ema)
        return ema

    def gold_scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The gold labeler's score of each (prompt text, response): the true reward PPO's RM stands in for."""
        return [self.labeler.score(p, r) for p, r in zip(prompts, responses)]

    def overoptimization(self, name: str, steps_per_iteration: int):
        """(KL to the PPO start, RM score, gold score) of every rollout batch of PPO stage ``name`` (read from the
        first optimizer step of each iteration, which logs that batch's statistics) and where the gold score
        peaked; None when the stage's metrics hold no gold column (a run from before it was logged)."""
        import csv

        from instructrl_fast.train import evaluate as ev

        with open(self.out / name / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f)
                    if r.get("gold") and (int(r["step"]) - 1) % steps_per_iteration == 0]
        if len(rows) < 2:
            return None
        points = [(max(0.0, float(r["kl"])), float(r["score"]), float(r["gold"])) for r in rows]
        return points, ev.overoptimization_summary(points)

    # ---------------------------------------------------------------------------------------------- evaluation
    def answers(self, model, prompts, *, temperature: float, prefix: str = "") -> list[str]:
        """``model``'s responses to the evaluation ``prompts`` (greedy at temperature 0)."""
        from instructrl_fast.train import evaluate as ev

        # one call over every prompt: prompt i samples with the keys (seed, i) whatever the model, the same random
        # numbers for every policy compared
        ec = self.cfg.eval
        texts = [prefix + p.text for p in prompts]
        return ev.collect_responses(respond(model, self.tok, texts, max_new_tokens=ec.max_new_tokens,
                                            parallel=self.parallel, temperature=temperature, seed=ec.seed), prompts)

    def references(self, reference: torch.nn.Module, prompts) -> dict[str, list[str]]:
        """The reference model's answers, decoded both ways ``judge`` decodes a policy's."""
        return {mode: self.answers(reference, prompts, temperature=t) for mode, t in self._modes()}

    def _modes(self) -> tuple[tuple[str, float], ...]:
        # (record key prefix, temperature): the configured decoding (greedy by default), and sampling at T=1, what
        # PPO optimises and what shows the mass a policy still puts on bad answers (toxicity)
        return ("", self.cfg.eval.temperature), ("sampled/", 1.0)

    def judge(self, model, prompts, references: dict[str, list[str]], prefix: str = "") -> dict[str, float]:
        """Gold-labeler metrics of ``model`` (``evaluate.evaluate_policy``) and its win rate against the
        reference's answers decoded the same way: keys as evaluate_policy's for the configured decoding, prefixed
        with ``sampled/`` for sampling at temperature 1."""
        from instructrl_fast.train import evaluate as ev

        out = {}
        for mode, t in self._modes():
            responses = self.answers(model, prompts, temperature=t, prefix=prefix)
            found = {**ev.evaluate_policy(responses, prompts, self.labeler),
                     "win_rate": ev.win_rate(responses, references[mode], prompts, self.labeler, self.cfg.eval.seed)}
            out.update({mode + k: v for k, v in found.items()})
        return out

    def evaluate(self, models: dict[str, dict[str, torch.nn.Module]], reference: torch.nn.Module) -> list[dict]:
        """One record per (size, method): gold-labeler metrics and win rate against ``reference``, greedy and
        sampled (``judge``), and the corpus loss."""
        prompts = self.task.prompts("test", self.cfg.eval.n_test_prompts)
        refs = self.references(reference, prompts)
        records = []
        todo = [(size, method, model) for size, by_method in models.items() for method, model in by_method.items()]
        for size, method, model in tqdm(todo, desc="eval", disable=not self.progress):
            prefix = self.task.few_shot_prefix() if method == "GPT (prompted)" else ""
            rec = {"method": method, "size": size, "params": model.num_params(local=False),
                   **self.judge(model, prompts, refs, prefix), "ptx_loss": self.corpus_loss(model)}
            records.append(rec)
            self.log(f"[eval] {size} {method}: win {rec['win_rate']:.3f} / sampled {rec['sampled/win_rate']:.3f} "
                     f"gold {rec['gold_score']:+.3f} / {rec['sampled/gold_score']:+.3f} correct {rec['correct']:.3f} "
                     f"toxic {rec['toxic_rate']:.3f} / {rec['sampled/toxic_rate']:.3f} ptx_loss {rec['ptx_loss']:.3f}")
        return records

    def corpus_loss(self, model) -> float:
        """Held-out pretraining-corpus NLL: the alignment-tax probe."""
        pc = self.cfg.pretrain[self.cfg.sizes[0]]
        return corpus_loss(model, self.val_chunks(), pc.micro_batch_size, self.cfg.eval.n_ptx_batches,
                           parallel=self.parallel)

    # ---------------------------------------------------------------------------------------------- the recipe
    def run(self) -> dict:
        """Every stage for every size, then the evaluation; writes results.json, figure1.txt and figure1.png."""
        from instructrl_fast.train import evaluate as ev

        t0 = time.perf_counter()
        cfg = self.cfg
        bases = {s: self.base(s) for s in cfg.sizes}
        for s in cfg.sizes:
            self.sft(s)
        rm = self.reward_model()
        models: dict[str, dict[str, torch.nn.Module]] = {}
        init_loss = {}
        for s in cfg.sizes:
            models[s] = {"GPT": bases[s], "GPT (prompted)": bases[s], "SFT": self.select_sft(s, rm)}
            init_loss[s] = self.corpus_loss(self.sft(s, ppo_init=True))
            models[s]["PPO"] = self.ppo(s, ptx=False)
            models[s]["PPO-ptx"] = self.ppo(s, ptx=True)
        records = self._timed("eval", lambda: self.evaluate(models, reference=models[cfg.sizes[-1]]["SFT"]))
        rm_report = self.rm_report(rm)
        overopt = {}
        for s in cfg.sizes:
            for name, pc in ((f"ppo-{s}", cfg.ppo), (f"ppo-ptx-{s}", cfg.ppo_ptx)):
                if (found := self.overoptimization(name, pc.steps_per_iteration)) is not None:
                    overopt[name] = {"points": found[0], **found[1]}
        if not self.parallel.is_main:  # every rank computed the same report; the first one writes it
            return {"preset": cfg.name, "sizes": list(cfg.sizes), "results": records}
        largest = cfg.sizes[-1]  # the plot: both PPO runs of the largest size
        runs = {f"{method} ({largest})": overopt[name]["points"]
                for method, name in (("PPO", f"ppo-{largest}"), ("PPO-ptx", f"ppo-ptx-{largest}")) if name in overopt}
        if runs:
            ev.plot_overoptimization(runs, self.out / "overoptimization.png")
        wall = time.perf_counter() - t0
        report = {"preset": cfg.name, "sizes": list(cfg.sizes), "results": records,
                  "shape": shape_checks(records, init_loss), "rm": rm_report, "overoptimization": overopt,
                  "timings_s": self.timings, "cpu_s": self.cpu_times, "wall_s": wall,
                  "threads": torch.get_num_threads()}
        (self.out / "results.json").write_text(json.dumps(report, indent=1))
        reference = f"SFT ({cfg.sizes[-1]})"
        sampled = [{**r, "win_rate": r["sampled/win_rate"]} for r in records]
        table = (ev.figure1_table(records, reference=reference) + "\n\n"
                 + ev.figure1_table(sampled, reference=f"{reference}, both sampled at T=1") + "\n\n"
                 + format_shape(report["shape"]) + "\n\n"
                 + format_extras(records, rm_report, overopt, self.task.heldout, self.task.heldout_twin))
        (self.out / "figure1.txt").write_text(table + "\n")
        self.log(table)
        ev.plot_figure1(records, self.out / "figure1.png", reference=reference)
        self.log(f"total {wall:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in self.timings.items())})")
        return report

    def kl_sweep(self, size: str, source: Path | None = None) -> dict:
        """PPO from the PPO init of ``size`` and the RM at each beta of ``cfg.kl_sweep``, everything else as the
        preset's plain PPO (PPO-ptx with ``cfg.kl_sweep.ptx``), into ``kl-sweep/beta-<beta>/`` (``ptx-beta-<beta>``);
        each run's EMA judged against the SFT model of ``size`` (``judge``: greedy and sampled), and each run's (KL,
        RM score, gold score) per rollout batch.

        ``source``: a finished run's folder holding ``sft-<size>/``, ``rm/`` and ``ppo-init-<size>/``; without it
        those stages of ``run`` train into this run's folder first. Writes kl_sweep.json, kl_sweep.txt and
        kl_sweep.png."""
        from instructrl_fast.train import evaluate as ev
        from instructrl_fast.train.report import format_kl_sweep

        t0 = time.perf_counter()
        sc = self.cfg.kl_sweep
        if source is None:
            self.base(size)
            self.sft(size)
            sft = self.select_sft(size, self.reward_model())
            self.sft(size, ppo_init=True)
        else:
            sft = load_weights(source / f"sft-{size}" / RESULT, self.model(size))
        pc = self.cfg.ppo_ptx if sc.ptx else self.cfg.ppo
        pc = pc if sc.n_episodes is None else dataclasses.replace(pc, n_episodes=sc.n_episodes)
        prompts = self.task.prompts("test", self.cfg.eval.n_test_prompts)
        refs = self._timed("eval", lambda: self.references(sft, prompts))
        rows = []
        for beta in sc.betas:
            name = f"kl-sweep/{'ptx-' if sc.ptx else ''}beta-{beta:g}"
            policy = self._ppo(name, size, dataclasses.replace(pc, kl_coef=beta), source)
            row = {"beta": beta, **self._timed("eval", lambda p=policy: self.judge(p, prompts, refs))}
            if (found := self.overoptimization(name, pc.steps_per_iteration)) is not None:
                row.update(found[1], points=found[0])
            rows.append(row)
            self.log(f"[{name}] win {row['win_rate']:.3f} / sampled {row['sampled/win_rate']:.3f}, gold "
                     f"{row['gold_score']:+.3f} / {row['sampled/gold_score']:+.3f}")
        report = {"preset": self.cfg.name, "size": size, "method": "PPO-ptx" if sc.ptx else "PPO",
                  "heldout": self.task.heldout,
                  "source": str(source or self.out), "n_episodes": pc.n_episodes,
                  "kl_sweep": rows, "timings_s": self.timings, "cpu_s": self.cpu_times,
                  "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
        if not self.parallel.is_main:
            return report
        (self.out / "kl_sweep.json").write_text(json.dumps(report, indent=1))
        text = format_kl_sweep(report, reference=f"SFT ({size})")
        (self.out / "kl_sweep.txt").write_text(text + "\n")
        self.log(text)
        ev.plot_kl_sweep(rows, self.out / "kl_sweep.png", reference=f"SFT ({size})")
        self.log(f"total {report['wall_s']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in self.timings.items())})")
        return report
