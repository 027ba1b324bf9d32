"""The status page at ``/``: one server-rendered HTML page, no script, no build step.

It refreshes itself every few seconds (``<meta http-equiv="refresh">``), draws
each pipeline's throughput over the last minutes as an inline SVG line, and,
when an admin token is configured, has one plain HTML form per pipeline whose
password field carries the token to pause (or resume) and restart.
"""

from __future__ import annotations

import html
from typing import Any

REFRESH_SECONDS = 5

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1b1f24; background: #ffffff; }
header, main, footer { max-width: 72rem; margin: 0 auto; padding: 0.75rem 1rem; }
h1 { font-size: 1.35rem; margin: 0.25rem 0; }
h2 { font-size: 1.1rem; margin: 0 0 0.5rem; overflow-wrap: anywhere; }
.meta { color: #4a5360; margin: 0; }
.cards { display: grid; gap: 1rem; grid-template-columns: repeat(auto-fill, minmax(19rem, 1fr)); }
section.pipeline { border: 1px solid #c9d1da; border-radius: 8px; padding: 0.85rem; min-width: 0; }
.state { display: inline-block; padding: 0 0.5rem; border-radius: 999px; font-weight: 600;
         border: 1px solid currentColor; }
.state-running, .state-finished { color: #0a6b2d; }
.state-paused, .state-starting, .state-draining { color: #8a4b00; }
.state-failed, .state-stopped { color: #a3161a; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0.15rem 0.75rem; margin: 0.5rem 0; }
dt { color: #4a5360; }
dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.bar { height: 0.6rem; background: #e4e8ed; border-radius: 4px; overflow: hidden; }
.bar > span { display: block; height: 100%; background: #1f5fbf; }
figure.chart { margin: 0 0 0.25rem; }
figure.chart svg { width: 100%; height: 3.5rem; display: block; }
figcaption { font-size: 0.85rem; color: #4a5360; }
.error { color: #a3161a; overflow-wrap: anywhere; }
form { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: end; margin-top: 0.5rem; }
label { display: flex; flex-direction: column; font-size: 0.85rem; color: #4a5360; }
input { font: inherit; padding: 0.3rem 0.4rem; border: 1px solid #6b7684; border-radius: 4px;
        min-width: 0; width: 11rem; max-width: 100%; }
button { font: inherit; padding: 0.3rem 0.8rem; border-radius: 4px; border: 1px solid #1f5fbf;
         background: #1f5fbf; color: #ffffff; cursor: pointer; }
button.secondary { background: #ffffff; color: #1f5fbf; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    if value >= 10_000:
        return f"{value:,.0f}"
    return f"{value:,.1f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"


def _chart(history: list[list[float]], name: str) -> str:
    """Written/s over the kept samples: an area from zero with the line on top, and a
    visible caption with the latest and the peak (the same words for a screen reader)."""
    width, height = 300, 56
    values = [p[2] for p in history]
    if len(values) < 2:
        return (f'<p class="meta" id="chart-{_e(name)}">throughput chart: collecting '
                "samples</p>")
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    ys = [height - 1 - (v / top) * (height - 4) for v in values]
    points = " ".join(f"{i * step:.1f},{y:.1f}" for i, y in enumerate(ys))
    area = f"0,{height} {points} {width},{height}"
    label = (f"written / s over the last {len(values) * 2} s: latest {_num(values[-1])}, "
             f"peak {_num(top)}")
    return (f'<figure class="chart" id="chart-{_e(name)}">'
            f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
            f'aria-hidden="true" focusable="false">'
            f'<polygon fill="#1f5fbf" fill-opacity="0.12" points="{area}"/>'
            f'<line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}" '
            'stroke="#6b7684" stroke-width="1" vector-effect="non-scaling-stroke"/>'
            f'<polyline fill="none" stroke="#1f5fbf" stroke-width="2" '
            f'vector-effect="non-scaling-stroke" points="{points}"/></svg>'
            f"<figcaption>{_e(label)}</figcaption></figure>")


def _controls(p: dict[str, Any]) -> str:
    """One form per pipeline: the token once, Pause (or Resume) as the default button
    and Restart posting the same field elsewhere (``formaction``, no script)."""
    name = p["name"]
    verb = "resume" if p["paused"] else "pause"
    field_id = f"token-{name}"
    return (f'<form method="post" action="/pipelines/{_e(name)}/{verb}">'
            f'<label for="{_e(field_id)}">admin token'
            f'<input id="{_e(field_id)}" name="token" type="password" required '
            f'autocomplete="current-password"></label>'
            f'<button type="submit">{verb.capitalize()} {_e(name)}</button>'
            f'<button type="submit" class="secondary" '
            f'formaction="/pipelines/{_e(name)}/restart">Restart {_e(name)}</button></form>')


def _card(p: dict[str, Any], mutable: bool) -> str:
    name = p["name"]
    flight = p["in_flight"]
    bound = flight["max_messages"] or 1
    share = min(100.0, 100.0 * flight["messages"] / bound)
    error = p.get("last_error")
    sinks = ", ".join(f"{s['name']} ({s['type']})" for s in p.get("sinks", []))
    rows = [
        ("state", f'<span class="state state-{_e(p["state"])}" data-field="state">'
                  f'{_e(p["state"])}</span>'),
        ("source → sinks", f'{_e(p["source"]["type"])} → {_e(sinks)}'),
        ("read / s", f'<span data-field="read_per_second">'
                     f'{_num(p["rates"]["read_per_second"])}</span>'),
        ("written / s", f'<span data-field="written_per_second">'
                        f'{_num(p["rates"]["written_per_second"])}</span>'),
        ("in flight", f'<span data-field="in_flight">{_num(flight["messages"])}</span> of '
                      f'<span data-field="max_in_flight">{_num(flight["max_messages"])}</span>'
                      f'<div class="bar" role="meter" aria-label="in flight against its bound" '
                      f'aria-valuemin="0" aria-valuemax="{flight["max_messages"]}" '
                      f'aria-valuenow="{flight["messages"]}"><span style="width:{share:.0f}%">'
                      "</span></div>"),
        ("lag", f'<span data-field="lag">{_num(p["lag"])}</span>'),
        ("written", f'<span data-field="written">{_num(p["totals"]["written"])}</span>'),
        ("dead-lettered", f'<span data-field="dead_lettered">'
                          f'{_num(p["totals"]["dead_lettered"])}</span>'),
        ("restarts", f'<span data-field="restarts">{p["restarts"]}</span>'
                     + (f' (+{p["reloads"]} asked for)' if p.get("reloads") else "")),
    ]
    if error:
        rows.append(("last error", f'<span class="error" data-field="last_error">'
                                   f'{_e(error["message"])} at {_e(error["at"])}</span>'))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return (f'<section class="pipeline" aria-labelledby="h-{_e(name)}" '
            f'data-pipeline="{_e(name)}"><h2 id="h-{_e(name)}">{_e(name)}</h2>'
            f"{_chart(p.get('history', []), name)}<dl>{body}</dl>"
            f"{_controls(p) if mutable else ''}</section>")


def render(pipelines: list[dict[str, Any]], *, mutable: bool,
           reload: dict[str, Any] | None = None, refresh: int = REFRESH_SECONDS) -> str:
    """The page; ``refresh`` seconds between reloads, 0 for a page that stays put
    (a refresh empties a token field that is being typed into)."""
    cards = "".join(_card(p, mutable) for p in pipelines) or "<p>No pipelines.</p>"
    note = ""
    if reload is not None:
        what = "applied" if reload.get("ok") else f"refused: {reload.get('error', '')}"
        note = f'<p class="meta">last reload {_e(reload.get("at", ""))}: {_e(what)}</p>'
    if mutable and refresh > 0:
        mode = ('pause, resume and restart need the admin token (<a href="/?refresh=off">stop '
                "refreshing</a> to type it)")
    elif mutable:
        mode = ('pause, resume and restart need the admin token; this page does not refresh '
                '(<a href="/">refresh it</a>)')
    else:
        mode = "read-only (no admin token configured)"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        + (f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else "") +
        f"<title>natsconn: {len(pipelines)} pipeline(s)</title><style>{_CSS}</style></head>"
        f'<body><header><h1>natsconn</h1><p class="meta">{len(pipelines)} pipeline(s); '
        + (f"this page refreshes every {refresh} s; " if refresh > 0 else "") +
        f"{mode}; JSON at "
        '<a href="/pipelines">/pipelines</a>, metrics at <a href="/metrics">/metrics</a>'
        f"</p>{note}</header><main><div class=\"cards\">{cards}</div></main></body></html>"
    )
