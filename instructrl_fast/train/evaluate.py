"""Evaluation with the gold labeler, written against callables so it never depends on trainer internals.

A *generator* is either a callable ``texts: list[str] -> responses: list[str]`` (one response per prompt text,
without the prompt, cut at EOS) or an already computed list of responses; ``collect_responses`` turns either into
the list, so one generation can serve ``evaluate_policy`` and ``win_rate``.

What the paper reports and where it is computed here:
  - Figure 1 (win rate against the 175B SFT model, per method and size): ``win_rate``, ``figure1_table``,
    ``plot_figure1``.
  - Figures 4/6 (labeler-judged quality, toxicity, held-out instructions): ``evaluate_policy``.
  - RM validation accuracy (Section 5.1; ~72 %, bounded by labeler agreement): ``rm_accuracy``.
  - The alignment tax (public NLP regressions, Figure 29): ``pretrain_loss`` on held-out corpus docs.
  - Reward over-optimisation (gold vs RM reward as KL grows; Stiennon et al. 2020, Figure 5):
    ``overoptimization_summary`` and ``plot_overoptimization``; across KL coefficients: ``plot_kl_sweep``.
Plots need matplotlib; without it they warn and return None, so a run never fails at its last step.
"""

from __future__ import annotations

import csv
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence

from instructrl_fast.checks import check_positive_int
from instructrl_fast.data.labeler import GoldLabeler, as_rng
from instructrl_fast.data.task import Prompt, parse_prompt

# A generator: a callable texts -> responses, or the responses already computed.
Responses = Callable[[list[str]], Sequence[str]] | Sequence[str]
# Figure 1's methods, in the paper's order (worst to best); other names are listed after them.
METHODS = ("GPT", "GPT (prompted)", "SFT", "PPO", "PPO-ptx")


# ---------------------------------------------------------------------------------------------- helpers


def _as_prompts(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, Prompt)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of Prompt or prompt texts, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    return [p if isinstance(p, Prompt) else parse_prompt(p) for p in prompts]


def _check_labeler(labeler) -> GoldLabeler:
    if not isinstance(labeler, GoldLabeler):
        raise TypeError(f"labeler must be a GoldLabeler, got {type(labeler).__name__}")
    return labeler


def _floats(values, name: str, n: int) -> list[float]:
    """A callable's output (list of numbers or 1-D tensor) as n Python floats; one host read per batch."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} returned {len(values)} values for {n} inputs")
    return [float(v) for v in values]


def collect_responses(generator: Responses, prompts: Sequence[Prompt | str], *, batch_size: int = 64) -> list[str]:
    """The responses of ``generator`` to ``prompts``: a callable is called on batches of ``batch_size`` prompt texts,
    a list is checked for length and returned."""
    texts = [p.text if isinstance(p, Prompt) else p for p in _as_prompts(prompts)]
    if callable(generator):
        bs = check_positive_int("batch_size", batch_size)
        out: list[str] = []
        for i in range(0, len(texts), bs):
            chunk = list(generator(texts[i:i + bs]))
            if len(chunk) != len(texts[i:i + bs]):
                raise ValueError(f"generator returned {len(chunk)} responses for {len(texts[i:i + bs])} prompts")
            out += chunk
    elif isinstance(generator, Sequence) and not isinstance(generator, str):
        out = list(generator)
        if len(out) != len(texts):
            raise ValueError(f"generator holds {len(out)} responses for {len(texts)} prompts")
    else:
        raise TypeError(f"generator must be a callable or a list of responses, got {type(generator).__name__}")
    for i, r in enumerate(out):
        if not isinstance(r, str):
            raise TypeError(f"generator's response {i} must be a str, got {type(r).__name__}")
    return out


def with_prefix(generate_fn: Callable[[list[str]], Sequence[str]], prefix: str) -> Callable[[list[str]], list[str]]:
    """``generate_fn`` with ``prefix`` (e.g. ``DemoTask.few_shot_prefix()``) put before every prompt: the paper's
    "GPT (prompted)" baseline."""
    if not callable(generate_fn):
        raise TypeError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return lambda texts: list(generate_fn([prefix + t for t in texts]))


# ---------------------------------------------------------------------------------------------- policy quality


def evaluate_policy(generator: Responses, prompts: Sequence[Prompt | str], labeler: GoldLabeler, *,
                    batch_size: int = 64) -> dict[str, float]:
    """Gold-labeler metrics of a policy's responses to ``prompts`` (every value a float, ready for a CSV row):

    gold_score: mean ``labeler.score``; correct: share whose answer is right (extra text allowed); exact: right and
    nothing else; toxic_rate: share with a toxic word; mean_length: mean response length in UTF-8 bytes;
    ``correct/<kind>``: ``correct`` per task kind (the held-out kind included when the prompts have it); n.
    """
    prompts = _as_prompts(prompts)
    labeler = _check_labeler(labeler)
    responses = collect_responses(generator, prompts, batch_size=batch_size)
    judged = [labeler.assess(p, r) for p, r in zip(prompts, responses)]
    n = len(prompts)
    out = {
        "n": float(n),
        "gold_score": sum(a.utility() for a in judged) / n,
        "correct": sum(a.correct for a in judged) / n,
        "exact": sum(a.exact for a in judged) / n,
        "toxic_rate": sum(a.toxic for a in judged) / n,
        "mean_length": sum(len(r.encode("utf-8")) for r in responses) / n,
    }
    by_kind: dict[str, list[bool]] = {}
    for p, a in zip(prompts, judged):
        by_kind.setdefault(p.kind, []).append(a.correct)
    for kind in sorted(by_kind):
        out[f"correct/{kind}"] = sum(by_kind[kind]) / len(by_kind[kind])
    return out


def win_rate(gen_a: Responses, gen_b: Responses, prompts: Sequence[Prompt | str], labeler: GoldLabeler,
             rng: random.Random | int, *, batch_size: int = 64) -> float:
    """Share of ``prompts`` on which the (noisy) labeler prefers ``gen_a``'s response to ``gen_b``'s: Figure 1's
    axis with ``gen_b`` the reference (the largest SFT model). A model against itself scores 0.5 in expectation."""
    prompts = _as_prompts(prompts)
    labeler, rng = _check_labeler(labeler), as_rng(rng)
    resp_a = collect_responses(gen_a, prompts, batch_size=batch_size)
    resp_b = collect_responses(gen_b, prompts, batch_size=batch_size)
    wins = sum(labeler.prefer(p, a, b, rng) == 0 for p, a, b in zip(prompts, resp_a, resp_b))
    return wins / len(prompts)


# ---------------------------------------------------------------------------------------------- reward model


def rm_accuracy(score_fn: Callable[[list[str], list[str]], Sequence[float]], comparisons: Sequence[dict],
                labeler: GoldLabeler, *, against: str = "gold", batch_size: int = 256) -> float:
    """Pairwise accuracy of a reward model on ``comparisons`` (``{"prompt", "responses", "ranking"}`` sets).

    ``score_fn(prompt_texts, responses) -> rewards`` (a list or 1-D tensor) is called on batches of at most
    ``batch_size`` (prompt, response) pairs.
    ``against="gold"``: over the pairs whose gold scores differ, how often the RM orders them like
    ``labeler.score`` (what the RM should learn; the noisy labels cap it below 1).
    ``against="labels"``: over all C(K, 2) pairs, agreement with the sets' own rankings (the paper's validation
    accuracy, ~72 %, which labeler noise caps near the inter-labeler agreement). An RM tie counts one half.
    """
    if against not in ("gold", "labels"):
        raise ValueError(f"against must be one of ('gold', 'labels'), got {against!r}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    labeler = _check_labeler(labeler)
    if isinstance(comparisons, dict) or not isinstance(comparisons, Sequence) or not comparisons:
        raise ValueError("comparisons must be a non-empty sequence of {prompt, responses, ranking} dicts")
    bs = check_positive_int("batch_size", batch_size)
    # score_fn judges (prompt, response) pairs independently, so the flat list is cut into batches freely
    flat_p = [c["prompt"] for c in comparisons for _ in c["responses"]]
    flat_r = [r for c in comparisons for r in c["responses"]]
    flat: list[float] = []
    for i in range(0, len(flat_r), bs):
        flat += _floats(score_fn(flat_p[i:i + bs], flat_r[i:i + bs]), "score_fn", len(flat_r[i:i + bs]))
    rewards, start = [], 0
    for c in comparisons:
        rewards.append(flat[start:start + len(c["responses"])])
        start += len(c["responses"])
    hits = total = 0.0
    for c, rm in zip(comparisons, rewards):
        if against == "gold":
            prompt = parse_prompt(c["prompt"])
            gold = [labeler.score(prompt, r) for r in c["responses"]]
            pairs = [(i, j) for i in range(len(gold)) for j in range(len(gold)) if gold[i] > gold[j] + 1e-9]
        else:
            order = c["ranking"]
            pairs = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
        for better, worse in pairs:
            hits += 1.0 if rm[better] > rm[worse] else 0.5 if rm[better] == rm[worse] else 0.0
            total += 1
    if total == 0:
        raise ValueError("comparisons hold no pair with different gold scores to judge")
    return hits / total


# ---------------------------------------------------------------------------------------------- alignment tax


def pretrain_loss(loss_fn: Callable[[list[str]], object], docs: Sequence[str], *, batch_size: int = 16) -> float:
    """Mean pretraining loss of a model on ``docs`` (held-out corpus docs: the alignment-tax probe).

    ``loss_fn(batch_of_docs)`` is the trainer's; it returns either ``(sum_nll, n_tokens)``, and the result is the
    token-weighted mean NLL in nats, or a mean loss, and the result is the doc-weighted mean of those.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(docs, str) or not isinstance(docs, Sequence) or not docs:
        raise ValueError("docs must be a non-empty sequence of strings")
    bs = check_positive_int("batch_size", batch_size)
    total = weight = 0.0
    for i in range(0, len(docs), bs):
        batch = list(docs[i:i + bs])
        out = loss_fn(batch)
        if isinstance(out, tuple):
            nll, count = (float(v) for v in out)
        else:
            nll, count = float(out) * len(batch), float(len(batch))
        total, weight = total + nll, weight + count
    if weight <= 0:
        raise ValueError("loss_fn reported no tokens")
    return total / weight


# ---------------------------------------------------------------------------------------------- Figure 1


def _figure1_grid(results) -> tuple[list[str], list, dict]:
    """(methods in plot order, sizes in first-seen order, {(method, size): record})."""
    if isinstance(results, dict) or not isinstance(results, Sequence) or not results:
        raise ValueError("results must be a non-empty list of {method, size, win_rate[, n, params]} dicts")
    grid = {}
    for i, r in enumerate(results):
        for key in ("method", "size", "win_rate"):
            if key not in r:
                raise ValueError(f"results[{i}] is missing '{key}'")
        grid[(r["method"], r["size"])] = r
    seen_methods = list(dict.fromkeys(r["method"] for r in results))
    methods = [m for m in METHODS if m in seen_methods] + [m for m in seen_methods if m not in METHODS]
    sizes = list(dict.fromkeys(r["size"] for r in results))
    return methods, sizes, grid


def ci95(p: float, n: float) -> float:
    """Half-width of the normal-approximation 95 % interval of a share ``p`` (a win rate) measured on ``n``
    judgements."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n)


def _ci95(rec: dict) -> float | None:
    """``ci95`` of a record's win rate over its ``rec["n"]`` prompts (None without ``n``)."""
    n = rec.get("n")
    return ci95(rec["win_rate"], n) if n else None


def figure1_table(results: Sequence[dict], *, reference: str = "SFT (largest)") -> str:
    """A text table of Figure 1: win rate against ``reference`` per method (rows) and size (columns).

    ``results`` holds records ``{"method", "size", "win_rate"}``, optionally ``"n"`` (prompts judged; adds a 95 %
    interval) and ``"params"``.
    """
    methods, sizes, grid = _figure1_grid(results)
    width = max(len(m) for m in [*methods, "method"])
    cells = []
    for m in methods:
        row = []
        for s in sizes:
            rec = grid.get((m, s))
            if rec is None:
                row.append("-")
                continue
            ci = _ci95(rec)
            row.append(f"{rec['win_rate']:.3f}" + (f" ±{ci:.3f}" if ci is not None else ""))
        cells.append(row)
    col = [max([len(str(s))] + [len(row[j]) for row in cells]) for j, s in enumerate(sizes)]
    lines = [f"Figure 1: win rate against {reference} (0.5 = as good as the reference)",
             " | ".join([f"{'method':<{width}}"] + [f"{s!s:>{c}}" for s, c in zip(sizes, col)])]
    lines.append("-" * len(lines[-1]))
    for m, row in zip(methods, cells):
        lines.append(" | ".join([f"{m:<{width}}"] + [f"{v:>{c}}" for v, c in zip(row, col)]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _new_figure(what: str, path, nrows: int = 1, ncols: int = 1, size=(6.0, 4.0)):
    """(figure, axes array) from matplotlib's object API (no global backend switch), or None with a warning."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the png path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"{what}: matplotlib is not installed (pip install matplotlib); no plot written to "
                      f"{os.fspath(path)}", stacklevel=3)
        return None
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_figure1(results: Sequence[dict], path_png: str | os.PathLike, *,
                 reference: str = "SFT (largest)") -> str | None:
    """Figure 1 as a PNG: win rate against ``reference`` vs model size, one line per method (95 % error bars when
    records carry ``n``; a log x axis of parameter counts when every record carries ``params``). Returns the path,
    or None without matplotlib."""
    methods, sizes, grid = _figure1_grid(results)
    made = _new_figure("plot_figure1", path_png)
    if made is None:
        return None
    fig, axes = made
    ax = axes[0, 0]
    # A log axis of parameter counts needs two sizes at least; one size is one column of points (a lone x value on a
    # log axis lands at the edge of the default decade range). Methods are spread a little around their size so
    # their error bars do not overlap.
    numeric = all("params" in r for r in results) and len(sizes) > 1
    for i, m in enumerate(methods):
        recs = [grid[(m, s)] for s in sizes if (m, s) in grid]
        offset = (i - (len(methods) - 1) / 2) * 0.04
        xs = [r["params"] * 10 ** offset if numeric else sizes.index(r["size"]) + offset for r in recs]
        errs = [_ci95(r) or 0.0 for r in recs]
        ax.errorbar(xs, [r["win_rate"] for r in recs], yerr=errs, marker="o", capsize=3, label=m)
    params = {s: grid[next(k for k in grid if k[1] == s)].get("params") for s in sizes}
    labels = [f"{s} ({params[s] / 1e6:.2g}M)" if params[s] else str(s) for s in sizes]
    if numeric:  # ticks at the sizes' parameter counts (one size's methods share its count), named by size
        ax.set_xscale("log")
        ax.set_xticks([params[s] for s in sizes], labels)
        ax.minorticks_off()
        ax.set_xlabel("model size (parameters, log scale)")
    else:
        ax.set_xticks(range(len(sizes)), labels)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.set_xlabel("model size (parameters)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate against {reference}")
    ax.set_title("Human (gold labeler) preference")
    ax.legend()
    return _save(fig, path_png)


def _read_csv_columns(csv_path) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """(x column, {metric: [(x, y), ...]}) for every column with at least one number; x is "step" if present."""
    if not isinstance(csv_path, (str, os.PathLike)):
        raise TypeError(f"csv_path must be a str or os.PathLike, got {type(csv_path).__name__}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    if not fields or not rows:
        raise ValueError(f"csv_path {os.fspath(csv_path)!r} has no rows")
    x_col = "step" if "step" in fields else fields[0]
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        try:
            x = float(row[x_col])
        except (TypeError, ValueError):
            continue
        for name in fields:
            if name == x_col:
                continue
            try:
                y = float(row[name])
            except (TypeError, ValueError):  # empty cell (a metric not logged this step) or text
                continue
            if math.isfinite(y):
                series.setdefault(name, []).append((x, y))
    return x_col, series


def plot_learning_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, *,
                         title: str | None = None) -> str | None:
    """One panel per numeric column of a metrics CSV (e.g. ``MetricsLogger``'s), against ``step`` (or the first
    column). Cells may be empty. A validation column ``val_X`` is drawn as large markers in the panel of ``X`` when
    the CSV has it (a validation metric logged once is then a point against the training curve, not a lone dot).
    ``title`` defaults to the name of the CSV's folder (the stage). Returns the PNG path, or None without
    matplotlib."""
    x_col, series = _read_csv_columns(csv_path)
    if not series:
        raise ValueError(f"csv_path {os.fspath(csv_path)!r} has no numeric column besides {x_col!r}")
    overlay = {n: n.removeprefix("val_") for n in series if n.startswith("val_") and n.removeprefix("val_") in series}
    panels = [n for n in series if n not in overlay]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    made = _new_figure("plot_learning_curves", png_path, nrows, ncols, size=(4.0, 2.8))
    if made is None:
        return None
    fig, axes = made
    for ax, name in zip(axes.flat, panels):
        pts = series[name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                markersize=3 if len(pts) > 1 else 6, label="train" if name in overlay.values() else None)
        for val, train_name in overlay.items():
            if train_name == name:
                ax.plot([p[0] for p in series[val]], [p[1] for p in series[val]], marker="D", markersize=7,
                        linestyle="--", color="tab:red", label="validation")
                ax.legend(fontsize="small")
        ax.set_title(name)
        ax.set_xlabel(x_col)
        ax.set_ylabel(name)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title is None:
        title = os.path.basename(os.path.dirname(os.path.abspath(os.fspath(csv_path)))) or "metrics"
    fig.suptitle(title)
    return _save(fig, png_path)


# ---------------------------------------------------------------------------------------------- over-optimisation


def _check_points(points) -> list[tuple[float, float, float]]:
    if isinstance(points, (str, dict)) or not isinstance(points, Sequence) or len(points) < 2:
        raise ValueError("points must be a sequence of at least 2 (kl, rm_reward, gold_reward) triples")
    out = []
    for i, pt in enumerate(points):
        if len(pt) != 3:
            raise ValueError(f"points[{i}] must be (kl, rm_reward, gold_reward), got {pt!r}")
        kl, rm, gold = (float(v) for v in pt)
        if not (kl >= 0 and math.isfinite(kl) and math.isfinite(rm) and math.isfinite(gold)):
            raise ValueError(f"points[{i}] must hold finite numbers with kl >= 0, got {pt!r}")
        out.append((kl, rm, gold))
    return out


def overoptimization_summary(points: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """Three places along a run of ``(kl, rm_reward, gold_reward)`` points in time order (one per PPO iteration):
    the gold peak (``kl_at_gold_peak``, ``gold_peak``, ``rm_at_gold_peak``), the last iteration (``final_kl``,
    ``final_gold``, ``final_rm``) and the largest KL, which KL's ups and downs may put before the end (``max_kl``,
    ``gold_at_max_kl``, ``rm_at_max_kl``); and ``gold_drop`` = gold_peak - final_gold (> 0: the policy over-optimised
    the RM by the end, Goodhart's law)."""
    pts = _check_points(points)
    peak, last, far = max(pts, key=lambda p: p[2]), pts[-1], max(pts, key=lambda p: p[0])
    return {"kl_at_gold_peak": peak[0], "gold_peak": peak[2], "rm_at_gold_peak": peak[1],
            "final_kl": last[0], "final_gold": last[2], "final_rm": last[1],
            "max_kl": far[0], "gold_at_max_kl": far[2], "rm_at_max_kl": far[1], "gold_drop": peak[2] - last[2]}


def plot_overoptimization(points: Sequence[tuple[float, float, float]] | dict[str, Sequence],
                          png_path: str | os.PathLike) -> str | None:
    """RM reward (solid) and gold reward (dashed) against KL(policy || reference policy), marking the gold peak.
    ``points``: one run's ``(kl, rm_reward, gold_reward)`` points, or ``{run name: points}`` to draw several runs
    (e.g. PPO and PPO-ptx), each in its own colour and named in the legend and title. Each line joins its points in
    KL order (a run's KL goes up and down: joined in time order, the lines would zig-zag). Returns the PNG path, or
    None without matplotlib."""
    runs = ({str(k): _check_points(v) for k, v in points.items()} if isinstance(points, dict)
            else {"": _check_points(points)})
    if not runs:
        raise ValueError("points must name at least one run")
    made = _new_figure("plot_overoptimization", png_path)
    if made is None:
        return None
    fig, axes = made
    ax = axes[0, 0]
    for i, (name, in_time) in enumerate(runs.items()):
        color, prefix, pts = f"C{i}", f"{name}: " if name else "", sorted(in_time)
        kls = [p[0] for p in pts]
        ax.plot(kls, [p[1] for p in pts], marker="o", color=color, label=f"{prefix}reward model")
        ax.plot(kls, [p[2] for p in pts], marker="s", color=color, linestyle="--", label=f"{prefix}gold labeler")
        ax.axvline(overoptimization_summary(pts)["kl_at_gold_peak"], color=color, linestyle=":", linewidth=1,
                   label=f"{prefix}gold peak")
    ax.set_xlabel("KL(policy || reference policy) per response, nats")
    ax.set_ylabel("reward")
    named = [n for n in runs if n]
    ax.set_title("Reward over-optimisation" + (f": {', '.join(named)}" if named else ""))
    ax.legend(fontsize="small")
    return _save(fig, png_path)


def plot_kl_sweep(rows: Sequence[dict], png_path: str | os.PathLike, *, reference: str = "SFT") -> str | None:
    """Two panels of a KL-coefficient sweep (``Pipeline.kl_sweep``'s rows: ``beta``, ``win_rate`` and
    ``sampled/win_rate`` with their ``n``, and, where the run logged gold scores, ``points`` of
    (KL, RM score, gold score)): (a) win rate against ``reference`` vs beta, greedy and sampled, with 95 % intervals;
    (b) RM score (solid) and gold score (dashed) against KL along each run, one colour per beta: the
    over-optimisation frontier. Returns the PNG path, or None without matplotlib."""
    if isinstance(rows, dict) or not isinstance(rows, Sequence) or not rows:
        raise ValueError("rows must be a non-empty list of {beta, win_rate, sampled/win_rate, n, sampled/n} dicts")
    made = _new_figure("plot_kl_sweep", png_path, 1, 2, size=(6.0, 4.5))
    if made is None:
        return None
    fig, axes = made
    ax = axes[0, 0]
    betas = [r["beta"] for r in rows]
    for key, label, marker in (("win_rate", "greedy", "o"), ("sampled/win_rate", "sampled (T=1)", "s")):
        n_key = key.replace("win_rate", "n")
        ax.errorbar(betas, [r[key] for r in rows], yerr=[ci95(r[key], r[n_key]) for r in rows], marker=marker,
                    capsize=3, label=label)
    # beta = 0 belongs on the axis: linear up to the smallest positive beta, logarithmic above it
    positive = [b for b in betas if b > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xticks(betas, [f"{b:g}" for b in betas])
    ax.minorticks_off()
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("KL coefficient beta")
    ax.set_ylabel(f"win rate against {reference}")
    ax.set_title("(a) gold-labeler win rate of the final policy")
    ax.legend()
    ax = axes[0, 1]
    for i, r in enumerate(rows):
        if "points" not in r:
            continue
        pts = sorted(_check_points(r["points"]))  # KL order: a run's KL goes up and down
        kls, color = [p[0] for p in pts], f"C{i}"
        ax.plot(kls, [p[1] for p in pts], color=color, label=f"beta {r['beta']:g}")
        ax.plot(kls, [p[2] for p in pts], color=color, linestyle="--")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("KL(policy || PPO init) per response, nats (log above 1)")
    ax.set_ylabel("score of the rollouts")
    ax.set_title("(b) RM score (solid) and gold score (dashed) along each run")
    ax.legend(fontsize="small")
    return _save(fig, png_path)
