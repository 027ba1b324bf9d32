"""The ``natsconn`` command: run, validate, schema, plugins, status, pipelines."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from . import __version__
from ._errors import ConfigError, PluginLoadError
from ._units import parse_duration
from .config.loader import LoadedFile, load_file
from .docs_gen import option_rows
from .engine import workers
from .engine.pipeline import PipelineState
from .engine.reload import Reloader, watch
from .engine.supervisor import Supervisor
from .ops import control, logs, looplag, tracing
from .ops.admin import AdminApi
from .ops.http import OpsServer
from .ops.metrics import REGISTRY
from .ops.status import History
from .registry import Kind, Registry
from .schema import plugin_schema, write_schemas

EXIT_CONFIG = 2
log = logging.getLogger("natsconn.cli")

RUN_EXAMPLE = """example:
  natsconn run examples/quickstart.yaml
  natsconn run pipeline.yaml --log-format json --http-address 0.0.0.0:8080
  natsconn run backfill.yaml --progress --until-idle 3s   # stop once everything is moved
"""
VALIDATE_EXAMPLE = """example:
  natsconn validate pipeline.yaml && echo valid
exit codes: 0 valid, 2 invalid (one error with file:line, YAML path, expected and found)
"""
SCHEMA_EXAMPLE = """example:
  natsconn schema              # writes schemas/*.json
  natsconn schema --check      # exit 1 when schemas/ is stale
"""
PLUGINS_EXAMPLE = """example:
  natsconn plugins             # every installed source, sink and transform
  natsconn plugins show jetstream
"""


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="natsconn",
        description="Bridge NATS and JetStream to Kafka, Redis and PostgreSQL.",
        epilog="example:\n  natsconn validate pipeline.yaml\n  natsconn run pipeline.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"natsconn {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipelines of a file", epilog=RUN_EXAMPLE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("file", help="pipeline file (YAML)")
    run.add_argument("--log-format", choices=["json", "console"],
                     help="override the file's log.format")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override the file's log.level")
    run.add_argument("--http-address", help="host:port for /healthz /readyz /metrics; "
                     "'off' disables it")
    run.add_argument("--progress", action="store_true",
                     help="print a progress line every second and a summary at the end")
    run.add_argument("--until-idle", metavar="DURATION", type=_duration_arg,
                     help="stop gracefully once no pipeline has read anything for this long "
                     "and nothing is in flight (backfills, one-off runs), e.g. 3s")
    run.add_argument("--watch", action="store_true",
                     help="reload the file when it changes (as SIGHUP and POST /reload do)")
    run.add_argument("--workers", type=_workers_arg, metavar="N|auto",
                     help="worker processes sharing the work (auto: the usable cores, "
                     "honouring a container's CPU limit); overrides the file's `workers:`")

    control.add_commands(sub)

    val = sub.add_parser("validate", help="check a pipeline file without connecting",
                         epilog=VALIDATE_EXAMPLE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    val.add_argument("file", nargs="+", help="pipeline file(s)")

    sch = sub.add_parser("schema", help="write JSON Schemas for the file and every plugin",
                         epilog=SCHEMA_EXAMPLE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sch.add_argument("--out", default="schemas", help="directory (default: schemas)")
    sch.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 if the directory is stale")
    sch.add_argument("--only-package", metavar="DIST",
                     help="only plugins of this distribution (the repo's schemas/ holds "
                     "--only-package natsconn)")

    plg = sub.add_parser("plugins", help="list installed plugins, or show one's options",
                         epilog=PLUGINS_EXAMPLE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    plg_sub = plg.add_subparsers(dest="plugins_command", metavar="show")
    show = plg_sub.add_parser("show", help="print a plugin's options",
                              epilog="example:\n  natsconn plugins show kafka",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("name")
    show.add_argument("--kind", choices=["source", "sink", "transform"])
    return top


def _workers_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and 1 <= int(text) <= 256:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a number from 1 to 256 or 'auto', found {text!r}")


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.file)
        if args.command == "schema":
            return _schema(args.out, args.check, args.only_package)
        if args.command == "plugins":
            return _plugins(args)
        if args.command in ("status", "pipelines"):
            return control.main(args)
        return _run(args)
    except ConfigError as exc:
        print(f"error: {logs.REDACTOR(exc.render())}", file=sys.stderr)
        return EXIT_CONFIG
    except PluginLoadError as exc:
        print(f"error: {logs.REDACTOR(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `natsconn plugins show kafka | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _validate(files: list[str]) -> int:
    registry = Registry()
    status = 0
    for name in files:
        try:
            loaded = load_file(name, registry)
        except ConfigError as exc:
            print(f"error: {logs.REDACTOR(exc.render())}", file=sys.stderr)
            status = EXIT_CONFIG
            continue
        names = ", ".join(p.spec.name for p in loaded.pipelines)
        print(f"{name}: valid ({len(loaded.pipelines)} pipeline(s): {names})")
    return status


def _schema(out: str, check: bool, package: str | None) -> int:
    stale = write_schemas(Path(out), Registry(), check=check, package=package)
    if check:
        if stale:
            print("stale schemas (run `natsconn schema`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{out}/ is up to date")
        return 0
    print(f"wrote {out}/ ({len(stale)} file(s) changed)")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    registry = Registry()
    kinds: list[Kind] = ["source", "sink", "transform"]
    if args.plugins_command == "show":
        matches = [(k, i) for k in kinds if args.kind in (None, k)
                   for i in registry.infos(k) if i.name == args.name]
        if not matches:
            near = registry.unknown(args.kind or "source", args.name)
            print(f"error: no plugin named {args.name!r} ({near})", file=sys.stderr)
            return EXIT_CONFIG
        for kind, info in matches:
            _show_plugin(registry, kind, info.name, f"{info.package} {info.version}")
        return 0
    rows: list[tuple[str, str, str]] = []
    for kind in kinds:
        rows.append((f"{kind}s:", "", ""))
        for info in registry.infos(kind):
            try:
                desc = registry.load(kind, info.name).description()
            except PluginLoadError as exc:
                desc = f"(fails to load: {exc})"
            rows.append((info.name, f"{info.package} {info.version}", desc))
    name_w = max(len(r[0]) for r in rows if r[1])
    pkg_w = max(len(r[1]) for r in rows)
    for name, package, desc in rows:
        print(f"  {name:<{name_w}}  {package:<{pkg_w}}  {desc}" if package else name)
    return 0


def _show_plugin(registry: Registry, kind: Kind, name: str, package: str) -> None:
    """One plugin's options, with the same types and defaults as docs/configuration.md."""
    print(f"{kind} {name}  ({package})")
    print(f"  {registry.load(kind, name).description()}")
    print()
    for row in option_rows(plugin_schema(kind, name, registry)):
        default = row.default.replace("`", "").replace("**", "")
        kind_of = row.type.replace("`", "")
        if default == "required":
            head = f"{row.name} (required, {kind_of})"
        elif default == "see below":  # an option group; its keys follow
            head = f"{row.name}  ({kind_of})"
        else:
            head = f"{row.name} = {default}  ({kind_of})"
        print(f"  {head}" + (f"\n      {row.description.replace(chr(92) + '|', '|')}"
                              if row.description else ""))
    print()


# ---------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    loaded = load_file(args.file)
    logs.REDACTOR.add(loaded.secrets)
    logs.configure(args.log_format or loaded.spec.log.format,
                   args.log_level or loaded.spec.log.level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # Everything loaded so far lives as long as the process: keep the collector off
    # it, and collect the young generation less often. Messages are short-lived and
    # acyclic; with the default threshold (700) collections cost 7-12% of a JetStream
    # bridge's CPU (bench/, py-spy with gc.callbacks).
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    looplag.time_collections()
    index = os.environ.get(workers.ENV_INDEX)
    if index is not None:  # a worker of `--workers N`: its share of the pipelines
        loaded = workers.for_worker(loaded, int(index), int(os.environ[workers.ENV_COUNT]))
    else:
        count = workers.resolve(args.workers if args.workers is not None
                                else loaded.spec.workers)
        if count > 1:
            return asyncio.run(workers.serve_pool(loaded, count, _worker_args(args),
                                                  args.http_address, _instance()))
    return asyncio.run(_serve(loaded, args.http_address, args.progress, args.until_idle,
                              watch_file=args.watch))


def _admin_token(loaded: LoadedFile) -> str | None:
    """The admin API's bearer token: the file named in http.admin_token_file, or
    NATSCONN_ADMIN_TOKEN. It joins the log redaction at once."""
    path = loaded.spec.http.admin_token_file
    token: str | None = None
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin token file {path!r}: "
                              f"{exc.strerror or exc}", file=loaded.file,
                              path="http.admin_token_file") from None
        if not token:
            raise ConfigError(f"expected a token in {path!r}, found an empty file",
                              file=loaded.file, path="http.admin_token_file")
    else:
        token = os.environ.get("NATSCONN_ADMIN_TOKEN") or None
    if token:
        logs.REDACTOR.add([token])
    return token


def _instance() -> str:
    return os.environ.get("NATSCONN_INSTANCE") or os.environ.get("POD_NAME") or (
        socket.gethostname()
    )


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The options of `run` that each worker gets too."""
    out: list[str] = []
    if args.log_format:
        out += ["--log-format", args.log_format]
    if args.log_level:
        out += ["--log-level", args.log_level]
    if args.until_idle is not None:
        out += ["--until-idle", f"{args.until_idle}s"]
    if args.progress:
        out.append("--progress")
    if args.watch:
        out.append("--watch")
    return out


async def _serve(loaded: LoadedFile, http_address: str | None, progress: bool,
                 until_idle: float | None = None, watch_file: bool = False) -> int:
    instance = _instance()
    tracing.configure()  # OTEL_* variables; off unless asked for (docs/operations.md)
    try:
        return await _supervise(loaded, instance, http_address, progress, until_idle,
                                watch_file)
    finally:  # export the spans still queued
        await asyncio.to_thread(tracing.shutdown)


async def _supervise(loaded: LoadedFile, instance: str, http_address: str | None,
                     progress: bool, until_idle: float | None, watch_file: bool) -> int:
    supervisor = Supervisor(loaded, instance)
    reloader = Reloader(supervisor, loaded.file,
                        on_loaded=lambda new: logs.REDACTOR.add(new.secrets))
    history = History()
    background: list[asyncio.Task[None]] = [asyncio.create_task(history.run(supervisor)),
                                             asyncio.create_task(looplag.sample())]
    http_settings = loaded.spec.http
    address = http_address or http_settings.address
    server: OpsServer | None = None
    if http_settings.enabled and address != "off":
        admin = AdminApi(supervisor, reloader, history, _admin_token(loaded),
                         http_settings.read_token_required)
        server = OpsServer(address, supervisor.ready, admin)
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}",
                              file=loaded.file, path="http.address") from None

    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: stopping; finishing in-flight work (send again to exit at once)",
                     sig.name)
            supervisor.stop()
        else:
            log.warning("%s again: exiting now; unacknowledged messages will be redelivered",
                        sig.name)
            os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    def on_hangup() -> None:
        log.info("SIGHUP: reloading %s", loaded.file)
        background.append(asyncio.create_task(_reload(reloader)))

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if watch_file:
        background.append(asyncio.create_task(watch(reloader)))

    started = time.monotonic()
    reporter = asyncio.create_task(_report(supervisor)) if progress else None
    run = asyncio.create_task(supervisor.run())
    idle_since, last_read = time.monotonic(), -1.0
    try:
        while not run.done():
            await asyncio.wait({run}, timeout=0.5)
            if until_idle is not None and supervisor.deadline is None:
                counts = _counts(supervisor)
                read = sum(c["in"] for c in counts.values())
                busy = any(c["in_flight"] for c in counts.values())
                if read != last_read or busy:
                    idle_since, last_read = time.monotonic(), read
                elif time.monotonic() - idle_since >= until_idle:
                    log.info("idle for %.1fs: stopping", until_idle)
                    supervisor.stop()
            if supervisor.deadline is not None and not run.done():
                # Pipelines observe the deadline themselves; this is the backstop for a
                # plugin stuck in connect or close.
                grace = supervisor.deadline + 5 - time.monotonic()
                if grace <= 0:
                    log.error("shutdown deadline passed; exiting")
                    run.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run
        run.result()
    finally:
        if reporter is not None:
            reporter.cancel()
        for task in background:
            task.cancel()
        if server is not None:
            await server.close()
    if progress:
        _summary(supervisor, time.monotonic() - started)
    # Exit 1 when a pipeline was down (failed, waiting to restart) when the run ended.
    failed = [n for n, r in supervisor.records.items()
              if r.current is not None and r.current.state is PipelineState.FAILED]
    if failed:
        log.error("pipeline(s) not running at exit: %s", ", ".join(failed))
    return 1 if failed else 0


async def _reload(reloader: Reloader) -> None:
    outcome = await reloader.reload()
    if not outcome.ok:
        log.error("reload refused: %s", outcome.error)


def _sample(metric: str, pipeline: str) -> float:
    return REGISTRY.get_sample_value(metric, {"pipeline": pipeline}) or 0.0


def _counts(supervisor: Supervisor) -> dict[str, dict[str, float]]:
    out = {}
    for name, rec in supervisor.records.items():
        pipe = rec.current
        if pipe is None:
            continue
        out[name] = {
            "in": _sample("natsconn_messages_in_total", name),
            "out": _sample("natsconn_messages_out_total", name),
            "dead": _sample("natsconn_dead_lettered_total", name),
            "retries": _sample("natsconn_retries_total", name),
            "in_flight": pipe.in_flight,
        }
    return out


async def _report(supervisor: Supervisor) -> None:
    last: dict[str, float] = {}
    while True:
        await asyncio.sleep(1.0)
        parts = []
        for name, c in _counts(supervisor).items():
            rate = c["out"] - last.get(name, 0.0)
            last[name] = c["out"]
            parts.append(f"{name}: {int(c['out'])} written ({int(rate)}/s), "
                         f"{int(c['in_flight'])} in flight, {int(c['dead'])} dead-lettered")
        print("progress | " + " | ".join(parts), file=sys.stderr, flush=True)


def _summary(supervisor: Supervisor, elapsed: float) -> None:
    print(f"summary after {elapsed:.1f}s:", file=sys.stderr)
    for name, c in _counts(supervisor).items():
        rec = supervisor.records[name]
        print(f"  {name}: read {int(c['in'])}, written {int(c['out'])}, dead-lettered "
              f"{int(c['dead'])}, retries {int(c['retries'])}, restarts {rec.restarts}"
              + (f", last error: {rec.last_error}" if rec.last_error else ""), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
