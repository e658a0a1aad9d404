"""`fedloop simulate`: the command, a live rich progress display, and the per-round table.

The lead registers it in ``fedloop/cli.py`` with ``app.command()(simulate)``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedloop._loading import parse_sets
from fedloop.errors import FedloopError
from fedloop.sim.core import (
    AgentFailed,
    AgentResult,
    Backend,
    Observer,
    RoundSummary,
    SimResult,
    SimSettings,
    run_simulation,
)

__all__ = ["RichObserver", "history_table", "parse_sets", "simulate", "write_report"]


def _short(metrics: dict[str, float], limit: int = 3) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:limit])


class RichObserver(Observer):
    """Draws the run live: rounds done, agents done in this round, the latest metrics."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._rounds: TaskID | None = None
        self._agents: TaskID | None = None

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_start(self, settings: SimSettings, backend: str, per_round: int) -> None:
        self.console.print(
            f"simulating {settings.num_agents} agents, {per_round} per round, "
            f"{settings.rounds} rounds, strategy {settings.strategy} — {backend}"
        )
        self._rounds = self.progress.add_task("rounds", total=settings.rounds, info="")
        self._agents = self.progress.add_task("agents", total=per_round, info="")

    def on_phase(self, text: str) -> None:
        if self._agents is not None:
            self.progress.update(self._agents, info=text)

    def on_round_start(self, round_number: int, agents: int) -> None:
        assert self._agents is not None
        self.progress.reset(
            self._agents, total=agents, description=f"round {round_number}", info=""
        )

    def on_agent_done(self, round_number: int, result: AgentResult, done: int, total: int) -> None:
        assert self._agents is not None
        self.progress.update(self._agents, completed=done, info=_short(result.metrics))

    def on_round_end(self, summary: RoundSummary) -> None:
        assert self._rounds is not None and self._agents is not None
        shown = summary.global_metrics or {
            f"local {k}": v for k, v in summary.local_metrics_mean.items()
        }
        self.progress.update(
            self._rounds,
            completed=summary.round,
            info=f"round {summary.round}: {_short(shown)}  {summary.seconds:.2f} s",
        )
        self.progress.update(self._agents, info="aggregated")


def history_table(data_dir: Path) -> tuple[Table, list[dict[str, Any]]]:
    """Return the run's per-round table (the columns of `fedloop history`) and its rows."""
    from fedloop.history import history_rows
    from fedloop.history import history_table as table_of
    from fedloop.store.db import Store, database_url

    store = Store(database_url(data_dir, None))
    try:
        rows = history_rows(store)
    finally:
        store.close()
    return table_of(rows, f"fedloop simulate — {data_dir}"), rows


def write_report(data_dir: Path, plots: bool = True) -> Path | None:
    """Write `fedloop report`'s HTML page for the run if `fedloop.report` offers it; its path."""
    try:
        module = importlib.import_module("fedloop.report")
    except ImportError:
        return None
    open_records = getattr(module, "open_records", None)
    writer = getattr(module, "write_report", None)
    if not callable(open_records) or not callable(writer):
        return None
    files = writer(open_records(data_dir), data_dir / "report", source=str(data_dir), plots=plots)
    html = getattr(files, "html", None)
    return Path(html) if html is not None else data_dir / "report"


def _backend(
    engine: str,
    workers: int | None,
    pool: str,
    ray_address: str | None,
    cpus_per_agent: float,
    gpus_per_agent: float,
) -> Backend:
    if engine == "local":
        from fedloop.sim.local import LocalBackend

        if ray_address is not None:
            raise FedloopError("--ray-address needs --engine ray")
        return LocalBackend(workers, pool)  # type: ignore[arg-type]
    if engine == "ray":
        from fedloop.sim.ray import RayBackend

        return RayBackend(ray_address, cpus_per_agent, gpus_per_agent, num_cpus=workers)
    raise FedloopError(f"--engine must be local or ray, not {engine!r}")


def simulate(
    factory: Annotated[
        str,
        typer.Argument(
            help="Engine factory module:callable, called as "
            "factory(agent_index=i, num_agents=N, **--set) for each virtual agent."
        ),
    ],
    agents: Annotated[int, typer.Option("--agents", "-n", help="Virtual agents (N).")] = 10,
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 10,
    fraction: Annotated[
        float, typer.Option("--fraction", "-C", help="Agents sampled per round: ceil(C·N).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the per-round sampling.")] = 0,
    set_: Annotated[
        list[str], typer.Option("--set", help="key=value passed to the engine factory.")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    strategy: Annotated[str, typer.Option(help="Aggregation strategy (fedavg, fedadam, …).")] = (
        "fedavg"
    ),
    strategy_set: Annotated[
        list[str], typer.Option("--strategy-set", help="key=value strategy parameter.")
    ] = [],  # noqa: B006
    data_dir: Annotated[Path, typer.Option(help="Where the run's database and models go.")] = Path(
        "fedloop-sim"
    ),
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier run's database in --data-dir.")
    ] = False,
    keep_local_models: Annotated[
        bool,
        typer.Option(
            help="Store every local model's bytes too (their rows, with metrics and content "
            "address, are always kept)."
        ),
    ] = False,
    engine: Annotated[str, typer.Option(help="Where agents train: local or ray.")] = "local",
    workers: Annotated[
        int | None,
        typer.Option(
            help="local: worker processes/threads (default: CPUs); ray: CPUs of a local Ray."
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="local: process or thread workers.")] = "process",
    ray_address: Annotated[
        str | None, typer.Option(help="ray: cluster address (default: start a local Ray).")
    ] = None,
    cpus_per_agent: Annotated[float, typer.Option(help="ray: CPUs per agent task.")] = 1.0,
    gpus_per_agent: Annotated[
        float, typer.Option(help="ray: GPU fraction per agent (0.25 = 4 agents per GPU).")
    ] = 0.0,
    evaluate: Annotated[
        bool, typer.Option(help="Evaluate each global model with agent 0's engine.")
    ] = True,
    report: Annotated[bool, typer.Option(help="Write the HTML report at the end.")] = True,
    progress: Annotated[bool, typer.Option(help="Show the live progress display.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary last.")] = False,
    verbose: Annotated[bool, typer.Option(help="Log the aggregator's every step.")] = False,
) -> None:
    """Simulate N virtual agents over the real aggregator and strategy, on this machine or Ray."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out = Console() if sys.stdout.isatty() else Console(width=240)
    err = Console(stderr=True)
    try:
        settings = SimSettings(
            factory=factory,
            num_agents=agents,
            rounds=rounds,
            fraction=fraction,
            seed=seed,
            params=parse_sets(set_),
            data_dir=data_dir,
            strategy=strategy,
            strategy_params=parse_sets(strategy_set, "--strategy-set"),
            evaluate=evaluate,
            overwrite=overwrite,
            keep_local_models=keep_local_models,
        )
        backend = _backend(engine, workers, pool, ray_address, cpus_per_agent, gpus_per_agent)
        result = _run(settings, backend, err if progress else None)
        table, _ = history_table(settings.data_dir)
        report_path = write_report(settings.data_dir) if report else None
    except FedloopError as exc:
        if verbose and isinstance(exc, AgentFailed) and exc.details:
            err.print(exc.details, markup=False, highlight=False)
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    out.print(table)
    out.print(
        f"{len(result.rounds)} rounds in {result.seconds:.1f} s "
        f"({result.seconds_per_round:.3f} s per round, {result.setup_seconds:.1f} s start-up); "
        f"peak RSS {result.driver_peak_rss_mb:.0f} MiB driver, "
        f"{result.worker_peak_rss_mb:.0f} MiB per worker",
        highlight=False,
    )
    out.print(f"database: {result.database}", highlight=False, soft_wrap=True)
    if report_path is not None:
        out.print(f"report: {report_path}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(_summary(result, report_path)))


def _run(settings: SimSettings, backend: Backend, console: Console | None) -> SimResult:
    if console is None:
        return asyncio.run(run_simulation(settings, backend))
    with RichObserver(console) as observer:
        return asyncio.run(run_simulation(settings, backend, observer))


def _summary(result: SimResult, report: Path | None) -> dict[str, Any]:
    last = result.rounds[-1] if result.rounds else None
    return {
        "data_dir": str(result.data_dir),
        "database": str(result.database),
        "report": None if report is None else str(report),
        "rounds": len(result.rounds),
        "seconds": round(result.seconds, 3),
        "setup_seconds": round(result.setup_seconds, 3),
        "seconds_per_round": round(result.seconds_per_round, 4),
        "driver_peak_rss_mb": round(result.driver_peak_rss_mb, 1),
        "worker_peak_rss_mb": round(result.worker_peak_rss_mb, 1),
        "global_metrics": {} if last is None else last.global_metrics,
        "local_metrics_mean": {} if last is None else last.local_metrics_mean,
    }
