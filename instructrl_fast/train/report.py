"""The text report of ``instructrl-fast run`` / ``reproduce`` (figure1.txt): the paper's orderings checked on the
evaluation records, and the rest of its evaluation in a few lines."""

from __future__ import annotations

from instructrl_fast.train.evaluate import ci95


def _interval(p: float, n: float) -> str:
    return f"{p:.3f} ±{ci95(p, n):.3f}"


def shape_checks(records: list[dict], init_loss: dict[str, float]) -> dict:
    """The paper's headline orderings, checked on the evaluation records (win rates and corpus losses).

    Per size: PPO-ptx > SFT, PPO > SFT, SFT > GPT (prompted) > GPT (win rate); PPO raises the corpus loss above the
    PPO starting policy's and PPO-ptx recovers at least half of that rise. Across sizes: the smallest PPO-ptx beats
    the largest GPT.
    """
    win = {(r["size"], r["method"]): r["win_rate"] for r in records}
    loss = {(r["size"], r["method"]): r["ptx_loss"] for r in records}
    sizes = list(dict.fromkeys(r["size"] for r in records))
    out = {}
    for s in sizes:
        tax = loss[s, "PPO"] - init_loss[s]
        out[s] = {
            "ppo_ptx>sft": win[s, "PPO-ptx"] > win[s, "SFT"],
            "ppo>sft": win[s, "PPO"] > win[s, "SFT"],
            "sft>prompted": win[s, "SFT"] > win[s, "GPT (prompted)"],
            "prompted>gpt": win[s, "GPT (prompted)"] > win[s, "GPT"],
            "ppo_raises_ptx_loss": tax > 0,
            "ptx_recovers_half": tax > 0 and (loss[s, "PPO"] - loss[s, "PPO-ptx"]) >= 0.5 * tax,
            "ptx_loss": {"ppo_init": init_loss[s], "ppo": loss[s, "PPO"], "ppo_ptx": loss[s, "PPO-ptx"]},
        }
    out["smallest_ppo_ptx>largest_gpt"] = win[sizes[0], "PPO-ptx"] > win[sizes[-1], "GPT"]
    return out


def format_extras(records: list[dict], rm_report: dict, overopt: dict, heldout: str, twin: str | None = None) -> str:
    """The rest of the paper's evaluation in a few lines: RM accuracy, toxicity (greedy and sampled), the held-out
    instruction kind (next to ``twin``, the trained kind asking for the same answer, when there is one), and the gold
    score's peak along each PPO run (reward over-optimisation)."""
    lines = [(f"Reward model: pairwise accuracy {rm_report['accuracy_vs_rankings']:.3f} against the labelers' "
              f"rankings, {rm_report['accuracy_vs_gold']:.3f} against the gold scores "
              f"({rm_report['n_val_comparisons']} held-out comparison sets)")]
    lines.append(f"Greedy / sampled at T=1 (each against the reference decoded the same way): win rate, gold score, "
                 f"toxic rate; correct on the held-out kind ({heldout})"
                 + (f" and on {twin}, the trained kind with the same answers:" if twin else ":"))
    for r in records:
        held = "  ".join(f"{kind} {r.get(f'correct/{kind}', float('nan')):.3f} / "
                         f"{r.get(f'sampled/correct/{kind}', float('nan')):.3f}" for kind in (heldout, twin) if kind)
        lines.append(f"  {r['size']} {r['method']:<15} win {r['win_rate']:.3f} / {r['sampled/win_rate']:.3f}  gold "
                     f"{r['gold_score']:+.3f} / {r['sampled/gold_score']:+.3f}  toxic {r['toxic_rate']:.3f} / "
                     f"{r['sampled/toxic_rate']:.3f}  held-out {held}")
    if overopt:
        lines.append("Over-optimisation along each PPO run (KL to the start, RM score, gold score):")
        for name, o in overopt.items():
            lines.append(f"  {name:<9} gold peak {o['gold_peak']:+.3f} (KL {o['kl_at_gold_peak']:.2f}); last iteration "
                         f"gold {o['final_gold']:+.3f} (KL {o['final_kl']:.2f}, RM {o['final_rm']:+.3f}); largest KL "
                         f"{o['max_kl']:.2f} (gold {o['gold_at_max_kl']:+.3f})")
    return "\n".join(lines)


def format_shape(shape: dict) -> str:
    lines = ["Paper-shape checks:"]
    for size, checks in shape.items():
        if isinstance(checks, dict):
            flags = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items() if isinstance(v, bool))
            tax = checks["ptx_loss"]
            lines.append(f"  {size}: {flags}; corpus NLL init {tax['ppo_init']:.3f} -> PPO {tax['ppo']:.3f}, "
                         f"PPO-ptx {tax['ppo_ptx']:.3f}")
        else:
            lines.append(f"  {size}: {'yes' if checks else 'NO'}")
    return "\n".join(lines)


def format_kl_sweep(report: dict, *, reference: str) -> str:
    """The table of ``Pipeline.kl_sweep``: per beta, the win rate against ``reference`` and the gold score of the
    final EMA policy, greedy and sampled, then the last rollout batch's KL, RM and gold scores and the gold peak, and
    the share of right answers on the held-out kind (greedy / sampled) when the report names it."""
    head = (f"KL sweep: {report.get('method', 'PPO')} ({report['size']}, {report['n_episodes']} episodes) from one PPO "
            f"init and RM at each beta; win rate against {reference} by the gold labeler (± 95 % interval)")
    cols = (f"{'beta':>6} | {'win greedy':>12} | {'win sampled':>12} | {'gold greedy':>11} | {'gold sampled':>12} | "
            f"last rollouts: {'KL':>6} {'RM':>6} {'gold':>6} {'RM-gold':>7} | gold peak (KL)")
    heldout = report.get("heldout")
    if heldout:
        cols += f" | held-out {heldout}"
    lines = [head, cols, "-" * len(cols)]
    for r in report["kl_sweep"]:
        line = (f"{r['beta']:>6g} | {_interval(r['win_rate'], r['n']):>12} | "
                f"{_interval(r['sampled/win_rate'], r['sampled/n']):>12} | {r['gold_score']:>+11.3f} | "
                f"{r['sampled/gold_score']:>+12.3f} | ")
        if "final_kl" in r:
            line += (f"{'':>14} {r['final_kl']:>6.2f} {r['final_rm']:>+6.3f} {r['final_gold']:>+6.3f} "
                     f"{r['final_rm'] - r['final_gold']:>+7.3f} | {r['gold_peak']:+.3f} ({r['kl_at_gold_peak']:.2f})")
        if heldout:
            nan = float("nan")
            line += f" | {r.get(f'correct/{heldout}', nan):.3f} / {r.get(f'sampled/correct/{heldout}', nan):.3f}"
        lines.append(line)
    return "\n".join(lines)
