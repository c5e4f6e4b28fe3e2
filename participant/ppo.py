"""One participant's local PPO round: collect, estimate advantages, optimise, report the update.

The update leaves the participant (clipped and encrypted by the caller); everything
else (environments, RNG state, episodes in progress) stays local across rounds.

Pipelined rounds (``prefetch``): once a round's update is computed, the next round's rollouts are
collected in a background thread with the theta this round started from, while the update is
encrypted, sent, aggregated and stepped. The next round optimises from the new theta on those
rollouts; PPO's probability ratio is taken against the policy that collected them (their stored
log-probabilities), which is what the ratio is for. Rollouts whose behaviour policy is older than
the previous round's theta (the participant sat out a round) are dropped and collected afresh.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from protos.update_units import clip_l2
from scenarios.adversarial import (
    PerturbedRewardCorrection,
    RunningStd,
    batch_obs_std,
    kl_regularizer_and_grad,
    pgd_max_kl,
)
from scenarios.policy import Policy, PPOBatch, PPOLossInfo
from scenarios.rollout import Rollout, RolloutCollector, compute_gae
from scenarios.scenario import Scenario


@dataclass(frozen=True)
class LocalResult:
    """``update`` follows the descent convention: the server does ``theta -= lr * adam(update)``."""

    update: np.ndarray
    episode_returns: list[float]
    steps: int
    episodes: int
    stats: dict[str, float] = field(default_factory=dict)


class Adam:
    """Plain Adam with bias correction; a fresh one per round keeps no state across rounds."""

    def __init__(self, size: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-5) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = np.zeros(size)
        self.v = np.zeros(size)
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray) -> None:
        """Update ``theta`` in place."""
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        theta -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def annealed(round: int, total_rounds: int, floor: float = 0.1) -> float:
    """Linear learning-rate decay over the run; the floor keeps late joiners learning."""
    return min(1.0, max(floor, 1.0 - (round - 1) / max(total_rounds, 1)))


class ParticipantTrainer:
    """Holds a participant's vector envs and RNG so episodes continue across rounds.

    ``seed`` is the participant's own randomness (``NodeIdentity.randomness``: OS entropy unless its
    node policy opts into a seed); an int (tests, single-process benchmarks) is combined with the index.
    Environment seeds, action sampling and minibatch order all come from it.
    """

    def __init__(
        self, scenario: Scenario, participant_index: int, seed: int | np.random.SeedSequence, variant: str | None = None
    ) -> None:
        self.scenario = scenario
        self.spec = scenario.policy_spec()
        entropy = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(
            [seed, participant_index])
        env_seed, rng_seed = entropy.generate_state(2)
        self.rng = np.random.default_rng(int(rng_seed))
        self.env = scenario.build_vector_env(participant_index, int(env_seed), variant)
        self.collector = RolloutCollector(self.env, int(env_seed))
        robust = scenario.ppo.robust
        # Participant-local robust-training state (never sent): its own RNG so that robust modes
        # do not shift the vanilla RNG stream, the running state scale, the reward statistics.
        self.robust_rng = np.random.default_rng([int(rng_seed), 5])
        self.obs_std = RunningStd(self.spec.obs_dim)
        self.reward_correction = PerturbedRewardCorrection() if robust.mode == "reward-defense" else None
        self._round = 0
        self._prefetch: tuple[int, Future[Rollout]] | None = None  # (the round it is for, its collection)
        self._collector_thread: ThreadPoolExecutor | None = None

    def train(self, theta: np.ndarray, round: int, total_rounds: int | None = None,
              prefetch: bool = False) -> LocalResult:
        """Run one local round starting from the shared ``theta`` (not modified); ``prefetch``: then
        start collecting the next round's rollouts with ``theta`` (module docstring)."""
        self._round = int(round)  # the lr and SA-PPO kappa schedules use it
        cfg = self.scenario.ppo
        total = total_rounds or self.scenario.rounds
        self._lr = cfg.lr * (annealed(round, total) if cfg.anneal_lr else 1.0)
        theta_in = np.array(theta, dtype=np.float64)
        if theta_in.shape != (self.spec.num_params,):
            raise ValueError(f"theta has shape {theta_in.shape}, scenario needs ({self.spec.num_params},)")
        rollout = self._prefetched(round)
        if rollout is None:
            rollout = self._collect(theta_in)
        result = self._learn(theta_in, rollout)
        if prefetch and round < total:
            self._collector_thread = self._collector_thread or ThreadPoolExecutor(1, "fedhe-rollouts")
            self._prefetch = (round + 1, self._collector_thread.submit(self._collect, theta_in))
        return result

    def _collect(self, theta: np.ndarray) -> Rollout:
        cfg = self.scenario.ppo
        return self.collector.collect(Policy(self.spec, theta), cfg.steps_per_env, self.rng, cfg.gamma,
                                      cfg.reward_scale, obs_fn=self._obs_fn(), reward_fn=self._reward_fn())

    def _prefetched(self, round: int) -> Rollout | None:
        """The rollouts collected for ``round`` in the background (its collection's error is this round's);
        None if there are none, or they are for another round (they are waited for and dropped)."""
        if self._prefetch is None:
            return None
        (for_round, future), self._prefetch = self._prefetch, None
        if for_round != round:
            future.exception()  # never two collections on the same environments at once
            return None
        return future.result()

    def _learn(self, theta_in: np.ndarray, rollout: Rollout) -> LocalResult:
        cfg = self.scenario.ppo
        rollout = self._correct_rewards(rollout)
        batch = _flatten(rollout, cfg.gamma, cfg.gae_lambda)
        self._radius = cfg.robust.epsilon * self._sigma(batch.obs) if cfg.robust.mode == "sa-ppo" else None
        self._sa_kl: list[float] = []
        if self.scenario.update == "gradient":
            policy = Policy(self.spec, theta_in)
            info, update = policy.ppo_loss_and_grad(
                _normalized(batch, cfg.normalize_advantages), cfg.clip_coef, cfg.ent_coef, cfg.vf_coef
            )
            update += self._sa_ppo_grad(policy, batch.obs)
            infos = [info]
        else:
            theta_out, infos = self._optimise(theta_in.copy(), batch)
            update = theta_in - theta_out
        returns = rollout.episode_returns
        stats = _mean_stats(infos)
        if self._sa_kl:
            stats["sa_kl"] = float(np.mean(self._sa_kl))
        return LocalResult(
            update=update, episode_returns=returns, steps=cfg.batch_size, episodes=len(returns), stats=stats
        )

    # ----- robust training (participant-local) ------------------------------
    def _sigma(self, obs: np.ndarray) -> np.ndarray:
        """Per-dimension scale of epsilon: the configured fixed sigma, else the local batch's std."""
        fixed = self.scenario.ppo.robust.obs_std
        if fixed:
            if len(fixed) != self.spec.obs_dim:
                raise ValueError(f"ppo.robust.obs_std has {len(fixed)} entries, observations have {self.spec.obs_dim}")
            return np.asarray(fixed, dtype=np.float64)
        return batch_obs_std(obs)

    def _obs_fn(self):
        robust = self.scenario.ppo.robust
        if robust.mode != "noise-injection" or robust.epsilon <= 0:
            return None

        def noisy(obs: np.ndarray) -> np.ndarray:
            if robust.obs_std:
                sigma = np.asarray(robust.obs_std, dtype=np.float64)
            else:
                self.obs_std.update(obs)  # the clean observation's scale, learned locally
                sigma = self.obs_std.std
            return obs + robust.epsilon * sigma * self.robust_rng.standard_normal(obs.shape)

        return noisy

    def _reward_fn(self):
        robust = self.scenario.ppo.robust
        if robust.reward_flip_rate <= 0 and robust.reward_noise_std <= 0:
            return None

        def tamper(rewards: np.ndarray) -> np.ndarray:
            flip = self.robust_rng.random(rewards.shape) < robust.reward_flip_rate
            out = np.where(flip, -rewards, rewards)
            if robust.reward_noise_std > 0:
                out = out + robust.reward_noise_std * self.robust_rng.standard_normal(rewards.shape)
            return out

        return tamper

    def _correct_rewards(self, rollout: Rollout) -> Rollout:
        if self.reward_correction is None or rollout.raw_rewards is None:
            return rollout
        self.reward_correction.update(rollout.raw_rewards, rollout.obs, rollout.actions)
        surrogate = self.reward_correction.surrogate(rollout.raw_rewards)
        rewards = self.scenario.ppo.reward_scale * surrogate + rollout.bootstrap
        return dataclasses.replace(rollout, rewards=rewards)

    def kappa(self) -> float:
        robust = self.scenario.ppo.robust
        if robust.mode != "sa-ppo":
            return 0.0
        if robust.kappa_ramp_rounds <= 0:
            return robust.kappa
        return robust.kappa * min(1.0, max(self._round, 1) / robust.kappa_ramp_rounds)

    def _sa_ppo_grad(self, policy: Policy, obs: np.ndarray) -> np.ndarray:
        kappa = self.kappa()
        if kappa <= 0 or self._radius is None:
            return np.zeros_like(policy.theta)
        robust = self.scenario.ppo.robust
        obs_hat = pgd_max_kl(policy, obs, self._radius, robust.attack_steps, self.robust_rng)
        kl, grad = kl_regularizer_and_grad(policy, obs, obs_hat)
        self._sa_kl.append(kl)
        return kappa * grad

    def _optimise(self, theta: np.ndarray, batch: PPOBatch) -> tuple[np.ndarray, list[PPOLossInfo]]:
        cfg = self.scenario.ppo
        adam = Adam(theta.size, self._lr)
        policy = Policy(self.spec, theta)  # views into theta: Adam's in-place steps are seen by the policy
        n = batch.obs.shape[0]
        infos = []
        for _ in range(cfg.epochs):
            for idx in np.array_split(self.rng.permutation(n), cfg.minibatches):
                mb = _normalized(_take(batch, idx), cfg.normalize_advantages)
                info, grad = policy.ppo_loss_and_grad(mb, cfg.clip_coef, cfg.ent_coef, cfg.vf_coef)
                grad += self._sa_ppo_grad(policy, mb.obs)
                adam.step(theta, clip_l2(grad, cfg.max_grad_norm))
                infos.append(info)
        return theta, infos

    def close(self) -> None:
        if self._collector_thread is not None:
            self._collector_thread.shutdown(wait=True)  # a collection in flight finishes before its envs close
        self.env.close()


def _flatten(rollout: Rollout, gamma: float, lam: float) -> PPOBatch:
    advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value, gamma, lam)
    steps, envs = rollout.rewards.shape
    return PPOBatch(
        obs=rollout.obs.reshape(steps * envs, -1),
        actions=rollout.actions.reshape(steps * envs, *rollout.actions.shape[2:]),
        old_log_probs=rollout.log_probs.reshape(-1),
        advantages=advantages.reshape(-1),
        returns=returns.reshape(-1),
    )


def _take(batch: PPOBatch, idx: np.ndarray) -> PPOBatch:
    return PPOBatch(
        batch.obs[idx], batch.actions[idx], batch.old_log_probs[idx], batch.advantages[idx], batch.returns[idx]
    )


def _normalized(batch: PPOBatch, enabled: bool) -> PPOBatch:
    if not enabled or batch.advantages.size < 2:
        return batch
    adv = batch.advantages
    return PPOBatch(
        batch.obs, batch.actions, batch.old_log_probs, (adv - adv.mean()) / (adv.std() + 1e-8), batch.returns
    )


def _mean_stats(infos: list[PPOLossInfo]) -> dict[str, float]:
    keys = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")
    return {k: float(np.mean([getattr(i, k) for i in infos])) for k in keys}
