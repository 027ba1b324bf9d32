"""Prometheus metrics, one set per process, labelled by pipeline.

Children are bound once per pipeline (``PipelineMetrics``) so the hot path does
a counter add per batch, never a label lookup per message.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
_P = ("pipeline",)

MESSAGES_IN = Counter("natsconn_messages_in", "Messages read from the source", _P,
                      registry=REGISTRY)
MESSAGES_OUT = Counter("natsconn_messages_out", "Messages written durably by the sink", _P,
                       registry=REGISTRY)
BYTES_IN = Counter("natsconn_bytes_in", "Payload bytes read from the source", _P,
                   registry=REGISTRY)
BYTES_OUT = Counter("natsconn_bytes_out", "Payload bytes written by the sink", _P,
                    registry=REGISTRY)
BATCHES = Counter("natsconn_batches_written", "Sink batches written", _P, registry=REGISTRY)
WRITE_SECONDS = Histogram(
    "natsconn_write_seconds", "Sink write latency per batch", _P, registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Gauges are summed over live workers under `natsconn run --workers N`.
_LIVE: Final = "livesum"
IN_FLIGHT = Gauge("natsconn_in_flight_messages", "Messages read but not yet acknowledged", _P,
                  registry=REGISTRY, multiprocess_mode=_LIVE)
IN_FLIGHT_MAX = Gauge("natsconn_in_flight_max_messages", "The in-flight bound: messages read but "
                      "not yet acknowledged, at most", _P, registry=REGISTRY,
                      multiprocess_mode=_LIVE)
IN_FLIGHT_MAX_BYTES = Gauge("natsconn_in_flight_max_bytes", "The in-flight bound in payload "
                            "bytes", _P, registry=REGISTRY, multiprocess_mode=_LIVE)
IN_FLIGHT_BYTES = Gauge("natsconn_in_flight_bytes", "Payload bytes read but not acknowledged",
                        _P, registry=REGISTRY, multiprocess_mode=_LIVE)
RETRIES = Counter("natsconn_retries", "Sink write attempts that failed and were retried", _P,
                  registry=REGISTRY)
DEAD_LETTERED = Counter("natsconn_dead_lettered", "Messages sent to the dead-letter target",
                        _P, registry=REGISTRY)
REJECTED_UNROUTED = Counter(
    "natsconn_rejected_without_dead_letter",
    "Poison messages terminated at the source because no dead-letter target is set", _P,
    registry=REGISTRY,
)
DROPPED = Counter("natsconn_dropped", "Messages lost before natsconn could hold them",
                  ("pipeline", "reason"), registry=REGISTRY)
FILTERED = Counter("natsconn_filtered", "Messages dropped on purpose by a transform or by routing "
                   "(acknowledged, not lost)", ("pipeline", "reason"), registry=REGISTRY)
SOURCE_LAG = Gauge("natsconn_source_lag", "Messages waiting at the source, where it knows", _P,
                   registry=REGISTRY, multiprocess_mode="livemax")
SOURCE_LAG_BYTES = Gauge("natsconn_source_lag_bytes", "Bytes waiting at the source, where it "
                         "counts in bytes (WAL retained by a replication slot)", _P,
                         registry=REGISTRY, multiprocess_mode="livemax")
UP = Gauge("natsconn_pipeline_up", "1 while the pipeline is connected and running (with "
           "workers: how many run it)", _P, registry=REGISTRY, multiprocess_mode=_LIVE)
RESTARTS = Counter("natsconn_pipeline_restarts", "Times the pipeline failed and restarted", _P,
                   registry=REGISTRY)
RECONNECTS = Counter("natsconn_reconnects", "Plugin connections re-established", ("pipeline",
                     "role"), registry=REGISTRY)
DISCONNECTS = Counter("natsconn_disconnects", "Plugin connections lost", ("pipeline", "role"),
                      registry=REGISTRY)
ACKS = Counter("natsconn_source_batches_settled", "Source batches settled, by outcome",
               ("pipeline", "outcome"), registry=REGISTRY)

# Per sink of a pipeline (a pipeline with `sinks:` has several; `sink:` one). The
# pipeline-level families above are the sums over its sinks.
_S = ("pipeline", "sink")
SINK_MESSAGES_OUT = Counter("natsconn_sink_messages_out", "Messages written durably, per sink",
                            _S, registry=REGISTRY)
SINK_BATCHES = Counter("natsconn_sink_batches_written", "Batches written, per sink", _S,
                       registry=REGISTRY)
SINK_WRITE_SECONDS = Histogram(
    "natsconn_sink_write_seconds", "Write latency per batch, per sink", _S, registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Where the oldest message of each written batch spent its time inside natsconn
# (docs/operations.md "Where latency goes"); observed once per batch.
STAGES: Final = ("batching", "queued", "writing", "settling", "total")
BATCH_STAGE_SECONDS = Histogram(
    "natsconn_batch_stage_seconds",
    "Per written batch, how long its oldest message spent in each stage: batching (read to "
    "batch full or due), queued (to its write starting: a free slot and the event loop), "
    "writing (to the sink's confirmation, retries included), settling (to the source's "
    "acknowledgement), total (read to acknowledged)",
    ("pipeline", "sink", "stage"), registry=REGISTRY,
    # Fine around the default linger (20 ms), where a batch's oldest message waits.
    buckets=(0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0065, 0.008, 0.01, 0.0125,
             0.015, 0.0175, 0.02, 0.021, 0.022, 0.023, 0.025, 0.0275, 0.03, 0.035, 0.04, 0.05,
             0.06, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_RETRIES = Counter("natsconn_sink_retries", "Failed write attempts retried, per sink", _S,
                       registry=REGISTRY)
SINK_DEAD_LETTERED = Counter("natsconn_sink_dead_lettered",
                             "Messages this sink could not write, sent to the dead letter", _S,
                             registry=REGISTRY)
SINK_QUEUED = Gauge("natsconn_sink_queued_messages",
                    "Messages in full batches waiting for a free write slot, per sink", _S,
                    registry=REGISTRY, multiprocess_mode=_LIVE)

_log = logging.getLogger("natsconn.metrics")


class PipelineMetrics:
    """The metric children of one pipeline."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.messages_in = MESSAGES_IN.labels(pipeline)
        self.messages_out = MESSAGES_OUT.labels(pipeline)
        self.bytes_in = BYTES_IN.labels(pipeline)
        self.bytes_out = BYTES_OUT.labels(pipeline)
        self.batches = BATCHES.labels(pipeline)
        self.write_seconds = WRITE_SECONDS.labels(pipeline)
        self.in_flight = IN_FLIGHT.labels(pipeline)
        self.in_flight_max = IN_FLIGHT_MAX.labels(pipeline)
        self.in_flight_max_bytes = IN_FLIGHT_MAX_BYTES.labels(pipeline)
        self.in_flight_bytes = IN_FLIGHT_BYTES.labels(pipeline)
        self.retries = RETRIES.labels(pipeline)
        self.dead_lettered = DEAD_LETTERED.labels(pipeline)
        self.rejected_unrouted = REJECTED_UNROUTED.labels(pipeline)
        self.lag = SOURCE_LAG.labels(pipeline)
        self.up = UP.labels(pipeline)
        self.restarts = RESTARTS.labels(pipeline)
        self.acks = {o: ACKS.labels(pipeline, o) for o in ("ack", "nack", "term")}
        self.unrouted = FILTERED.labels(pipeline, "unrouted")


class SinkMetrics:
    """The metric children of one sink of a pipeline."""

    def __init__(self, pipeline: str, sink: str) -> None:
        self.messages_out = SINK_MESSAGES_OUT.labels(pipeline, sink)
        self.batches = SINK_BATCHES.labels(pipeline, sink)
        self.write_seconds = SINK_WRITE_SECONDS.labels(pipeline, sink)
        self.retries = SINK_RETRIES.labels(pipeline, sink)
        self.dead_lettered = SINK_DEAD_LETTERED.labels(pipeline, sink)
        self.queued = SINK_QUEUED.labels(pipeline, sink)
        # Stage children; ``waiting`` is the stage "queued" (``queued`` is the gauge).
        self.batching, self.waiting, self.writing, self.settling, self.total = (
            BATCH_STAGE_SECONDS.labels(pipeline, sink, stage) for stage in STAGES)


class PluginMeters:
    """The SDK's ``Meters`` for one plugin instance, backed by Prometheus."""

    def __init__(self, pipeline: str, role: str, logger: logging.Logger) -> None:
        self._pipeline = pipeline
        self._logger = logger
        self._reconnects = RECONNECTS.labels(pipeline, role)
        self._disconnects = DISCONNECTS.labels(pipeline, role)
        self._lag = SOURCE_LAG.labels(pipeline)
        self._lag_bytes = SOURCE_LAG_BYTES.labels(pipeline)
        self._filtered = FILTERED.labels(pipeline, "transform")
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def dropped(self, count: int, reason: str) -> None:
        DROPPED.labels(self._pipeline, reason).inc(count)
        # One line per reason every 10 s at most: a slow consumer drops per message.
        self._unlogged[reason] = self._unlogged.get(reason, 0) + count
        now = time.monotonic()
        if now - self._logged_at.get(reason, -1e9) >= 10.0:
            self._logger.warning("%d message(s) dropped: %s", self._unlogged.pop(reason),
                                 reason)
            self._logged_at[reason] = now

    def filtered(self, count: int) -> None:
        self._filtered.inc(count)

    def reconnected(self) -> None:
        self._reconnects.inc()

    def disconnected(self) -> None:
        self._disconnects.inc()

    def lag(self, messages: int) -> None:
        self._lag.set(messages)

    def lag_bytes(self, nbytes: int) -> None:
        self._lag_bytes.set(nbytes)
