"""`fedhe bench ...`: benchmarks that print one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedhe.console import PROFILE_HELP, fail, progress_bar
from protos.errors import WireError
from protos.profiles import DEFAULT_PROFILE

bench_app = typer.Typer(help="Benchmarks that print one JSON object.", no_args_is_help=True)


@bench_app.command("he-adam")
def bench_he_adam(
    steps: int = typer.Option(200, help="HE-Adam steps (one refresh each)."),
    params: int = typer.Option(10_000, help="Vector length."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    degree: int = typer.Option(7, help="Degree of the x^-1/2 polynomial (3, 7 or 15)."),
    interval_upper: float = typer.Option(4.0, "--interval-upper", help="B: P is fitted on [beta2, B]."),
    seed: int = typer.Option(0),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Worker processes per side (default: FEDHE_WORKERS or the cores); "
        "above 1, every step and refresh also runs in-process on the same inputs, for a paired 1-vs-N timing."
    ),
    shards: int = typer.Option(
        0, "--shards", min=0, help="Above 1: the paired side is the step sharded over this many Ray actors "
        "(coordinator.ray_shards) instead of --workers processes."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --shards: join the Ray cluster at this address (default: a local Ray)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """HE-Adam on ciphertexts vs the same Adam in NumPy (gradient scale jumps 10x halfway)."""
    from benchmarks.he_adam import run_he_adam_bench
    from coordinator.he_adam import HEAdamConfig, HEAdamConfigError
    from coordinator.ray_shards import ShardError

    config = HEAdamConfig(lr=0.01, clip_bound=1.0, degree=degree, interval_upper=interval_upper)
    try:
        with progress_bar() as bar:
            task = bar.add_task("HE-Adam steps", total=steps)
            result = run_he_adam_bench(steps, params, profile, config, seed, on_step=lambda _: bar.advance(task),
                                       workers=workers, shards=shards, ray_address=ray_address)
    except (HEAdamConfigError, WireError, ShardError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("encrypted-gradient")
def bench_encrypted_gradient(
    participants: int = typer.Option(3, "--participants", "-n", help="Data owners uploading encrypted rollouts."),
    transitions: int = typer.Option(2048, help="Transitions per participant."),
    hidden: int = typer.Option(16, help="Hidden units of the polynomial actor and critic."),
    obs_dim: int = typer.Option(4, "--obs-dim", help="State dimension (CartPole: 4)."),
    actions: int = typer.Option(2, "--actions", help="Discrete actions (CartPole: 2)."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    clip_bound: float = typer.Option(2.0, "--clip-bound", help="C: deltas are scaled so |G_j| <= C provably."),
    plaintext: bool = typer.Option(False, "--plaintext", help="Run the identical protocol on PlainBackend."),
    upload: str = typer.Option(
        "statistics", "--upload", help="statistics (sufficient statistics, masked) or transitions (every one)."
    ),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """One encrypted-rollout round: gradient on ciphertexts, masked collapse, HE-Adam vs NumPy."""
    from benchmarks.encrypted_gradient import run_encrypted_gradient_bench
    from coordinator.he_adam import HEAdamConfigError
    from protos.profiles import get_profile
    from protos.rollout_layout import BlockLayout

    if min(participants, transitions, hidden, obs_dim, actions) < 1:
        fail("--participants, --transitions, --hidden, --obs-dim and --actions must be positive")
    try:
        slots = get_profile(profile).slots
        blocks = BlockLayout.of(obs_dim, hidden, actions, slots).blocks_for(transitions)
        with progress_bar() as bar:
            task = bar.add_task("gradient blocks", total=participants * blocks if upload == "transitions" else None)
            result = run_encrypted_gradient_bench(
                participants,
                transitions,
                hidden,
                obs_dim,
                actions,
                profile,
                plaintext,
                clip_bound,
                seed,
                on_block=lambda done: bar.update(task, completed=done),
                upload=upload,
            )
    except (HEAdamConfigError, WireError, ValueError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("masking")
def bench_masking(
    participants: int = typer.Option(5, "--participants", "-n", help="Participants (3 or more)."),
    params: int = typer.Option(16384, help="Update length (coordinates)."),
    dropouts: int = typer.Option(1, help="Participants that never answer in the dropout-recovery part."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    scenario: str = typer.Option("cartpole", "--scenario", help="Whose HE-Adam configuration sets the update units."),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """Pairwise masks under CKKS: what a key holder sees of one update, the sum's error, dropout recovery."""
    from benchmarks.masking import run_masking_bench

    try:
        with progress_bar() as bar:
            task = bar.add_task("masking", total=4)
            result = run_masking_bench(participants, params, dropouts, profile, scenario, seed,
                                       on_step=lambda what: bar.update(task, advance=1, description=what))
    except (WireError, ValueError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("egress-guard")
def bench_egress_guard(
    repeats: int = typer.Option(20, help="Replies of each kind to time."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    scenario: str = typer.Option("cartpole", "--scenario", help="Whose model size the replies carry."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """What the egress guard costs per reply: a train reply and the refresher's reply, medians in ms."""
    from benchmarks.egress_guard import run_egress_guard_bench

    try:
        result = run_egress_guard_bench(repeats, profile, scenario)
    except (WireError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("federation")
def bench_federation(
    scenario: str = typer.Option("cartpole", "--scenario", help="Scenario to train."),
    seeds: int = typer.Option(5, help="Seeds per mode (encrypted and plaintext)."),
    participants: int | None = typer.Option(None, "--participants", "-n"),
    rounds: int | None = typer.Option(None, "--rounds", "-r", help="Fixed rounds per run (default: the scenario's)."),
    mode: str = typer.Option("local-ppo", "--mode", help="Training mode: local-ppo or encrypted-rollouts."),
    rollout_upload: str = typer.Option(
        "statistics", "--rollout-upload", help="encrypted-rollouts: owners send statistics or transitions."
    ),
    server_optimizer: str = typer.Option("adam", "--server-optimizer", help="adam (HE-Adam) or sgd (HE-SGD)."),
    masking: str = typer.Option("auto", "--masking", help="Pairwise masks in the encrypted runs: auto, pairwise, off."),
    pipeline_rollouts: bool = typer.Option(
        False, "--pipeline-rollouts", help="local-ppo: collect the next round's rollouts while the coordinator steps."
    ),
    stop_on_solve: bool = typer.Option(
        False, "--stop-on-solve", help="End each run once solved (compare rounds_to_solve, wall_per_round_ratio)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Keep the runs here (default: a temp dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """Encrypted vs plaintext federations over several seeds: returns, rounds to solve, wall-time ratio."""
    from benchmarks.federation import run_federation_bench

    with progress_bar() as bar:
        task = bar.add_task("federations", total=2 * seeds)

        def on_run(mode: str, seed: int, run: dict) -> None:
            bar.update(task, advance=1, description=f"{mode} seed {seed}: return {run['final_return']}")

        try:
            result = run_federation_bench(
                scenario, seeds, participants, rounds, out, on_run=on_run, mode=mode, stop_on_solve=stop_on_solve,
                masking=masking, rollout_upload=rollout_upload, server_optimizer=server_optimizer,
                pipeline_rollouts=pipeline_rollouts,
            )
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("round")
def bench_round(
    scenario: str = typer.Option("cartpole", "--scenario", help="Scenario to profile."),
    rounds: int = typer.Option(8, "--rounds", "-r", help="Rounds per run (the first is warm-up, left out)."),
    participants: int | None = typer.Option(None, "--participants", "-n"),
    seed: int = typer.Option(0),
    out: Path | None = typer.Option(None, "--out", help="Keep the runs here (default: a temp dir)."),
    bandwidth_mbps: float = typer.Option(
        1000.0, "--bandwidth-mbps", min=0.0,
        help="The coordinator's link for the deployed round estimate, Mbit/s (0: transfer left out)."
    ),
    mode: str = typer.Option("local-ppo", "--mode", help="Training mode: local-ppo or encrypted-rollouts."),
    rollout_upload: str = typer.Option(
        "statistics", "--rollout-upload", help="encrypted-rollouts: owners send statistics or transitions."
    ),
    pipeline_rollouts: bool = typer.Option(
        False, "--pipeline-rollouts", help="local-ppo: collect the next round's rollouts while the coordinator steps."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """Where a round's time goes: per-phase medians on each side, encrypted next to plaintext.

    Coordinator phases: messages_out (mask the state, serialize), push, wait (transport and the
    participants' work), read_updates (parse and validate), sum, refresh_in, he_adam, checkpoint.
    Participant phases: decrypt_theta, refresh (the refresher's re-encryption), train,
    mask_encrypt. deployed_round_estimate_s: the round's critical path with one machine per party
    (its parts in deployed_round_parts_s). Example: fedhe bench round --scenario cartpole --json
    """
    from benchmarks.round_profile import run_round_profile

    with progress_bar() as bar:
        task = bar.add_task("federations", total=2)
        try:
            result = run_round_profile(scenario, rounds, participants, seed, out,
                                       on_run=lambda kind: bar.update(task, advance=1, description=f"{kind} done"),
                                       bandwidth_mbps=bandwidth_mbps, mode=mode, rollout_upload=rollout_upload,
                                       pipeline_rollouts=pipeline_rollouts)
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("soak")
def bench_soak(
    rounds: int = typer.Option(200, "--rounds", "-r", help="Rounds to run."),
    participants: int = typer.Option(10, "--participants", "-n", help="Simulated organizations."),
    fail_rate: float = typer.Option(0.1, "--fail-rate", help="Probability that a participant fails a round."),
    scenario: str = typer.Option("cartpole", "--scenario"),
    plaintext: bool = typer.Option(False, "--plaintext", help="Identical protocol without encryption."),
    out: Path | None = typer.Option(None, "--out", help="Keep the run here (default: a temp dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """A long run with random participant failures: every round completes or changes nothing, memory stays flat."""
    from benchmarks.soak import run_soak

    if not 0.0 <= fail_rate < 1.0:
        fail(f"--fail-rate is a probability in [0, 1), got {fail_rate}")
    with progress_bar() as bar:
        task = bar.add_task("rounds", total=rounds)
        try:
            result = run_soak(rounds, participants, fail_rate, scenario, plaintext, out=out,
                              on_round=lambda r: bar.update(task, completed=r))
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("seal-ops")
def bench_seal_ops(
    repeats: int = typer.Option(9, min=1, help="Timed runs of each operation (interleaved)."),
    profiles: list[str] | None = typer.Option(None, "--profile", help="Repeatable; default: every profile."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """Seeded uploads and last-level downloads vs TenSEAL's defaults, per profile: median ms and bytes."""
    from benchmarks.seal_ops import run_seal_ops_bench

    try:
        result = run_seal_ops_bench(repeats, profiles)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"{what} takes comma-separated whole numbers, e.g. 1000,10000; got {text!r}")
    if not values or min(values) < 1:
        fail(f"{what} needs at least one positive value, got {text!r}")
    return values


@bench_app.command("scale")
def bench_scale(
    params: str = typer.Option("1000,10000,100000,1000000", "--params", help="Model sizes, comma-separated."),
    participants: str = typer.Option("3,10,30", "--participants", "-n", help="Federation sizes, comma-separated."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Worker processes per side (default: FEDHE_WORKERS or the cores)."
    ),
    shards: int = typer.Option(
        0, "--shards", min=0, help="Above 1: the coordinator's side runs on this many Ray actors that own the "
        "state and the running sum (coordinator.ray_shards); the refresher keeps --workers processes."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --shards: join the Ray cluster at this address (default: a local Ray)."
    ),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """One round's HE work per model size and participant count (real HE, synthetic updates), plus a linear fit.

    Each row runs in a fresh process: coordinator_ms, participant_ms, bytes_up, bytes_down, peak_rss_mb.
    Quick run: fedhe bench scale --params 1000,10000 --participants 3,10 --json
    """
    from benchmarks.scale import run_scale_bench

    sizes, counts = _int_list(params, "--params"), _int_list(participants, "--participants")
    with progress_bar() as bar:
        task = bar.add_task("rows", total=len(sizes) * len(counts))

        def on_row(row: dict) -> None:
            bar.update(task, advance=1, description=f"{row['params']} params x {row['participants']}: "
                                                    f"{row['coordinator_ms']:.0f} ms")

        try:
            result = run_scale_bench(sizes, counts, profile, workers, seed, on_row=on_row, shards=shards,
                                     ray_address=ray_address)
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))
