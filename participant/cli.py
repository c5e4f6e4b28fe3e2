"""The `fedhe` command line.

It lives on the participant side because most of its commands need the federation's secret key
(keygen, evaluate, simulate runs the participants too); coordinator code never imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protos.errors import WireError
from protos.profiles import DEFAULT_PROFILE, PROFILES

app = typer.Typer(
    help=(
        "fedhe-rl: federated reinforcement learning where participants share only CKKS "
        "ciphertexts and the coordinator trains the policy with HE-Adam without a secret key.\n\n"
        "Start with `fedhe simulate` (an encrypted CartPole federation on this machine)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Inspect federation key files and seal them for organizations.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print one JSON object.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True, soft_wrap=True)
PROFILE_HELP = "HE profile (CKKS parameter set): " + "; ".join(
    f"{p.name}: {p.description}" for p in PROFILES.values()
)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="Directory for participant.ctx, coordinator.ctx, fingerprint.txt."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
) -> None:
    """Create a federation key (the key ceremony).

    participant.ctx holds the SECRET key (mode 0600): copy it to every participant out of band.
    coordinator.ctx holds only evaluation keys (public + relinearization): give it to the
    coordinator. Both carry the fingerprint in fingerprint.txt; every message is checked
    against it.
    """
    from participant.keyholder import generate_keys

    try:
        keys = generate_keys(out, profile)
    except (WireError, ValueError) as exc:
        fail(str(exc))
    console.print(f"federation key [bold]{keys.fingerprint}[/] (profile {keys.profile.name})")
    console.print(f"  secret, for participants : {keys.participant_key}")
    console.print(f"  evaluation, coordinator  : {keys.coordinator_key}")


@keys_app.command("inspect")
def keys_inspect(
    file: Path = typer.Argument(..., help="A participant.ctx or coordinator.ctx file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a key file's profile, fingerprint, whether it holds a secret key, and its size."""
    from protos.keyfile import inspect_key_file

    try:
        info = inspect_key_file(file)
    except WireError as exc:
        fail(str(exc))
    data = {
        "file": str(info.path),
        "profile": info.profile.name,
        "fingerprint": info.fingerprint,
        "secret_key": info.has_secret_key,
        "relin_keys": info.has_relin_keys,
        "size_bytes": info.size_bytes,
        "security_bits": info.profile.security_bits,
    }
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=str(file), show_header=False)
    for key, value in data.items():
        table.add_row(key, str(value))
    Console().print(table)


@keys_app.command("recipient")
def keys_recipient(
    out: Path = typer.Option(..., "--out", help="Path prefix: writes PREFIX.x25519 (private, 0600) and PREFIX.x25519.pub."),
) -> None:
    """Create this organization's X25519 key pair for receiving sealed key files.

    Send PREFIX.x25519.pub to whoever runs the key ceremony; keep PREFIX.x25519 private.
    """
    from participant.sealing import create_recipient

    try:
        private, public = create_recipient(out)
    except WireError as exc:
        fail(str(exc))
    console.print(f"private: {private}\npublic (share this): {public}")


@keys_app.command("seal")
def keys_seal(
    file: Path = typer.Argument(..., help="File to seal, typically participant.ctx."),
    to: Path = typer.Option(..., "--to", help="The recipient organization's PREFIX.x25519.pub."),
    out: Path = typer.Option(..., "--out", help="Where to write the sealed file."),
) -> None:
    """Seal a key file for one organization (X25519 + AES-256-GCM); it can then travel over any channel."""
    from participant.sealing import seal_file

    if not file.is_file():
        fail(f"{file} not found")
    try:
        fingerprint = seal_file(file, to, out)
    except WireError as exc:
        fail(str(exc))
    console.print(f"sealed {file} for recipient {fingerprint} -> {out}")


@keys_app.command("unseal")
def keys_unseal(
    sealed: Path = typer.Argument(..., help="A file written by `fedhe keys seal`."),
    key: Path = typer.Option(..., "--key", help="This organization's PREFIX.x25519 private key."),
    out: Path = typer.Option(..., "--out", help="Output file or directory (the file gets mode 0600)."),
) -> None:
    """Recover a sealed key file with this organization's private key (tampering is detected)."""
    from participant.sealing import unseal_file

    try:
        target = unseal_file(sealed, key, out)
    except WireError as exc:
        fail(str(exc))
    console.print(f"unsealed -> {target}")


@bench_app.command("he-adam")
def bench_he_adam(
    steps: int = typer.Option(200, help="HE-Adam steps (one refresh each)."),
    params: int = typer.Option(10_000, help="Vector length."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    degree: int = typer.Option(7, help="Degree of the x^-1/2 polynomial (3, 7 or 15)."),
    interval_upper: float = typer.Option(4.0, "--interval-upper", help="B: P is fitted on [beta2, B]."),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """HE-Adam on ciphertexts vs the same Adam in NumPy (gradient scale jumps 10x halfway)."""
    from coordinator.he_adam import HEAdamConfig, HEAdamConfigError
    from participant.bench_he_adam import run_he_adam_bench

    config = HEAdamConfig(lr=0.01, clip_bound=1.0, degree=degree, interval_upper=interval_upper)
    try:
        with progress_bar() as bar:
            task = bar.add_task("HE-Adam steps", total=steps)
            result = run_he_adam_bench(
                steps, params, profile, config, seed, on_step=lambda _: bar.advance(task)
            )
    except (HEAdamConfigError, WireError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@bench_app.command("federation")
def bench_federation(
    scenario: str = typer.Option("cartpole", "--scenario", help="Scenario to train."),
    seeds: int = typer.Option(5, help="Seeds per mode (encrypted and plaintext)."),
    participants: Optional[int] = typer.Option(None, "--participants", "-n"),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", help="Fixed rounds per run (default: the scenario's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Keep the runs here (default: a temp dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """Encrypted vs plaintext federations over several seeds: returns, rounds to solve, wall-time ratio."""
    from participant.bench_federation import run_federation_bench

    with progress_bar() as bar:
        task = bar.add_task("federations", total=2 * seeds)

        def on_run(mode: str, seed: int, run: dict) -> None:
            bar.update(task, advance=1, description=f"{mode} seed {seed}: return {run['final_return']}")

        try:
            result = run_federation_bench(scenario, seeds, participants, rounds, out, on_run=on_run)
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@app.command()
def scenarios() -> None:
    """List the scenarios you can train: built-ins and installed `fedhe.scenarios` entry points."""
    from scenarios import list_scenarios

    table = Table(title="scenarios (also: any .py file defining SCENARIO = Scenario(...))")
    table.add_column("name")
    table.add_column("source / description")
    for name, description in list_scenarios():
        table.add_row(name, description)
    Console().print(table)


@app.command()
def simulate(
    scenario: str = typer.Argument("cartpole", help="Built-in name, installed entry point, or path/to/file.py defining SCENARIO."),
    participants: Optional[int] = typer.Option(None, "--participants", "-n", help="Simulated organizations (default: the scenario's)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", help="Federated rounds (default: the scenario's)."),
    seed: Optional[int] = typer.Option(None, help="Seed for policy init and environments (default: the scenario's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory: checkpoint, metrics.jsonl, summary.json, learning_curve.png, keys/ (default: runs/SCENARIO-TIMESTAMP)."),
    plaintext: bool = typer.Option(False, "--plaintext", help="Same protocol with encryption replaced by identity (baseline for overhead ratios)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    key_dir: Optional[Path] = typer.Option(None, "--key-dir", help="Existing federation keys (default: create DIR/keys)."),
    stop_on_solve: bool = typer.Option(True, "--stop-on-solve/--no-stop-on-solve", help="End once the mean return over the last 100 episodes reaches the env's threshold."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower and Ray logs."),
) -> None:
    """Train one policy with a simulated federation on this machine (Flower simulation engine).

    With no arguments: encrypted CartPole with 3 participants. Only CKKS ciphertexts leave the simulated participants; the coordinator never holds a secret key.

    Examples: `fedhe simulate --out runs/c1`, `fedhe simulate acrobot -n 5 -r 80 --out runs/a1`, `fedhe simulate my_scenario.py --plaintext --out runs/p1`, `fedhe simulate --resume --out runs/c1`. Afterwards: `fedhe evaluate runs/c1`.
    """
    from participant.simulate import simulate as run
    from protos.settings import RunSettings
    from scenarios import load_scenario

    try:
        spec = load_scenario(scenario)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if out is None:
        if resume:
            fail("--resume needs the run directory: --out DIR")
        out = Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume and not (out / "checkpoint.pb").exists():
        fail(f"--resume: no checkpoint in {out}; run without --resume first")
    if not resume and (out / "checkpoint.pb").exists():
        fail(f"{out} already holds a run; use --resume to continue it or choose another --out")
    n = participants or spec.num_participants
    total = rounds or spec.rounds
    settings = RunSettings(
        scenario=scenario, num_server_rounds=total, plaintext=plaintext, out_dir=str(out),
        resume=resume, seed=spec.seed if seed is None else seed, stop_on_solve=stop_on_solve,
        min_participants=max(1, n - 1),
    )
    mode = "plaintext baseline" if plaintext else f"encrypted, {spec.he_profile}"
    console.print(f"[bold]{spec.name}[/]: {n} participants, up to {total} rounds ({mode}) -> {out}")
    with progress_bar() as bar:
        task = bar.add_task("rounds", total=total)

        def on_round(outcome, released) -> None:
            ret = "" if not released or released.get("mean_return") is None else f" return {released['mean_return']:.1f}"
            bar.update(task, completed=outcome.round, description=f"round {outcome.round}{ret}")

        try:
            summary = run(spec, settings, n, key_dir, on_round=on_round, verbose=verbose)
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    print_summary(summary, out)


@app.command()
def robustness(
    scenario: str = typer.Argument("cartpole", help="Built-in name, installed entry point, or path/to/file.py defining SCENARIO."),
    participants: int = typer.Option(10, "--participants", "-n", help="Simulated organizations."),
    malicious: int = typer.Option(3, "--malicious", "-m", help="How many of them misbehave (indices 0..m-1)."),
    attack: list[str] = typer.Option(["sign-flip"], "--attack", help="Repeatable. sign-flip, scale, noise, zero, reward-flip, reward-shuffle, random-action, alie, ipm (see participant/attacks.py)."),
    defense: list[str] = typer.Option(["none", "median-norm"], "--defense", help="Repeatable. none, norm-bound, median-norm (encrypted masked norms), dp (distributed Gaussian noise)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per cell (0..K-1)."),
    rounds: int = typer.Option(150, "--rounds", "-r", help="Round cap per run (runs stop once solved)."),
    out: Path = typer.Option(Path("fedhe-robustness"), "--out", help="Directory: robustness.json, robustness.md, robustness.png, cells/ (reused when re-run)."),
    dp_noise: float = typer.Option(1.0, "--dp-noise", help="Noise multiplier z for --defense dp."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="delta for the reported epsilon."),
    bound: float = typer.Option(0.0, "--bound", help="norm-bound's L2 bound per update (0: the scenario's clip bound C)."),
    profile: str = typer.Option("n16k-d7", "--profile", help="HE profile for every cell (robust defenses need one spare level). " + PROFILE_HELP),
    plaintext: bool = typer.Option(False, "--plaintext", help="Same protocol without encryption (debugging only)."),
    no_clean: bool = typer.Option(False, "--no-clean", help="Skip the clean (attack none) baselines."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    train: list[str] = typer.Option([], "--train", help="Repeatable. Policy robustness mode: vanilla, sa-ppo, noise-injection, reward-defense; trains one encrypted federation per mode and seed and attacks the decrypted policy. Uses the scenario's participants and rounds unless -n/-r are given."),
    eval_attack: list[str] = typer.Option([], "--eval-attack", help="Repeatable. Evaluation-time attack on the trained policy: fgsm, pgd, mad, gaussian, action (see participant/eval_attacks.py)."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Eval-attack budget: l-inf radius in per-dimension state stds (see --std-source); also the action attack's alpha unless --alpha is given."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Policy robustness mode: probability of the adversarial action for --eval-attack action (default: --epsilon, clipped to [0, 1])."),
    episodes: int = typer.Option(20, "--episodes", help="Greedy evaluation episodes per policy (policy robustness mode)."),
    stop_on_solve: bool = typer.Option(False, "--stop-on-solve", help="Policy robustness mode: stop each federation once solved (default: every federation trains the scenario's full round budget, so train modes are compared at equal training)."),
    std_source: str = typer.Option("reference", "--std-source", help="State std (sigma) for epsilon: reference (default; the scenario's fixed sigma, same for every policy: SA-DQN's published stds for cartpole/acrobot, else a uniform random policy's states; SA-PPO/noise training use it too), random (a uniform random policy's states) or clean (the evaluated policy's own clean greedy states)."),
) -> None:
    """Measure robustness with encrypted federations: Byzantine participants, or attacks on trained policies.

    \b
    Malicious participants x robust aggregation (default mode):
      fedhe robustness cartpole -n 10 -m 3 --attack sign-flip --defense none --defense median-norm
    writes OUT/robustness.json (one row per attack, defense, seed), OUT/robustness.md (return,
    % of the clean baseline, slowdown) and OUT/robustness.png; clean baselines (attack none) run
    for every defense unless --no-clean.

    \b
    Attacks on trained policies (any --train or --eval-attack):
      fedhe robustness cartpole --train vanilla --train sa-ppo --eval-attack fgsm --eval-attack gaussian --epsilon 0.5 --seeds 3
    trains one encrypted federation per train mode and seed, attacks the decrypted policy and writes
    rows with train, eval_attack, epsilon, clean_return, attacked_return, crr, pd_tv, pd_kl, pd_flip,
    asr to OUT/robustness.json, the source document's tables (baseline / under attack / % drop /
    policy deviation; % of baseline restored) to OUT/robustness.md and attribution plots to
    OUT/attributions/. Definitions and measured tables: docs/threat-lab.md.
    """
    if train or eval_attack:
        policy_robustness(scenario, train or ["vanilla"], eval_attack or ["fgsm", "gaussian"], epsilon, seeds, out,
                          episodes, participants_given(participants), rounds_given(rounds), plaintext, std_source,
                          stop_on_solve, alpha, as_json)
        return
    from participant.robustness import GridSpec, run_grid

    spec = GridSpec(
        scenario=scenario, out=out, participants=participants, malicious=malicious, attacks=list(attack),
        defenses=list(defense), seeds=seeds, rounds=rounds, dp_noise_multiplier=dp_noise, dp_delta=dp_delta,
        defense_bound=bound, he_profile=profile, plaintext=plaintext, clean=not no_clean,
    )
    try:
        spec.validate()
        load_scenario_or_fail(scenario)
        with progress_bar() as bar:
            task = bar.add_task("federations", total=None)

            def on_row(row: dict, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total,
                           description=f"{row['attack']}/{row['defense']} seed {row['seed']}: return {row['final_return']}")

            rows = run_grid(spec, on_row=on_row)
    except (WireError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    console.print((out / "robustness.md").read_text())
    console.print(f"rows: {out / 'robustness.json'}   plot: {out / 'robustness.png'}")


def participants_given(value: int) -> Optional[int]:
    """The Byzantine grid's -n default (10) means "the scenario's" in policy robustness mode."""
    return None if value == 10 else value


def rounds_given(value: int) -> Optional[int]:
    return None if value == 150 else value


def policy_robustness(scenario: str, trains: list[str], attacks: list[str], epsilon: float, seeds: int, out: Path,
                      episodes: int, participants: Optional[int], rounds: Optional[int], plaintext: bool,
                      std_source: str, stop_on_solve: bool, alpha: Optional[float], as_json: bool) -> None:
    from participant.eval_attacks import ATTACKS
    from participant.policy_robustness import STD_SOURCES, TRAIN_MODES, run_policy_robustness

    for name in trains:
        if name not in TRAIN_MODES:
            fail(f"unknown --train {name!r}; known: {', '.join(TRAIN_MODES)}")
    for name in attacks:
        if name not in ATTACKS:
            fail(f"unknown --eval-attack {name!r}; known: {', '.join(ATTACKS)}")
    if std_source not in STD_SOURCES:
        fail(f"--std-source must be one of {', '.join(STD_SOURCES)}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        fail(f"--alpha is a probability: it must be in [0, 1], got {alpha}")
    load_scenario_or_fail(scenario)
    try:
        with progress_bar() as bar:
            task = bar.add_task("federations", total=None)

            def on_run(train: str, seed: int, run: dict) -> None:
                bar.update(task, advance=1, description=f"{train} seed {seed}: clean return {run['clean_return']:.1f}")

            report = run_policy_robustness(scenario, trains, attacks, epsilon, seeds, out, episodes=episodes,
                                           rounds=rounds, plaintext=plaintext, std_source=std_source,
                                           participants=participants, on_run=on_run, stem="robustness",
                                           stop_on_solve=stop_on_solve, alpha=alpha)
    except (WireError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"rows": report["rows"], "summary": report["summary"]}))
        return
    console.print((out / "robustness.md").read_text())
    console.print(f"rows: {out / 'robustness.json'}")


def load_scenario_or_fail(ref: str):
    from scenarios import load_scenario

    try:
        return load_scenario(ref)
    except (ValueError, OSError) as exc:
        fail(str(exc))


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A directory written by `fedhe simulate --out` (or the coordinator's out-dir)."),
    key_dir: Optional[Path] = typer.Option(None, "--key-dir", help="Directory with participant.ctx (default: RUN_DIR/keys)."),
    episodes: int = typer.Option(20, help="Greedy evaluation episodes."),
    scenario: Optional[str] = typer.Option(None, help="Override the scenario recorded in RUN_DIR/run.json."),
    participant_index: int = typer.Option(0, help="Whose environment variant to evaluate in."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON."),
) -> None:
    """Decrypt the latest checkpoint's policy (needs the secret key) and evaluate it greedily."""
    from participant.evaluate import evaluate_run

    try:
        result = evaluate_run(run_dir, key_dir, episodes, scenario, participant_index)
    except (WireError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"greedy evaluation of {run_dir}", show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    Console().print(table)


def print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"summary ({out / 'summary.json'})", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value).lower() if isinstance(value, bool) else str(value))
    Console().print(table)
    console.print(f"learning curve: {out / 'learning_curve.png'}   metrics: {out / 'metrics.jsonl'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
