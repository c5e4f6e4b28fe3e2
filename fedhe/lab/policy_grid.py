"""Policy robustness runner: train encrypted federations per train mode and seed, attack the policies.

For every ``train`` mode and seed a whole encrypted federation runs on Flower's simulation engine
(``fedhe.simulate.simulate``) with the scenario's ``ppo.robust`` set for that mode; the robust
training happens inside the participants, so only the usual ciphertexts leave them. The trained
policy is decrypted from the checkpoint with the federation key, then evaluated greedily clean and
under each ``eval_attack`` (``fedhe.lab.policy_attacks``), and scored with ``fedhe.lab.policy_metrics``.

Each mode's robust training travels as data in the run settings (``robust-training``, a JSON
object of ``RobustConfig`` fields) and is applied by ``scenarios.resolve_run`` on every side.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedhe.lab.policy_attacks import ATTACKS, estimate_obs_std, make_attack, random_std, reference_std
from fedhe.lab.policy_metrics import pct_drop, retention, run_episodes
from fedhe.run_dir import KEYS_DIR
from protos.plan import resolve_plan
from protos.settings import RunSettings
from scenarios import Policy, Scenario, load_scenario

TRAIN_MODES = ("vanilla", "sa-ppo", "noise-injection", "reward-defense")
# Extra mode trained automatically next to reward-defense: the same tampered rewards, no defense.
REWARD_ATTACK = "reward-attack"
REWARD_FLIP_RATE = 0.2

# Per-mode robust settings. epsilon is in units of the scenario's fixed sigma (``reference_std``, the
# evaluation's default unit); the runner puts that sigma into ``RobustConfig.obs_std`` for sa-ppo
# and noise-injection, and each scenario trains on the ball it is evaluated on (docs/threat-lab.md).
ROBUST_DEFAULTS: dict[str, dict] = {
    "vanilla": {},
    "sa-ppo": {"mode": "sa-ppo", "kappa": 0.1, "epsilon": 0.3, "attack_steps": 3},
    "noise-injection": {"mode": "noise-injection", "epsilon": 0.3},
    "reward-defense": {"mode": "reward-defense", "reward_flip_rate": REWARD_FLIP_RATE},
    REWARD_ATTACK: {"reward_flip_rate": REWARD_FLIP_RATE},
}
# Scenario name -> mode -> settings (plaintext sweeps, docs/threat-lab.md). CartPole: kappa 0.02
# at the evaluation ball eps 0.5; kappa >= 0.05 keeps the discrete policy flat and FGSM then
# drives the cart out. Acrobot breaks under FGSM between eps 0.1 and 0.15 (SA-DQN sigma), so
# it trains on eps 0.1. Pendulum (random-policy sigma, theta-dot 3.6 rad/s) on eps 0.2.
ROBUST_OVERRIDES: dict[str, dict[str, dict]] = {
    "cartpole": {"sa-ppo": {"mode": "sa-ppo", "kappa": 0.02, "epsilon": 0.5, "attack_steps": 3}},
    "acrobot": {
        "sa-ppo": {"mode": "sa-ppo", "kappa": 0.3, "epsilon": 0.1, "attack_steps": 3},
        "noise-injection": {"mode": "noise-injection", "epsilon": 0.1},
    },
    "pendulum": {
        "sa-ppo": {"mode": "sa-ppo", "kappa": 0.02, "epsilon": 0.2, "attack_steps": 3},
        "noise-injection": {"mode": "noise-injection", "epsilon": 0.2},
    },
}


SIGMA_MODES = ("sa-ppo", "noise-injection")
STD_SOURCES = ("reference", "random", "clean")


def robust_config(scenario_name: str, train: str, sigma=None) -> dict:
    """``ppo.robust`` settings for ``train``; ``sigma`` (the fixed per-dimension state std) scales epsilon."""
    if train not in ROBUST_DEFAULTS:
        raise ValueError(f"unknown train mode {train!r}; known: {', '.join(TRAIN_MODES)}")
    robust = dict(ROBUST_OVERRIDES.get(scenario_name, {}).get(train, ROBUST_DEFAULTS[train]))
    if sigma is not None and robust.get("mode") in SIGMA_MODES:
        robust.setdefault("obs_std", tuple(float(x) for x in sigma))
    return robust


def train_federation(
    scenario_ref: str,
    robust: dict,
    run_dir: Path,
    seed: int,
    key_dir: Path | None,
    rounds: int | None,
    plaintext: bool,
    participants: int | None = None,
    stop_on_solve: bool = False,
) -> tuple[np.ndarray, dict]:
    """One encrypted federation whose participants train with ``robust`` (data, not code)."""
    from fedhe.run_dir import decrypt_policy
    from fedhe.simulate import simulate
    from protos.settings import RunSettings

    settings = RunSettings(
        scenario=scenario_ref,
        num_server_rounds=rounds or 0,
        plaintext=plaintext,
        out_dir=str(run_dir),
        seed=seed,
        stop_on_solve=stop_on_solve,
        robust_training=json.dumps(robust),
    )
    scenario = resolve_plan(settings).scenario
    n = participants or scenario.num_participants
    settings = replace(settings, min_participants=max(1, n - 1))
    summary = simulate(settings, n, key_dir or run_dir.parent / KEYS_DIR, node_seed=seed)
    return decrypt_policy(run_dir, key_dir).theta, summary


def state_std(scenario: Scenario, policy: Policy, source: str, seed: int) -> np.ndarray:
    """Sigma of the budget. ``reference`` (default): the scenario's fixed sigma (``reference_std``,
    independent of the policy and the seed); ``random``: a uniform random policy's state std;
    ``clean``: std of the evaluated policy's own clean greedy states (reset seeds 20000+seed+k)."""
    if source == "reference":
        return reference_std(scenario)
    if source == "random":
        return random_std(scenario)
    if source == "clean":
        env = scenario.build_env(0, seed)
        try:
            return estimate_obs_std(env, policy, episodes=10, seed=20_000 + seed)
        finally:
            env.close()
    raise ValueError(f"unknown std source {source!r}; known: {', '.join(STD_SOURCES)}")


def evaluate_policy_robustness(
    scenario: Scenario,
    theta: np.ndarray,
    attacks: list[str],
    epsilon: float,
    episodes: int,
    seed: int,
    std_source: str = "reference",
    obs_std: np.ndarray | None = None,
    alpha: float | None = None,
) -> dict:
    """Clean, random-policy and attacked returns plus deviation metrics for one policy."""
    policy = Policy(scenario.policy_spec(), theta)
    eval_seed = 10_000 + 1000 * seed
    std = obs_std if obs_std is not None else state_std(scenario, policy, std_source, seed)
    env = scenario.build_env(0, seed)
    clean = run_episodes(env, policy, episodes, eval_seed)
    rand = run_episodes(env, policy, episodes, eval_seed, random_policy=True)
    env.close()
    rows = []
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
        wrapped = make_attack(scenario.build_env(0, seed), policy, name, epsilon, obs_std=std, alpha=alpha, seed=seed)
        res = run_episodes(wrapped, policy, episodes, eval_seed)
        wrapped.close()
        rows.append(
            {
                "eval_attack": name,
                "epsilon": epsilon,
                "budget": (
                    f"alpha={alpha if alpha is not None else min(max(epsilon, 0.0), 1.0):g}"
                    if name == "action"
                    else f"linf={epsilon:g} std"
                ),
                "clean_return": clean["mean_return"],
                "attacked_return": res["mean_return"],
                "attacked_std": res["std_return"],
                "random_return": rand["mean_return"],
                "crr": retention(res["mean_return"], clean["mean_return"], rand["mean_return"]),
                "pct_drop": pct_drop(res["mean_return"], clean["mean_return"], rand["mean_return"]),
                "pd_tv": res.get("pd_tv"),
                "pd_kl": res.get("pd_kl"),
                "pd_flip": res.get("pd_flip"),
                "asr": res.get("asr"),
                "attacked_frac": res.get("attacked_frac"),
            }
        )
    return {
        "clean_return": clean["mean_return"],
        "random_return": rand["mean_return"],
        "obs_std": [round(float(x), 5) for x in std],
        "rows": rows,
    }


def run_policy_robustness(
    scenario_ref: str,
    trains: list[str],
    attacks: list[str],
    epsilon: float,
    seeds: int,
    out_dir: Path,
    episodes: int = 20,
    rounds: int | None = None,
    plaintext: bool = False,
    key_dir: Path | None = None,
    std_source: str = "reference",
    alpha: float | None = None,
    participants: int | None = None,
    on_run: Callable[[str, int, dict], None] | None = None,
    stem: str = "policy_robustness",
    stop_on_solve: bool = False,
) -> dict:
    """Train every (train mode, seed) federation, attack each policy; writes DIR/{stem}.json and .md.

    Every federation trains the scenario's full round budget by default: robustness is compared at
    equal training, and a policy stopped the round it first crosses the threshold is caught mid-way
    (CartPole: per-seed FGSM retention spread over 0.3-1.0 when stopped on solve, within 0.02 after
    the full 60 rounds). ``stop_on_solve`` restores the early stop. Runs already in DIR are reused."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_scenario(scenario_ref)
    modes = list(dict.fromkeys(trains))
    if "reward-defense" in modes and REWARD_ATTACK not in modes:
        modes.insert(modes.index("reward-defense"), REWARD_ATTACK)
    rows, runs, explanations = [], [], []
    for train in modes:
        robust = robust_config(base.name, train, reference_std(base))
        scenario = resolve_plan(RunSettings(scenario=scenario_ref, robust_training=json.dumps(robust))).scenario
        for seed in range(seeds):
            run_dir = out_dir / "runs" / f"{train}-seed{seed}"
            if (run_dir / "theta.npy").is_file() and (run_dir / "summary.json").is_file():
                # Re-run on the same DIR: reuse the trained policy, only re-evaluate (e.g. another epsilon).
                theta = np.load(run_dir / "theta.npy")
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                theta, summary = train_federation(
                    scenario_ref, robust, run_dir, seed, key_dir, rounds, plaintext, participants, stop_on_solve
                )
                np.save(run_dir / "theta.npy", theta)  # the decrypted policy stays with the key holder
            result = evaluate_policy_robustness(
                scenario, theta, attacks, epsilon, episodes, seed, std_source, alpha=alpha
            )
            run = {
                "train": train,
                "seed": seed,
                "robust": robust,
                "rounds": summary.get("rounds"),
                "solved": summary.get("solved"),
                "rounds_to_solve": summary.get("rounds_to_solve"),
                "encrypted": not plaintext,
                "clean_return": result["clean_return"],
                "random_return": result["random_return"],
                "obs_std": result["obs_std"],
                "run_dir": str(run_dir),
            }
            runs.append(run)
            for row in result["rows"]:
                rows.append({"scenario": base.name, "train": train, "seed": seed, **row})
            if seed == 0:
                explanations.extend(
                    explain_policy(scenario, theta, attacks, epsilon, np.asarray(result["obs_std"]), out_dir, train)
                )
            if on_run is not None:
                on_run(train, seed, run)
    report = {
        "scenario": base.name,
        "reward_threshold": base.reward_threshold,
        "epsilon": epsilon,
        "std_source": std_source,
        "episodes": episodes,
        "seeds": seeds,
        "stop_on_solve": stop_on_solve,
        "encrypted": not plaintext,
        "runs": runs,
        "rows": rows,
        "summary": summarize(rows),
        "explanations": explanations,
    }
    report["files"] = {"json": str(out_dir / f"{stem}.json"), "md": str(out_dir / f"{stem}.md")}
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text(render_markdown(report))
    return report


def explain_policy(
    scenario: Scenario,
    theta: np.ndarray,
    attacks: list[str],
    epsilon: float,
    obs_std: np.ndarray,
    out_dir: Path,
    train: str,
    episodes: int = 2,
    max_steps: int = 300,
) -> list[dict]:
    """Integrated-gradient attributions (seed 0) under each observation attack, plotted to PNG."""
    from fedhe.lab.attributions import OBS_NAMES, explain_attack, plot_attributions
    from fedhe.lab.policy_attacks import OBS_ATTACKS

    policy = Policy(scenario.policy_spec(), theta)
    out = []
    for name in attacks:
        if name not in OBS_ATTACKS:
            continue
        env = make_attack(scenario.build_env(0, 0), policy, name, epsilon, obs_std=obs_std, seed=0)
        summary = explain_attack(env, policy, episodes, 30_000, obs_std, max_steps=max_steps)
        env.close()
        png = plot_attributions(
            summary,
            out_dir / "attributions" / f"{train}-{name}.png",
            OBS_NAMES.get(scenario.name),
            f"{scenario.name}: {train} policy, {name} eps={epsilon:g}",
        )
        out.append(
            {
                "train": train,
                "eval_attack": name,
                "epsilon": epsilon,
                "png": str(png),
                "names": OBS_NAMES.get(scenario.name),
                **summary,
            }
        )
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (train, eval_attack)."""
    keys = (
        "clean_return",
        "attacked_return",
        "random_return",
        "crr",
        "pct_drop",
        "pd_tv",
        "pd_kl",
        "pd_flip",
        "asr",
        "attacked_frac",
    )
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["train"], r["eval_attack"]), []).append(r)
    out = []
    for (train, attack), group in groups.items():
        entry = {
            "train": train,
            "eval_attack": attack,
            "epsilon": group[0]["epsilon"],
            "budget": group[0]["budget"],
            "seeds": len(group),
        }
        entry.update({k: _mean(g[k] for g in group) for k in keys})
        entry["crr_std"] = float(np.std([g["crr"] for g in group if g["crr"] is not None])) if group else None
        out.append(entry)
    return out


def _f(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render_markdown(report: dict) -> str:
    """Tables in the source document's shape: baseline, under attack, % drop, policy deviation; restored."""
    summ = report["summary"]
    lines = [
        f"# Policy robustness: {report['scenario']}",
        "",
        f"Encrypted federations: {report['encrypted']}; seeds: {report['seeds']}; training: "
        f"{'stopped once solved' if report.get('stop_on_solve') else 'the full round budget'}; greedy evaluation, "
        f"{report['episodes']} episodes per policy; epsilon = {report['epsilon']} (observation attacks: "
        f"l-inf radius in per-dimension state std, std source `{report['std_source']}`; action attack: "
        "alpha). Definitions: docs/threat-lab.md.",
        "",
        "## Under attack (mean over seeds)",
        "",
        "| Train | Attack | Budget | Baseline return | Under attack | % drop | CRR | PD (TV) | PD (KL) | flip | ASR |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summ:
        lines.append(
            f"| {e['train']} | {e['eval_attack']} | {e['budget']} | {_f(e['clean_return'])} | "
            f"{_f(e['attacked_return'])} | {_f(e['pct_drop'])} | {_f(e['crr'], '{:.2f}')} ± "
            f"{_f(e['crr_std'], '{:.2f}')} | {_f(e['pd_tv'], '{:.3f}')} | {_f(e['pd_kl'], '{:.3f}')} | "
            f"{_f(e['pd_flip'], '{:.3f}')} | {_f(e['asr'], '{:.3f}')} |"
        )
    vanilla = {e["eval_attack"]: e for e in summ if e["train"] == "vanilla"}
    defended = [e for e in summ if e["train"] not in ("vanilla", REWARD_ATTACK)]
    if vanilla and defended:
        lines += [
            "",
            "## Defenses: % of the vanilla baseline restored under attack",
            "",
            "Restored = defended policy's attacked return / vanilla clean return (min-max normalised with "
            "the random policy's return for negative-reward environments).",
            "",
            "| Defense | Attack | Budget | Vanilla under attack | Defended under attack | Restored (%) | "
            "Defended clean / vanilla clean |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in defended:
            v = vanilla.get(e["eval_attack"])
            if v is None:
                continue
            restored = retention(e["attacked_return"], v["clean_return"], v["random_return"])
            clean_ratio = retention(e["clean_return"], v["clean_return"], v["random_return"])
            lines.append(
                f"| {e['train']} | {e['eval_attack']} | {e['budget']} | {_f(v['attacked_return'])} | "
                f"{_f(e['attacked_return'])} | {_f(None if restored is None else 100 * restored)} | "
                f"{_f(clean_ratio, '{:.2f}')} |"
            )
    reward = {e["train"]: e for e in summ if e["train"] in ("vanilla", REWARD_ATTACK, "reward-defense")}
    if REWARD_ATTACK in reward and "vanilla" in reward:
        v = reward["vanilla"]
        lines += [
            "",
            f"## Reward channel (training-time tampering: r -> -r with probability {REWARD_FLIP_RATE})",
            "",
            "Clean greedy return of the trained policy, and how fast training crossed the scenario's "
            "threshold (the cost tampering can show even when the final policy recovers).",
            "",
            "| Policy | Clean return | % of baseline | solved | rounds to solve (mean) |",
            "|---|---|---|---|---|",
        ]
        for train, label in (
            ("vanilla", "vanilla, clean rewards (baseline)"),
            (REWARD_ATTACK, "vanilla, tampered rewards"),
            ("reward-defense", "reward-defense, tampered rewards"),
        ):
            if train not in reward:
                continue
            runs = [r for r in report.get("runs", []) if r["train"] == train]
            solved = [r["rounds_to_solve"] for r in runs if r.get("rounds_to_solve")]
            pct = _pct(retention(reward[train]["clean_return"], v["clean_return"], v["random_return"]))
            solved_cell = f"{len(solved)}/{len(runs)}" if report.get("reward_threshold") is not None else "no threshold"
            lines.append(
                f"| {label} | {_f(reward[train]['clean_return'])} | {_f(pct)} | {solved_cell} | {_f(_mean(solved))} |"
            )
    if report.get("explanations"):
        lines += [
            "",
            "## Explanations: integrated gradients per observation dimension (seed 0)",
            "",
            "Mean |IG| of the decision (log pi(a*|s), a* greedy on the clean state; Gaussian: mu_0) on the "
            "clean state / on the attacked input, and the mean perturbation |s_hat - s| / std the attack "
            "put on each dimension.",
            "",
            "| Train | Attack | Dimension | clean |IG| | attacked |IG| | |IG shift| | perturbation (std) |",
            "|---|---|---|---|---|---|---|",
        ]
        for ex in report["explanations"]:
            names = ex.get("names") or [f"obs[{d}]" for d in range(len(ex["mean_abs_ig_clean"]))]
            for d, name in enumerate(names):
                lines.append(
                    f"| {ex['train']} | {ex['eval_attack']} | {name} | {ex['mean_abs_ig_clean'][d]:.3f} | "
                    f"{ex['mean_abs_ig_attacked'][d]:.3f} | {ex['mean_abs_ig_shift'][d]:.3f} | "
                    f"{ex['mean_perturbation_std'][d]:.2f} |"
                )
        lines += [""] + [
            f"![{ex['train']} {ex['eval_attack']}](attributions/{Path(ex['png']).name})"
            for ex in report["explanations"]
        ]
    lines += ["", "Per-seed rows: the JSON file next to this one (`rows`)."]
    return "\n".join(lines) + "\n"


def _pct(x):
    return None if x is None else 100.0 * x


__all__ = ["run_policy_robustness", "evaluate_policy_robustness", "TRAIN_MODES", "ROBUST_DEFAULTS"]
