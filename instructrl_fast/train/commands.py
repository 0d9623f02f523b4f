"""What the one-stage commands (``sft``, ``rm``, ``ppo``, ``eval``) run besides their stage: their data, read from
the user's JSONL files or drawn from the embedded task, and the evaluation of a set of policies. The command line
parses the options, builds the configs and calls these; a problem with the input is a ValueError naming the file.
"""

from __future__ import annotations

from pathlib import Path

from instructrl_fast.data import DemoTask, GoldLabeler, load_comparisons_jsonl, load_prompts_jsonl, load_sft_jsonl
from instructrl_fast.parallel.dist import ParallelState
from instructrl_fast.train import evaluate as ev
from instructrl_fast.train.config import EvalConfig, PipelineConfig, PPOConfig
from instructrl_fast.train.generation import respond


def pairs(records) -> list[tuple[str, str]]:
    """(prompt, response) of each ``{prompt, response}`` record."""
    return [(r["prompt"], r["response"]) for r in records]


def split_val(items: list, n_val: int, path: Path) -> tuple[list, list]:
    """(train, validation): 10% of ``items`` (at least 1, at most ``n_val``) held out for validation."""
    if len(items) < 2:
        raise ValueError(f"{path} holds {len(items)} record(s): at least 2 are needed when one is held out for "
                         "validation (or give --val-data)")
    n_val = min(n_val, max(1, len(items) // 10))
    return items[n_val:], items[:n_val]


def sft_data(cfg: PipelineConfig, data: Path | None, val_data: Path | None):
    """(demonstrations, validation pairs) of ``sft``: from ``data`` (JSONL of {prompt, response}; validation from
    ``val_data``, else 10% of ``data``, at most 64) or the embedded task's ``cfg.sft.n_demos``."""
    if data is not None:
        demos = pairs(load_sft_jsonl(data))
        val = pairs(load_sft_jsonl(val_data)) if val_data else None
        if val is None:
            demos, val = split_val(demos, 64, data)
    else:
        task = DemoTask(cfg.data_seed)
        demos = pairs(task.demonstrations(cfg.sft.n_demos))
        val = [(p.text, " " + p.answer) for p in task.prompts("val", 64)]
    if not demos:
        raise ValueError(f"{data}: no demonstrations to train on")
    return demos, val


def rm_data(cfg: PipelineConfig, data: Path | None, val_data: Path | None, demos_path: Path | None):
    """(comparisons, validation comparisons, demonstrations) of ``rm``: comparisons from ``data`` (JSONL of
    {prompt, responses, ranking}; validation from ``val_data``, else 10% of ``data``) or the embedded task; the
    demonstrations the RM is centred on from ``demos_path``, else the best-ranked response of each comparison."""
    rc = cfg.rm
    if data is not None:
        comps = load_comparisons_jsonl(data)
        val = load_comparisons_jsonl(val_data) if val_data else None
        if val is None:
            comps, val = split_val(comps, rc.n_val_comparisons, data)
    else:
        task = DemoTask(cfg.data_seed)
        found = task.comparisons(rc.n_comparisons + rc.n_val_comparisons, GoldLabeler(cfg.data_seed))
        comps, val = found[:rc.n_comparisons], found[rc.n_comparisons:]
    if not comps:
        raise ValueError(f"{data}: no comparisons to train on")
    demos = (pairs(load_sft_jsonl(demos_path)) if demos_path is not None
             else [(c["prompt"], c["responses"][c["ranking"][0]]) for c in comps])
    return comps, val, demos


def ppo_prompts(cfg: PipelineConfig, pc: PPOConfig, path: Path | None) -> list[str]:
    """The prompt texts of ``ppo``: from ``path`` (JSONL of {prompt}) or the embedded task's ``pc.n_prompts``."""
    if path is not None:
        prompts = [p.text for p in load_prompts_jsonl(path)]
    else:
        prompts = [p.text for p in DemoTask(cfg.data_seed).prompts("train", pc.n_prompts)]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def ptx_documents(cfg: PipelineConfig, corpus: Path | None) -> list[str]:
    """PPO-ptx's pretraining documents: ``corpus`` (documents separated by blank lines) or the embedded corpus of
    the smallest base model."""
    if corpus is None:
        return DemoTask(cfg.data_seed).pretraining_corpus(cfg.pretrain[cfg.sizes[0]].n_docs)
    docs = [d.strip() for d in corpus.read_text().split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"{corpus}: no documents (separate documents with a blank line)")
    return docs


def _generators(policies: dict, ec: EvalConfig, parallel: ParallelState) -> dict:
    # respond() keys prompt i's draws to (ec.seed, i): one call over all prompts, not collect_responses' chunks
    return {name: (lambda texts, m=model, t=tok: respond(m, t, texts, max_new_tokens=ec.max_new_tokens,
                                                         parallel=parallel, temperature=ec.temperature, seed=ec.seed))
            for name, (model, tok) in policies.items()}


def answer_prompts(policies: dict, prompts: list, ec: EvalConfig, *, parallel: ParallelState) -> list[dict]:
    """One row per prompt (``data.Prompt``): {"prompt": text, name: response of each policy}. ``policies``: name ->
    (model, tokenizer). The same on every rank (a collective over dp)."""
    gen = _generators(policies, ec, parallel)
    texts = [p.text for p in prompts]
    answers = [ev.collect_responses(g(texts), prompts) for g in gen.values()]
    return [{"prompt": p.text, **dict(zip(gen, resp))} for p, *resp in zip(prompts, *answers)]


def judge_policies(policies: dict, ec: EvalConfig, *, data_seed: int, parallel: ParallelState) -> dict[str, dict]:
    """Gold-labeler metrics (``evaluate.evaluate_policy``) and win rate against the first policy of each of
    ``policies`` (name -> (model, tokenizer)) on ``ec.n_test_prompts`` test prompts of the embedded task."""
    task, labeler = DemoTask(data_seed), GoldLabeler(data_seed)
    prompts = task.prompts("test", ec.n_test_prompts)
    gen = _generators(policies, ec, parallel)
    answers = {n: ev.collect_responses(g([p.text for p in prompts]), prompts) for n, g in gen.items()}
    reference = next(iter(answers))
    return {n: {**ev.evaluate_policy(a, prompts, labeler),
                "win_rate": ev.win_rate(a, answers[reference], prompts, labeler, ec.seed)}
            for n, a in answers.items()}
