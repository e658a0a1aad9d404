"""`fedloop …`: the command line. A user's mistake prints one sentence, not a traceback."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from fedloop.errors import EngineError, FedloopError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="fedloop: federated learning — aggregator, agents, and the records of every round.",
)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def aggregator(
    config: Annotated[Path | None, typer.Option(help="TOML config file.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Directory for the database and blobs.")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (PostgreSQL).")] = None,
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
) -> None:
    """Run the aggregator (FL server)."""
    from fedloop.config import load_config
    from fedloop.logs import setup_logging

    try:
        cfg = load_config(
            config, host=host, port=port, data_dir=data_dir, database_url=database_url
        )
        setup_logging(cfg.log_level, log_format)
        from fedloop.aggregator.server import serve

        serve(cfg)
    except FedloopError as exc:
        _fail(exc)


@app.command()
def agent(
    engine: Annotated[str, typer.Argument(help="ML engine as module:object (object or factory).")],
    url: Annotated[str, typer.Option(help="Aggregator URL.")] = "http://127.0.0.1:8765",
    name: Annotated[str | None, typer.Option(help="Agent name (stable across restarts).")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Directory for the agent's state.")] = None,
    mode: Annotated[str, typer.Option(help="push or poll.")] = "push",
    rounds: Annotated[
        int | None, typer.Option(help="Stop after training this many rounds.")
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="key=value passed to the engine factory.")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    give_up_after: Annotated[
        float | None, typer.Option(help="Seconds to keep retrying an unreachable aggregator.")
    ] = None,
    keep_local_after: Annotated[
        float,
        typer.Option(
            help="Seconds an upload may take before the local model is written to the workdir "
            "for a restart to resume it (0: always; a quicker upload needs no copy on disk)."
        ),
    ] = 1.0,
    ca_file: Annotated[
        Path | None, typer.Option(help="CA certificate to verify the aggregator's TLS with.")
    ] = None,
    cert: Annotated[Path | None, typer.Option(help="Agent certificate (mutual TLS).")] = None,
    key: Annotated[Path | None, typer.Option(help="Agent private key (mutual TLS).")] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FEDLOOP_TOKEN",
            show_envvar=True,
            help="Enrollment token (fedloop token create) for the first registration; the "
            "credential it earns is kept in the workdir.",
        ),
    ] = None,
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
) -> None:
    """Run an agent (FL client) that drives an ML engine."""
    import socket

    from fedloop._loading import load_engine, parse_sets
    from fedloop.agent import Agent
    from fedloop.agent.client import tls_context
    from fedloop.logs import setup_logging

    agent_name = name or socket.gethostname()
    setup_logging("info", log_format, agent=agent_name)
    if mode not in ("push", "poll"):
        _fail(FedloopError(f"--mode must be push or poll, not {mode!r}"))
    try:
        ml_engine = load_engine(engine, **parse_sets(set_))
        runner = Agent(
            ml_engine,
            url,
            agent_name,
            workdir or Path(f".fedloop-agent-{agent_name}"),
            mode=mode,  # type: ignore[arg-type]
            max_rounds=rounds,
            give_up_after=give_up_after,
            keep_local_after=keep_local_after,
            tls=tls_context(ca_file, cert, key) if (ca_file or cert) else None,
            enrollment_token=token,
        )
        state = runner.run()
        typer.echo(f"agent {agent_name} done: {state.rounds_trained} rounds trained")
    except EngineError as exc:
        # The user's code failed: where, in its traceback, is what they need.
        traceback.print_exception(exc.__cause__ or exc)
        _fail(exc)
    except FedloopError as exc:
        _fail(exc)


@app.command()
def demo(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where the run's files go.")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 5,
    agents: Annotated[int, typer.Option(help="Agent processes.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary last.")] = False,
) -> None:
    """Run a federated image-classification run on loopback: aggregator + agents."""
    from fedloop.demo import run_demo

    try:
        summary = run_demo(directory, rounds=rounds, agents=agents, echo=typer.echo)
    except FedloopError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(summary))


@app.command()
def history(
    config: Annotated[Path | None, typer.Option(help="The aggregator's TOML config.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="The aggregator's data directory.")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Print one row per round: agents, samples, global metrics, seconds."""
    from rich.console import Console

    from fedloop.config import load_config
    from fedloop.history import history_rows, history_table
    from fedloop.store.db import Store
    from fedloop.store.db import database_url as make_url

    try:
        cfg = load_config(config, data_dir=data_dir, database_url=database_url)
        db = cfg.data_dir / "fedloop.db"
        if cfg.database_url is None and not db.exists():
            raise FedloopError(f"no fedloop database at {db}; pass --data-dir or --config of a run")
        store = Store(make_url(cfg.data_dir, cfg.database_url))
        rows = history_rows(store)
        store.close()
    except FedloopError as exc:
        _fail(exc)
        return
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = history_table(rows)
    # Piped output has no terminal width; a wide console keeps the columns unabridged.
    console = Console() if sys.stdout.isatty() else Console(width=240)
    console.print(table)


@app.command()
def report(
    data_dir: Annotated[Path | None, typer.Option(help="The aggregator's data directory.")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None,
    config: Annotated[Path | None, typer.Option(help="The aggregator's TOML config.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where the report goes (default DATA_DIR/report).")
    ] = None,
    open_: Annotated[
        bool, typer.Option("--open", help="Open the HTML page in a web browser.")
    ] = False,
    plots: Annotated[bool, typer.Option(help="Draw PNG plots (needs matplotlib).")] = True,
) -> None:
    """Write a run's report: rounds.csv, local_models.csv, PNG plots, one HTML page."""
    from fedloop.config import load_config
    from fedloop.report import open_records, write_report

    try:
        cfg = load_config(config, data_dir=data_dir, database_url=database_url)
        records = open_records(cfg.data_dir, cfg.database_url)
        target = out or cfg.data_dir / "report"
        files = write_report(
            records, target, source=cfg.database_url or str(cfg.data_dir), plots=plots
        )
    except FedloopError as exc:
        _fail(exc)
        return
    for path in [*files.csv, *files.png, files.html]:
        typer.echo(str(path))
    if open_:
        import webbrowser

        webbrowser.open(files.html.resolve().as_uri())


@app.command()
def partition(
    split: Annotated[str, typer.Argument(help="iid, dirichlet, shards or quantity_skew.")],
    agents: Annotated[int, typer.Option(help="Number of agents.")] = 10,
    dataset: Annotated[
        str, typer.Option(help="digits, or mnist/fashion-mnist with --data-dir.")
    ] = "digits",
    data_dir: Annotated[Path | None, typer.Option(help="Directory of the IDX files.")] = None,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    shards_per_agent: Annotated[int, typer.Option(help="Shards per agent (shards).")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    plot: Annotated[Path | None, typer.Option(help="Also write the table as a PNG here.")] = None,
) -> None:
    """Print how a split spreads each label among agents (a row per agent, a column per label)."""
    from fedloop.ml import data
    from fedloop.ml import partition as part

    try:
        if dataset == "digits":
            labels = data.load_digits()[1]
        elif dataset in ("mnist", "fashion-mnist"):
            if data_dir is None:
                raise FedloopError(f"--dataset {dataset} needs --data-dir with its IDX files")
            labels = data.load_mnist(data_dir, "train")[1]
        else:
            raise FedloopError(f"--dataset must be digits, mnist or fashion-mnist, not {dataset!r}")
        if split == "iid":
            parts = part.iid(labels, agents, seed)
        elif split == "dirichlet":
            parts = part.dirichlet(labels, agents, alpha, seed)
        elif split == "shards":
            parts = part.shards(labels, agents, shards_per_agent, seed)
        elif split == "quantity_skew":
            parts = part.quantity_skew(len(labels), agents, alpha, seed)
        else:
            raise FedloopError(
                f"split must be iid, dirichlet, shards or quantity_skew, not {split!r}"
            )
        table = part.label_summary(labels, parts)
        if plot is not None:
            part.plot_label_summary(table, plot, title=f"{dataset}, {split}, {agents} agents")
    except FedloopError as exc:
        _fail(exc)
        return
    header = "agent  " + " ".join(f"{k:>6}" for k in range(table.shape[1])) + "   total"
    typer.echo(header)
    for i, row in enumerate(table):
        typer.echo(f"{i:>5}  " + " ".join(f"{int(v):>6}" for v in row) + f"  {int(row.sum()):>6}")
    if plot is not None:
        typer.echo(str(plot))


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for the CA, server and agent files.")] = Path(
        "fedloop-certs"
    ),
    host: Annotated[
        list[str], typer.Option(help="Name or IP the aggregator is reached at (repeatable).")
    ] = ["localhost", "127.0.0.1"],  # noqa: B006 - typer reads the default, never mutates it
    agent: Annotated[
        list[str], typer.Option(help="Agent name to issue a client certificate for (repeatable).")
    ] = [],  # noqa: B006
) -> None:
    """Make a development CA, a server certificate and agent certificates (mutual TLS)."""
    from fedloop.security.certs import make_dev_pki

    issued = make_dev_pki(out, host, agent)
    typer.echo(
        f"wrote {', '.join(str(i.cert) for i in issued.values())} (keys beside them, mode 600)"
    )
    typer.echo(
        "aggregator.toml: "
        f'tls_cert = "{issued["server"].cert}"  tls_key = "{issued["server"].key}"'
        + (f'  tls_client_ca = "{issued["ca"].cert}"' if agent else "")
    )
    typer.echo(
        f"agents: fedloop agent … --url https://{host[0]}:8765 --ca-file {issued['ca'].cert}"
    )


@app.command()
def version() -> None:
    """Print fedloop's version and protocol version."""
    from fedloop import __version__
    from fedloop.protocol.version import PROTOCOL_VERSION

    typer.echo(
        f"fedloop {__version__} (protocol {PROTOCOL_VERSION}, Python {sys.version.split()[0]})"
    )


token_app = typer.Typer(
    no_args_is_help=True,
    help="Enrollment tokens for agents and admin tokens (aggregator config auth = true).",
)
app.add_typer(token_app, name="token")

_TokenConfig = Annotated[Path | None, typer.Option(help="The aggregator's TOML config.")]
_TokenDataDir = Annotated[Path | None, typer.Option(help="The aggregator's data directory.")]
_TokenDatabase = Annotated[str | None, typer.Option(help="SQLAlchemy URL (PostgreSQL).")]
_ExpiresIn = Annotated[
    float | None, typer.Option(help="Seconds until the token expires (default: never).")
]


def _token_store(config: Path | None, data_dir: Path | None, database_url: str | None) -> Any:
    """Return the Store of the aggregator that `config`/`data_dir`/`database_url` name."""
    from fedloop.config import load_config
    from fedloop.store.db import Store
    from fedloop.store.db import database_url as make_url

    cfg = load_config(config, data_dir=data_dir, database_url=database_url)
    if cfg.database_url is None:
        # Tokens may be made before the aggregator's first start: the database is created here.
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
    return Store(make_url(cfg.data_dir, cfg.database_url))


def _make_token(
    kind: str,
    name: str,
    expires_in: float | None,
    config: Path | None,
    data_dir: Path | None,
    database_url: str | None,
) -> str:
    import time

    from pydantic import TypeAdapter, ValidationError

    from fedloop.protocol.messages import AgentName
    from fedloop.security import tokens

    try:
        TypeAdapter(AgentName).validate_python(name)
    except ValidationError as exc:
        raise FedloopError(
            f"--name {name!r} is not an agent name: 1-128 of letters, digits and _.@:-"
        ) from exc
    if expires_in is not None and expires_in <= 0:
        raise FedloopError("--expires-in must be a positive number of seconds")
    prefix = tokens.ENROLLMENT_PREFIX if kind == tokens.ENROLLMENT else tokens.ADMIN_PREFIX
    secret = tokens.new_secret(prefix)
    now = time.time()
    store = _token_store(config, data_dir, database_url)
    try:
        store.add_token(
            kind,
            name,
            tokens.hash_secret(secret),
            expires_at=None if expires_in is None else now + expires_in,
            now=now,
        )
    finally:
        store.close()
    return secret


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="The agent name the token enrolls (its --name).")],
    expires_in: _ExpiresIn = None,
    config: _TokenConfig = None,
    data_dir: _TokenDataDir = None,
    database_url: _TokenDatabase = None,
) -> None:
    """Make a one-time enrollment token for agent NAME; it is printed once, stored hashed."""
    from fedloop.security import tokens

    try:
        secret = _make_token(tokens.ENROLLMENT, name, expires_in, config, data_dir, database_url)
    except FedloopError as exc:
        _fail(exc)
        return
    typer.echo(
        f"enrollment token for agent {name!r} (shown once; give it to that site only, "
        f"as fedloop agent --name {name} --token … or FEDLOOP_TOKEN):",
        err=True,
    )
    typer.echo(secret)


@token_app.command("admin")
def token_admin(
    name: Annotated[str, typer.Option(help="A label for who holds the token.")] = "admin",
    expires_in: _ExpiresIn = None,
    config: _TokenConfig = None,
    data_dir: _TokenDataDir = None,
    database_url: _TokenDatabase = None,
) -> None:
    """Make an admin token (dashboard data, history, /metrics); printed once, stored hashed."""
    from fedloop.security import tokens

    try:
        secret = _make_token(tokens.ADMIN, name, expires_in, config, data_dir, database_url)
    except FedloopError as exc:
        _fail(exc)
        return
    typer.echo(
        f"admin token {name!r} (shown once; dashboard: open /#token=<it>; Prometheus: "
        "bearer_token):",
        err=True,
    )
    typer.echo(secret)


@token_app.command("list")
def token_list(
    config: _TokenConfig = None,
    data_dir: _TokenDataDir = None,
    database_url: _TokenDatabase = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List tokens and credentials: kind, name, agent, times, state (never the secrets)."""
    import time

    try:
        store = _token_store(config, data_dir, database_url)
        try:
            rows = store.tokens()
        finally:
            store.close()
    except FedloopError as exc:
        _fail(exc)
        return
    now = time.time()

    def state(row: Any) -> str:
        if row.revoked_at is not None:
            return "revoked"
        if row.expires_at is not None and now >= row.expires_at:
            return "expired"
        if row.kind == "enrollment" and row.used_at is not None:
            return "used"
        return "active"

    def when(value: float | None) -> str:
        return "-" if value is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))

    for row in rows:
        record = {
            "id": row.id,
            "kind": row.kind,
            "name": row.name,
            "agent_id": row.agent_id,
            "state": state(row),
            "created_at": row.created_at,
            "expires_at": row.expires_at,
            "used_at": row.used_at,
            "revoked_at": row.revoked_at,
        }
        if as_json:
            typer.echo(json.dumps(record))
        else:
            typer.echo(
                f"{row.id:>4}  {row.kind:<10}  {row.name:<24}  {row.agent_id or '-':<16}  "
                f"{record['state']:<8}  created {when(row.created_at)}  "
                f"expires {when(row.expires_at)}  used {when(row.used_at)}"
            )
    if not rows and not as_json:
        typer.echo("no tokens", err=True)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Option(help="Agent name (or admin label) whose tokens to revoke.")],
    config: _TokenConfig = None,
    data_dir: _TokenDataDir = None,
    database_url: _TokenDatabase = None,
) -> None:
    """Revoke every live enrollment token, credential and admin token bound to NAME."""
    try:
        store = _token_store(config, data_dir, database_url)
        try:
            count = store.revoke_tokens(name)
        finally:
            store.close()
    except FedloopError as exc:
        _fail(exc)
        return
    typer.echo(f"revoked {count} token(s) of {name!r}")


def _register_simulate() -> None:
    from fedloop.sim.cli import simulate

    app.command()(simulate)


_register_simulate()


def main() -> None:
    app()
