"""Robust local training at participants: SA-PPO regularizer, noise injection, reward correction.

Nothing here leaves the participant: the extra terms change the local loss (and hence the update
that gets clipped and encrypted as usual) or the local learning signal. No new message fields.

SA-PPO (Zhang et al. 2020): loss = PPO + kappa * R(theta) with
    R(theta) = mean_i KL(pi_theta(.|s_i) || pi_theta(.|s_hat_i)),
    s_hat_i = argmax_{||s_hat - s_i||_inf <= eps * std} KL(...)  (approximated by PGD, random start).
s_hat is held fixed after the inner maximization (Danskin). As in the SA-PPO reference code the clean
distribution pi(.|s) is a stop-gradient target by default; ``through_clean=True`` differentiates
through both. For Gaussian policies the shared std is a stop-gradient too (otherwise the regularizer
would simply inflate the exploration std), so KL = sum_d (mu_d(s) - mu_d(s_hat))^2 / (2 std_d^2).
"""

from __future__ import annotations

import numpy as np

from scenarios.policy import Policy, _backward, _forward, _log_softmax


def state_kl(policy: Policy, obs: np.ndarray, obs_hat: np.ndarray) -> np.ndarray:
    """Per-sample KL(pi(.|obs) || pi(.|obs_hat)) (Gaussian: same std, closed form)."""
    out = policy.logits(obs)
    out_hat = policy.logits(obs_hat)
    if policy.discrete:
        lp, lq = _log_softmax(out), _log_softmax(out_hat)
        return (np.exp(lp) * (lp - lq)).sum(axis=1)
    std_unit = np.exp(policy.params.log_std)
    return 0.5 * (((out - out_hat) / std_unit) ** 2).sum(axis=1)


def kl_regularizer_and_grad(
    policy: Policy, obs: np.ndarray, obs_hat: np.ndarray, through_clean: bool = False
) -> tuple[float, np.ndarray]:
    """R = mean_i KL(pi(.|s_i) || pi(.|s_hat_i)) and dR/dtheta (actor weights only)."""
    obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
    obs_hat = np.atleast_2d(np.asarray(obs_hat, dtype=np.float64))
    n = obs.shape[0]
    grad = np.zeros_like(policy.theta)
    g_params = policy.spec.unflatten(grad)
    out, inputs = _forward(policy.params.actor, obs)
    out_hat, inputs_hat = _forward(policy.params.actor, obs_hat)
    if policy.discrete:
        lp, lq = _log_softmax(out), _log_softmax(out_hat)
        p, q = np.exp(lp), np.exp(lq)
        kl = (p * (lp - lq)).sum(axis=1)
        g_hat = (q - p) / n  # d KL(p||q) / d logits_hat
        g_clean = p * (lp - lq - kl[:, None]) / n  # d KL(p||q) / d logits (through p)
    else:
        var = np.exp(2.0 * policy.params.log_std)
        diff = out - out_hat
        kl = 0.5 * (diff * diff / var).sum(axis=1)
        g_hat = -diff / var / n
        g_clean = diff / var / n
    _backward(policy.params.actor, g_params.actor, inputs_hat, g_hat)
    if through_clean:
        _backward(policy.params.actor, g_params.actor, inputs, g_clean)
    return float(kl.mean()), grad


def project(obs_hat: np.ndarray, obs: np.ndarray, radius: np.ndarray, low=None, high=None) -> np.ndarray:
    """Project onto the l-inf box |obs_hat - obs| <= radius (per dimension), then onto [low, high]."""
    out = np.clip(obs_hat, obs - radius, obs + radius)
    if low is not None and high is not None:
        out = np.clip(out, low, high)
    return out


def pgd_max_kl(
    policy: Policy,
    obs: np.ndarray,
    radius: np.ndarray,
    steps: int,
    rng: np.random.Generator,
    step_size: float | None = None,
    low=None,
    high=None,
) -> np.ndarray:
    """Approximate argmax_{s_hat in B_inf(s, radius)} KL(pi(.|s) || pi(.|s_hat)) by signed PGD.

    The KL and its gradient vanish at s_hat = s, so the search starts uniformly inside the ball.
    ``step_size`` is a fraction of the radius per step (default 2.5 / steps, as in Madry et al.).
    """
    obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), obs.shape)
    frac = (2.5 / steps) if step_size is None else step_size
    if policy.discrete:
        target = policy.action_probs(obs)
    else:
        target = policy.gaussian(obs)[0]
    x = project(obs + rng.uniform(-1.0, 1.0, obs.shape) * radius, obs, radius, low, high)
    for _ in range(steps):
        _, g = policy.grad_obs(x, target, loss="kl")
        x = project(x + frac * radius * np.sign(g), obs, radius, low, high)
    return x


def batch_obs_std(obs: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Per-dimension std of the local batch (the participant's own state scale; never sent)."""
    return np.maximum(np.asarray(obs, dtype=np.float64).std(axis=0), floor)


class RunningStd:
    """Welford running per-dimension std of observations seen locally (for noise injection)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, batch: np.ndarray) -> None:
        x = np.atleast_2d(np.asarray(batch, dtype=np.float64))
        k = x.shape[0]
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        delta = mean_b - self.mean
        tot = self.n + k
        self.mean = self.mean + delta * k / tot
        self.m2 = self.m2 + m2_b + delta * delta * self.n * k / tot
        self.n = tot

    @property
    def std(self) -> np.ndarray:
        if self.n < 2:
            return np.ones_like(self.mean)
        return np.maximum(np.sqrt(self.m2 / (self.n - 1)), 1e-3)


class PerturbedRewardCorrection:
    """Unbiased surrogate rewards for perturbed rewards (Wang, Liu & Li, AAAI 2020).

    Observed rewards are mapped to ``levels`` (the distinct values seen, at most ``max_levels``;
    continuous rewards are quantized into that many equal-width bins of the observed range).
    The confusion matrix C[i, j] = P(observed level j | true level i) is estimated by majority
    voting: transitions are grouped into cells (action x coarse state bin); a cell's most
    frequent observed level is taken as its true level, and counts of observed levels per true
    level give C. The surrogate reward is r_hat = C^{-1} r (levels vector), which satisfies
    E[r_hat(observed) | true level i] = r_i. Counts accumulate locally across rounds.
    With a single observed true level (CartPole: every true reward is 1) only that row of C is
    identifiable; the others stay identity.
    """

    def __init__(self, max_levels: int = 8, state_bins: int = 3, min_count: int = 50) -> None:
        self.max_levels = max_levels
        self.state_bins = state_bins
        self.min_count = min_count
        self.levels: np.ndarray | None = None
        self.counts: np.ndarray | None = None

    def _quantize(self, rewards: np.ndarray) -> np.ndarray:
        assert self.levels is not None
        return np.abs(rewards[..., None] - self.levels).argmin(axis=-1)

    def _fit_levels(self, rewards: np.ndarray) -> None:
        uniq = np.unique(np.round(rewards, 6))
        if uniq.size <= self.max_levels:
            self.levels = uniq.astype(np.float64)
        else:
            lo, hi = float(rewards.min()), float(rewards.max())
            self.levels = np.linspace(lo, hi, self.max_levels)
        self.counts = np.zeros((self.levels.size, self.levels.size))

    def update(self, rewards: np.ndarray, obs: np.ndarray, actions: np.ndarray) -> None:
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if self.levels is None:
            self._fit_levels(rewards)
        obs = np.asarray(obs, dtype=np.float64).reshape(rewards.size, -1)
        acts = np.asarray(actions).reshape(rewards.size, -1)
        observed = self._quantize(rewards)
        # Cells: discretized action (first dim) x per-dimension tercile of the observation.
        qs = np.quantile(obs, np.linspace(0, 1, self.state_bins + 1)[1:-1], axis=0)
        state_key = sum((obs[:, d:d + 1] > qs[:, d]).sum(axis=1) * (self.state_bins ** d) for d in range(obs.shape[1]))
        act_key = np.round(acts[:, 0] * 4).astype(np.int64)
        cells: dict[tuple[int, int], list[int]] = {}
        for k, (sk, ak) in enumerate(zip(state_key.tolist(), act_key.tolist())):
            cells.setdefault((sk, ak), []).append(k)
        for idx in cells.values():
            obs_levels = observed[idx]
            true_level = np.bincount(obs_levels, minlength=self.levels.size).argmax()
            self.counts[true_level] += np.bincount(obs_levels, minlength=self.levels.size)

    def confusion(self) -> np.ndarray:
        assert self.counts is not None
        c = np.eye(self.counts.shape[0])
        rows = self.counts.sum(axis=1)
        for i in np.flatnonzero(rows >= self.min_count):
            c[i] = self.counts[i] / rows[i]
        return c

    def surrogate(self, rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if self.levels is None:
            return rewards
        c = self.confusion()
        if np.linalg.cond(c) > 1e6:
            return rewards
        r_hat = np.linalg.solve(c, self.levels)
        return r_hat[self._quantize(rewards)]
