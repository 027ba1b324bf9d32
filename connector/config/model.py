"""The structure of a pipeline file (pass one of validation).

Plugin options are checked in pass two against each plugin's own ``Config``;
here a plugin block is only ``type`` plus whatever sits beside it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._expr import Condition
from .._units import ByteSize, Duration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginSpec(BaseModel):
    """``{type: NAME, ...options}``: a plugin and its options, side by side."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(description="the plugin's registered name, e.g. jetstream, kafka")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class BatchPolicy(_Strict):
    """How messages are grouped for the sink; also pushed down to the source's reads."""

    max_messages: int = Field(1000, ge=1, le=1_000_000, description="messages per batch")
    max_bytes: ByteSize = Field(4 * 1024 * 1024, description="bytes per batch")
    max_wait: Duration = Field(
        0.02, description="longest a partial batch waits for more (linger)"
    )


class RetryPolicy(_Strict):
    """Backoff for retryable write failures. ``max_attempts: null`` retries
    retryable failures for ever (the safe default: nothing leaves the source
    until written); a number sends the message to the dead-letter target after
    that many attempts."""

    max_attempts: int | None = Field(None, ge=1)
    initial_backoff: Duration = 0.1
    max_backoff: Duration = 30.0
    multiplier: float = Field(2.0, ge=1.0)


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SinkRoute(_Strict):
    """One sink of a fan-out pipeline (``sinks:``), with its own policies.

    Unset policies are the pipeline's; a sink without ``when:`` takes every
    message (``route: broadcast``) or every message no earlier sink took
    (``route: switch``).
    """

    name: str | None = Field(None, pattern=_NAME, max_length=100,
                             description="labels this sink's metrics and logs; default: its "
                             "type, with its position when a type repeats")
    when: Condition | None = Field(None, description="CEL condition: which messages this "
                                   "sink takes")
    sink: PluginSpec
    transforms: list[PluginSpec] = Field(default_factory=list,
                                         description="applied to this sink's messages only")
    batch: BatchPolicy | None = None
    max_in_flight: int | None = Field(None, ge=1, le=1024)
    retry: RetryPolicy | None = None
    dead_letter: PluginSpec | None = Field(None, description="default: the pipeline's")


class PipelineSpec(_Strict):
    name: str = Field(pattern=_NAME, max_length=100)
    source: PluginSpec
    transforms: list[PluginSpec] = Field(default_factory=list)
    sink: PluginSpec | None = Field(None, description="the one sink; or `sinks:` for several")
    sinks: list[SinkRoute] = Field(default_factory=list,
                                   description="several sinks (fan-out and routing)")
    route: Literal["broadcast", "switch"] = Field(
        "broadcast", description="broadcast: every sink whose `when:` matches; switch: the "
        "first one")
    unmatched: Literal["drop", "dead_letter"] = Field(
        "drop", description="a message no sink takes: acknowledged and counted, or "
        "dead-lettered")
    dead_letter: PluginSpec | None = None
    batch: BatchPolicy = Field(default_factory=BatchPolicy)
    max_in_flight: int = Field(4, ge=1, le=1024, description="concurrent sink writes")
    max_in_flight_bytes: ByteSize = Field(
        64 * 1024 * 1024, description="bytes read but not yet acknowledged, at most"
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    in_progress_interval: Duration = Field(
        5.0, description="how often a long write extends the source's ack deadline"
    )

    @model_validator(mode="after")
    def _one_way_out(self) -> PipelineSpec:
        if self.sink is None and not self.sinks:
            raise ValueError("expected `sink:` (one sink) or `sinks:` (several), found neither")
        if self.sink is not None and self.sinks:
            raise ValueError("expected `sink:` or `sinks:`, found both; move the single sink "
                             "into the `sinks:` list")
        seen: set[str] = set()
        for name in self.sink_names():
            if name in seen:
                raise ValueError(f"sink name {name!r} is used twice in pipeline {self.name!r}; "
                                 "give each sink a unique `name:`")
            seen.add(name)
        return self

    def sink_names(self) -> list[str]:
        """Each sink's name: given, else its type (with its position when a type repeats)."""
        if self.sink is not None:
            return [self.sink.type]
        types = [r.sink.type for r in self.sinks]
        return [r.name if r.name is not None else
                (r.sink.type if types.count(r.sink.type) == 1 else f"{r.sink.type}-{i}")
                for i, r in enumerate(self.sinks)]


class HttpSettings(_Strict):
    enabled: bool = True
    address: str = Field("0.0.0.0:8080", description="host:port for /healthz /readyz /metrics, "
                         "the admin API (/pipelines, /reload) and the status page (/)")
    admin_token_file: str | None = Field(
        None, description="file holding the bearer token that the admin API's mutations "
        "(pause, resume, restart, reload) need; or NATSCONN_ADMIN_TOKEN. Without either "
        "the API is read-only")
    read_token_required: bool = Field(
        False, description="reads of the admin API and the status page need the token too")

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port such as 0.0.0.0:8080, found {value!r}")
        return value


class LogSettings(_Strict):
    format: Literal["json", "console"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class FileSpec(_Strict):
    """A pipeline file: one or more pipelines and the process settings."""

    pipelines: list[PipelineSpec] = Field(min_length=1)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    shutdown_timeout: Duration = Field(30.0, description="longest a graceful stop may take")
    workers: int | Literal["auto"] = Field(
        1, description="worker processes (`auto`: the usable cores, honouring a container's "
        "CPU limit); `natsconn run --workers` overrides it")
    restart_backoff: Duration = Field(
        1.0, description="first wait before a failed pipeline restarts"
    )
    restart_backoff_max: Duration = 60.0

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError(f"expected 1 to 256 workers or 'auto', found {value}")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> FileSpec:
        seen: set[str] = set()
        for p in self.pipelines:
            if p.name in seen:
                raise ValueError(f"pipeline name {p.name!r} is used twice; names must be unique")
            seen.add(p.name)
        return self
