"""Per-observation-dimension explanations of a policy's decisions, clean vs attacked.

Integrated gradients (Sundararajan et al. 2017) with an all-zeros baseline b and ``steps`` midpoint
Riemann steps: IG_d(s) = (s_d - b_d) * mean_k dF/ds_d (b + (k + 1/2)/steps * (s - b)), where F is
* discrete policies: log pi(a*|s) with a* the greedy action on the *clean* state (so the attacked
  attribution shows how the perturbed input changes the evidence for the clean decision);
* Gaussian policies: the mean of action dimension 0, mu_0(s) (in action units).
Completeness holds: sum_d IG_d(s) ~= F(s) - F(b) (checked in the tests).

``explain_attack`` walks the attacked trajectory (attack wrapper), attributes F on the clean state s_t
and on the attacked input s_hat_t, and summarises per dimension: mean |IG| clean, mean |IG| attacked,
mean |IG(s_hat) - IG(s)| (the attribution shift) and the mean |s_hat - s| / std (which dimensions the
attack spends its budget on). ``plot_attributions`` draws the three as grouped bars (matplotlib PNG).
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np

from scenarios.policy import Policy, _backward, _forward
from scenarios.rollout import Step, choose_actions, play_episodes

OBS_NAMES = {
    "cartpole": ["cart position", "cart velocity", "pole angle", "pole angular velocity"],
    "acrobot": ["cos th1", "sin th1", "cos th2", "sin th2", "th1 dot", "th2 dot"],
    "pendulum": ["cos theta", "sin theta", "theta dot"],
}


def decision_value_and_grad(
    policy: Policy, obs: np.ndarray, action: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """F per row and dF/dobs, shapes (n,) and (n, obs_dim)."""
    obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
    out, inputs = _forward(policy.params.actor, obs)
    if policy.discrete:
        shifted = out - out.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        onehot = np.zeros_like(out)
        onehot[np.arange(out.shape[0]), a] = 1.0
        value = log_p[np.arange(out.shape[0]), a]
        g_out = onehot - np.exp(log_p)
    else:
        center, scale = policy.spec.action_center_scale()
        value = center[0] + scale[0] * out[:, 0]
        g_out = np.zeros_like(out)
        g_out[:, 0] = scale[0]
    return value, _backward(policy.params.actor, None, inputs, g_out)


def integrated_gradients(
    policy: Policy,
    obs: np.ndarray,
    action: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
    steps: int = 32,
) -> np.ndarray:
    """IG attributions, shape (n, obs_dim). ``action`` defaults to the greedy action on ``obs``."""
    obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
    base = np.zeros_like(obs) if baseline is None else np.broadcast_to(baseline, obs.shape)
    if policy.discrete and action is None:
        action = policy.action_probs(obs).argmax(axis=1)
    total = np.zeros_like(obs)
    for k in range(steps):
        point = base + (k + 0.5) / steps * (obs - base)
        total += decision_value_and_grad(policy, point, action)[1]
    return (obs - base) * total / steps


def explain_attack(
    env: gym.Env, policy: Policy, episodes: int, seed: int, obs_std: np.ndarray, max_steps: int = 2000
) -> dict:
    """Attributions along an attacked trajectory (``env`` is an observation-attack wrapper)."""
    clean_attr, att_attr, shift, used = [], [], [], []

    def attribute(step: Step) -> None:
        s = np.asarray(step.info["attack"]["clean_obs"], dtype=np.float64)[None]
        s_hat = np.asarray(step.obs, dtype=np.float64)[None]
        a = policy.action_probs(s).argmax(axis=1) if policy.discrete else None
        ig_s = integrated_gradients(policy, s, a)[0]
        ig_h = integrated_gradients(policy, s_hat, a)[0]
        clean_attr.append(np.abs(ig_s))
        att_attr.append(np.abs(ig_h))
        shift.append(np.abs(ig_h - ig_s))
        used.append(np.abs(s_hat[0] - s[0]) / obs_std)

    play_episodes(
        env, choose_actions(env.action_space, policy, seed), episodes, seed, on_step=attribute, max_steps=max_steps
    )
    return {
        "mean_abs_ig_clean": np.mean(clean_attr, axis=0).tolist(),
        "mean_abs_ig_attacked": np.mean(att_attr, axis=0).tolist(),
        "mean_abs_ig_shift": np.mean(shift, axis=0).tolist(),
        "mean_perturbation_std": np.mean(used, axis=0).tolist(),
        "steps": len(clean_attr),
        "target": "log pi(a*|s), a* greedy on the clean state" if policy.discrete else "mu_0(s)",
    }


def plot_attributions(summary: dict, path: Path, names: list[str] | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = np.asarray(summary["mean_abs_ig_clean"])
    dims = np.arange(clean.size)
    names = names or [f"obs[{d}]" for d in dims]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.27
    ax1.bar(dims - w, clean, w, label="clean |IG|")
    ax1.bar(dims, summary["mean_abs_ig_attacked"], w, label="attacked |IG|")
    ax1.bar(dims + w, summary["mean_abs_ig_shift"], w, label="|IG shift|")
    ax1.set_xticks(dims, names, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel(f"mean attribution of {summary['target']}", fontsize=8)
    ax1.legend(fontsize=8)
    ax2.bar(dims, summary["mean_perturbation_std"], 0.5, color="tab:red")
    ax2.set_xticks(dims, names, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("mean |s_hat - s| / std", fontsize=8)
    ax2.set_title("where the attack spends its budget", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
