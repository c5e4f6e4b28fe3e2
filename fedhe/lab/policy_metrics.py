"""Robustness metrics for a policy evaluated clean and under an attack wrapper (docs/threat-lab.md).

All evaluation is greedy (argmax / Gaussian mean) with fixed reset seeds ``seed, seed+1, ...`` so the
clean and attacked runs start from the same states.

* ``crr`` (cumulative reward retention): R_att / R_clean if the random policy's return R_rand >= 0;
  otherwise (negative-reward environments) the min-max form (R_att - R_rand) / (R_clean - R_rand).
* policy deviation along the attacked trajectory, averaged over all steps (unattacked steps count 0):
  ``pd_tv`` mean total variation 1/2 ||pi(.|s_t) - pi(.|s_hat_t)||_1; ``pd_kl`` mean KL(pi(.|s_t) || pi(.|s_hat_t));
  ``pd_flip`` fraction of steps whose greedy action changes. Gaussian policies (shared diagonal std):
  KL = sum_d (mu_d - mu_hat_d)^2 / (2 sigma_d^2) and TV = 2 Phi(Delta / 2) - 1, Delta the Mahalanobis
  distance of the means (both exact); a greedy action "changes" when some dimension of the mean moves
  by more than 10% of that dimension's half-range.
  Action attacks compare the intended with the executed action (TV of the greedy point masses, i.e.
  the flip; KL undefined = None for discrete; Gaussian formulas with the executed action as mean).
* ``asr`` (attack success rate, untargeted): among attacked steps, the fraction where the executed
  greedy action differs from the one the policy would have taken on the clean state. It is
  ``pd_flip`` restricted to attacked steps; ``attacked_frac`` reports the fraction of attacked steps.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np

from scenarios.policy import Policy
from scenarios.rollout import Step, choose_actions, play_episodes

FLIP_FRACTION = 0.1  # continuous actions: a mean moving > 10% of the half-range counts as a changed action


def run_episodes(env: gym.Env, policy: Policy, episodes: int, seed: int, random_policy: bool = False) -> dict:
    """Greedy (or uniformly random) episodes; collects per-step deviation if ``env`` is an attack wrapper."""
    _, half = policy.spec.action_center_scale()
    tv, kl, flip, attacked, success = [], [], [], [], []

    def record(step: Step) -> None:
        rec = step.info.get("attack")  # the wrapper's record of the observation the agent acted on
        if rec is None:
            return
        step_rec = step.next_info.get("attack", {})
        if "action_attacked" in step_rec:  # action attack: intended vs executed
            d = _action_deviation(policy, step_rec["intended_action"], step_rec["executed_action"], half)
            was = step_rec["action_attacked"]
        else:
            d = _obs_deviation(policy, rec["clean_obs"], np.asarray(step.obs, dtype=np.float64), half)
            was = rec["attacked"]
        tv.append(d[0]), kl.append(d[1]), flip.append(d[2]), attacked.append(was)
        if was:
            success.append(d[2])

    act = choose_actions(env.action_space, None if random_policy else policy, seed)
    returns = play_episodes(env, act, episodes, seed, on_step=None if random_policy else record)
    out = {"returns": returns, "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns))}
    if tv:
        out.update(
            pd_tv=float(np.mean(tv)),
            pd_kl=None if any(v is None for v in kl) else float(np.mean(kl)),
            pd_flip=float(np.mean(flip)),
            asr=float(np.mean(success)) if success else 0.0,
            attacked_frac=float(np.mean(attacked)),
            steps=len(tv),
        )
    return out


def _obs_deviation(policy: Policy, s: np.ndarray, s_hat: np.ndarray, half: np.ndarray) -> tuple[float, float, float]:
    s, s_hat = s.reshape(1, -1), s_hat.reshape(1, -1)
    if policy.discrete:
        p, q = policy.action_probs(s)[0], policy.action_probs(s_hat)[0]
        return categorical_deviation(p, q)
    mu, std = policy.gaussian(s)
    mu_hat, _ = policy.gaussian(s_hat)
    return gaussian_deviation(mu[0], mu_hat[0], std, half)


def _action_deviation(policy: Policy, intended, executed, half) -> tuple[float, float | None, float]:
    if policy.discrete:
        changed = float(int(intended) != int(executed))
        return changed, None, changed
    std = policy.spec.action_center_scale()[1] * np.exp(policy.params.log_std)
    return gaussian_deviation(np.asarray(intended, float), np.asarray(executed, float), std, half)


def categorical_deviation(p: np.ndarray, q: np.ndarray) -> tuple[float, float, float]:
    """(TV, KL(p||q), greedy-action flip) of two categorical distributions."""
    tv = 0.5 * float(np.abs(p - q).sum())
    kl = float(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))))
    return tv, max(kl, 0.0), float(int(p.argmax()) != int(q.argmax()))


def gaussian_deviation(
    mu: np.ndarray, mu_hat: np.ndarray, std: np.ndarray, half: np.ndarray
) -> tuple[float, float, float]:
    """(TV, KL, flip) of N(mu, diag std^2) vs N(mu_hat, diag std^2), closed form."""
    z = (np.asarray(mu) - np.asarray(mu_hat)) / np.asarray(std)
    delta = float(np.sqrt(np.sum(z * z)))
    tv = math.erf(delta / (2.0 * math.sqrt(2.0)))  # 2 Phi(delta/2) - 1
    kl = 0.5 * delta * delta
    flip = float(np.any(np.abs(np.asarray(mu) - np.asarray(mu_hat)) > FLIP_FRACTION * np.asarray(half)))
    return tv, kl, flip


def retention(attacked: float, clean: float, random: float) -> float | None:
    """CRR: plain ratio for non-negative-reward envs (R_rand >= 0), else min-max normalised."""
    if random >= 0:
        return None if clean == 0 else attacked / clean
    denom = clean - random
    return None if abs(denom) < 1e-12 else (attacked - random) / denom


def pct_drop(attacked: float, clean: float, random: float) -> float | None:
    crr = retention(attacked, clean, random)
    return None if crr is None else 100.0 * (1.0 - crr)
