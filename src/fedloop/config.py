"""Aggregator settings: TOML file < FEDLOOP_* environment < command-line flags."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedloop.errors import ConfigError


class StrategyConfig(BaseModel):
    """`[strategy]`: a registry name or `module:Class`, plus its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvaluateConfig(BaseModel):
    """`[evaluate]`: an ML engine the aggregator uses to measure every global model."""

    model_config = ConfigDict(extra="forbid")
    engine: str
    params: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of a factory
    config: dict[str, Any] = Field(default_factory=dict)  # passed to evaluate()


class SecAggSettings(BaseModel):
    """`[secagg]`: secure aggregation (docs/privacy.md): the aggregator sees only masked updates."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    # Shamir threshold as a fraction of the round's cohort n: t = max(2, ceil(threshold * n)).
    threshold: float = Field(default=0.66, gt=0.0, le=1.0)
    frac_bits: int = Field(default=24, ge=0, le=62)
    num_bits: int = 64
    # Seconds each phase waits for stragglers before going on with at least t agents.
    phase_timeout: float = Field(default=60.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> SecAggSettings:
        if self.num_bits not in (32, 64):
            raise ValueError(f"secagg.num_bits must be 32 or 64, got {self.num_bits}")
        if self.frac_bits >= self.num_bits - 1:
            raise ValueError(f"secagg.frac_bits must be below {self.num_bits - 1}")
        return self


class AggregatorConfig(BaseModel):
    """Everything an aggregator needs; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    data_dir: Path = Path("fedloop-data")
    database_url: str | None = None  # default: SQLite file in data_dir
    aggregation_threshold: float = Field(1.0, gt=0.0, le=1.0)
    min_agents: int = Field(1, ge=1)
    round_timeout: float = Field(0.0, ge=0.0)  # seconds; 0 = no deadline
    init_weights: bool = True
    rounds: int = Field(0, ge=0)  # stop after this many global models; 0 = run forever
    max_model_bytes: int = Field(2 * 1024**3, gt=0)
    max_agents: int = Field(100_000, ge=1)
    # What one HTTP connection may cost before and while it sends a request (docs/security.md,
    # "Connections"): the bytes of its request line and headers; the seconds those may take;
    # the seconds a body may go without a byte while the aggregator reads it (an idle timeout:
    # a slow upload that keeps sending is never cut); and the open connections, beyond which a
    # new one closes the one idle longest before a request (0: the open-file limit less 64).
    max_header_bytes: int = Field(64 * 1024, ge=4096)
    header_timeout: float = Field(20.0, gt=0.0)
    body_idle_timeout: float = Field(60.0, gt=0.0)
    max_connections: int = Field(0, ge=0)
    # fsync every stored model before its row commits, so a power loss cannot leave a row whose
    # model is missing. `fedloop simulate` turns it off: a simulation does not resume after a
    # crash, and one fsync per local model was ≈ 40 % of its driver's time at 1,000 agents.
    fsync_models: bool = True
    # Store each local model's bytes as a blob. Its row (agent, round, samples, metrics and the
    # model's content address) is always kept. Off: an aggregator restarted mid-round cannot
    # count that round's uploads again (they are dropped, with a warning). `fedloop simulate`
    # turns it off unless asked: a simulation does not resume after a crash, and 1,000 agents
    # × one model each per round fill a disk.
    keep_local_models: bool = True
    log_level: str = "info"
    # TLS on the aggregator's port; with tls_client_ca, agents must present a certificate
    # signed by that CA (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer-token identity (docs/security.md): registration needs an enrollment token made
    # by `fedloop token create`, every other agent request the agent's own credential, and
    # the dashboard data, history and /metrics an admin token. Off by default for loopback
    # experiments and simulations; the deploy config turns it on.
    auth: bool = False
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    evaluate: EvaluateConfig | None = None
    secagg: SecAggSettings = Field(default_factory=lambda: SecAggSettings())

    @model_validator(mode="after")
    def _resolve(self) -> AggregatorConfig:
        self.data_dir = Path(self.data_dir)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{path} does not exist")
        return self


_ENV_PREFIX = "FEDLOOP_"


def _from_env() -> dict[str, Any]:
    fields = AggregatorConfig.model_fields
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith(_ENV_PREFIX):
            name = key[len(_ENV_PREFIX) :].lower()
            if name in fields and name not in ("strategy", "evaluate", "secagg"):
                out[name] = value
    return out


def load_config(path: str | Path | None = None, **overrides: Any) -> AggregatorConfig:
    """Return the aggregator config from `path`, the environment and `overrides` (in that order).

    TOML keys may sit at the top level or under `[aggregator]`; `[strategy]`, `[evaluate]` and
    `[secagg]` are tables of their own.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist; pass the path of a TOML file")
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"config file {file} is not valid TOML ({exc}); fix that line"
            ) from exc
        data.update(raw.pop("aggregator", {}))
        data.update(raw)
    data.update(_from_env())
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AggregatorConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"config setting {where!r} is wrong: {err['msg']}; fix it in the config file or flag"
        ) from exc
