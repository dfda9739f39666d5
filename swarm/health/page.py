"""The health page: server-rendered HTML (no JavaScript), refreshing itself, with an SVG history chart."""

from __future__ import annotations

import time
from html import escape

from swarm.health.state import ModelStatus, ServerStatus, SwarmState

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin: 0 0 .2em; } .totals { color: #555; margin-bottom: 1em; }
section.model { border: 1px solid #ddd; border-radius: 8px; padding: .8em 1em; margin-bottom: 1.2em;
  overflow-x: auto; }
.badge { padding: .1em .5em; border-radius: 4px; color: white; font-size: .85em; margin-left: .5em; }
.badge.healthy { background: #2e7d32; } .badge.broken { background: #c62828; }
.why { color: #c62828; margin-left: .6em; font-size: .55em; font-weight: normal; }
.spanbar { position: relative; width: 8em; height: .7em; background: #eee; border-radius: 2px; margin-top: 2px; }
.spanbar span { position: absolute; top: 0; bottom: 0; border-radius: 2px; }
.spanbar .direct { background: #2e7d32; } .spanbar .relay { background: #f9a825; }
.spanbar .unreachable, .spanbar .none { background: #bbb; } .spanbar .broken { background: #c62828; }
td.warnings { color: #b26a00; }
.coverage { display: flex; gap: 2px; margin: .6em 0; flex-wrap: wrap; }
.block { min-width: 1.6em; text-align: center; font-size: .75em; padding: .25em 0; border-radius: 3px; color: white; }
.block.ok { background: #2e7d32; } .block.weak { background: #f9a825; } .block.missing { background: #c62828; }
table { border-collapse: collapse; font-size: .85em; } th, td { padding: .25em .6em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #fafafa; } tr.offline td, tr.unreachable td { color: #999; }
.chart { margin: .4em 0; } .legend { font-size: .8em; color: #555; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: middle; }
.axis { font-size: 10px; fill: #555; }
"""

LEGEND = """<div class="legend" id="legend">blocks: <span class="swatch block ok"></span> 2+ servers
 <span class="swatch block weak"></span> 1 server <span class="swatch block missing"></span> none &middot; a server's
 blocks: <span class="swatch" style="background:#2e7d32"></span> direct
 <span class="swatch" style="background:#f9a825"></span> through a relay (behind NAT)
 <span class="swatch" style="background:#c62828"></span> takes requests, never answers
 <span class="swatch" style="background:#bbb"></span> not answering or offline &middot; rows: black: online, grey:
 offline or not answering (a crashed server's record says online until it expires)</div>"""


def render_page(state: SwarmState, history: dict[str, list[tuple[float, int, int, int]]],
                refresh_seconds: int) -> str:
    totals = state.totals
    updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.updated_at)) if state.updated_at else "never"
    sections = "\n".join(_model_section(m, history.get(m.model_id, [])) for m in state.models) or \
        "<p id='no-models'>No model is announced in this swarm yet.</p>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh_seconds}">
<title>Swarm health</title><style>{STYLE}</style></head>
<body>
<h1>Swarm health</h1>
<div class="totals" id="totals" data-models="{totals['models']}" data-healthy="{totals['healthy_models']}"
     data-servers-online="{totals['servers_online']}" data-servers-unreachable="{totals['servers_unreachable']}">
  {_count(totals['models'], 'model')} ({totals['healthy_models']} healthy) &middot;
  {_count(totals['servers_online'], 'server')} online &middot; {totals['servers_unreachable']} not answering
  &middot; updated {updated} &middot; <a href="/api/v1/state">JSON</a> &middot; <a href="/metrics">metrics</a>
</div>
{LEGEND}
{sections}
{_contributors(state)}
</body></html>"""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _model_section(model: ModelStatus, samples: list[tuple[float, int, int, int]]) -> str:
    model_id = escape(model.model_id)
    status = "healthy" if model.can_generate else "broken"
    verdict = "can generate now" if model.can_generate else "cannot generate now"
    why = f'<span class="why">{escape(model.why_not)}</span>' if model.why_not else ""
    blocks = "".join(
        f'<span class="block {state}" data-block="{i}" data-servers="{count}" '
        f'title="block {i}: {count} server(s)">{count}</span>'
        for i, (count, state) in enumerate(zip(model.coverage, model.block_states, strict=True)))
    rows = "\n".join(_server_row(s, model.num_blocks) for s in model.servers)
    return f"""<section class="model" data-model="{model_id}" data-healthy="{str(model.healthy).lower()}"
 data-can-generate="{str(model.can_generate).lower()}">
<h2>{model_id}<span class="badge {status}" id="verdict">{verdict}</span>{why}</h2>
<div>{model.num_blocks} blocks, {model.missing_blocks} without a server &middot; announced throughput
 {model.throughput_sum:.0f} tokens/s, weakest block {model.weakest_block_throughput:.0f} tokens/s</div>
<div class="coverage" data-model="{model_id}">{blocks}</div>
{_chart(samples, model.num_blocks)}
<table class="servers" data-model="{model_id}">
<thead><tr><th>peer</th><th>name</th><th>blocks</th><th>state</th><th>reachability</th><th>precision</th>
<th>adapters</th><th>weights</th><th>throughput (tokens/s)</th><th>decode steps/s (measured)</th>
<th>free cache (tokens)</th>
<th>RTT (ms)</th><th>version</th><th>warnings</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</section>"""


def _server_row(server: ServerStatus, num_blocks: int) -> str:
    kind = "offline" if server.state != "online" else "reachable" if server.reachable else "unreachable"
    # a server whose record says online but that does not answer has crashed or left: offline, whatever it said
    state = "offline (not answering)" if kind == "unreachable" else server.state

    check = server.weights_check or ""

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return (f'<tr class="server {kind}" data-peer="{escape(server.peer_id)}">'
            f"<td title='{escape(server.peer_id)}'>{escape(server.short_id)}</td>"
            f"<td>{escape(server.public_name or '')}</td>"
            f"<td class='blocks'><span class='span-text'>{server.start}:{server.end}</span>"
            f"{_span_bar(server, num_blocks)}</td>"
            f"<td class='state'>{escape(state)}</td><td class='reachability'>{server.reachability or '-'}"
            f"{f' ({escape(server.relay)})' if server.relay and server.reachability == 'relay' else ''}</td>"
            f"<td>{escape(server.dtype)} / {escape(server.quantization)}</td>"
            f"<td class='adapters'>{escape(', '.join(server.adapters)) or '-'}</td>"
            f"<td class='weights' title='{escape(server.weights)}' data-check='{escape(check)}'>"
            f"{escape(server.weights[:12]) or '-'}{f' ({escape(check)})' if check else ''}</td>"
            f"<td>{number(server.throughput, 0)}</td><td class='speed' data-claim='{escape(server.claim or '')}'>"
            f"{number(server.inference_rps)} ({_measured(server)})</td>"
            f"<td>{server.cache_tokens_left}</td><td>{'-' if server.rtt_ms is None else f'{server.rtt_ms:.1f}'}</td>"
            f"<td>{escape(server.version)}</td>"
            f"<td class='warnings'>{escape('; '.join(server.warnings)) or '-'}</td></tr>")


def _span_bar(server: ServerStatus, num_blocks: int) -> str:
    """Where the server's blocks lie in the model, coloured by how it is reached."""
    left = 100 * min(server.start, num_blocks) / max(num_blocks, 1)
    width = 100 * (min(server.end, num_blocks) - min(server.start, num_blocks)) / max(num_blocks, 1)
    kind = "broken" if server.claim == "no answer" else server.reachability or "none"
    return (f"<div class='spanbar'><span class='{kind}' "
            f"style='left:{left:.1f}%;width:{width:.1f}%'></span></div>")


def _contributors(state: SwarmState) -> str:
    """Settlement totals per server, shown only when some server settles."""
    rows = state.contributors
    if not rows:
        return ""
    body = "\n".join(
        f"<tr data-peer='{escape(row['peer_id'])}'><td title='{escape(row['peer_id'])}'>{escape(row['peer_id'][-8:])}"
        f"</td><td>{escape(row['public_name'] or '')}</td><td>{escape(row['backend'] or '-')}</td>"
        f"<td>{row['receipts_settled']}</td><td>{row['earnings']}</td><td>{row['credited']}</td></tr>"
        for row in rows)
    return f"""<section class="contributors" id="contributors"><h2>Contributors</h2>
<div class="legend">settled receipts and earnings as each server reports them (settlement on)</div>
<table><thead><tr><th>peer</th><th>name</th><th>backend</th><th>receipts settled</th><th>earnings</th>
<th>credited</th></tr></thead><tbody>
{body}
</tbody></table></section>"""


def _measured(server: ServerStatus) -> str:
    if server.claim == "no answer":
        return "<b>no answer</b>"
    if server.measured_rps is None:
        return "-"
    text = f"{server.measured_rps:.1f}"
    return f"<b>{text}: slower than claimed</b>" if server.claim == "slower than claimed" else text


# seconds between the chart's time labels, at round clock times
TICK_STEPS = (1, 2, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _chart(samples: list[tuple[float, int, int, int]], num_blocks: int, width: int = 480, height: int = 70) -> str:
    """Servers online (blue) and covered blocks in % (green) over the sampled period, as an inline SVG: a grid line
    and a UTC label at round clock times (at most 6), lines broken where the monitor was not sampling."""
    if len(samples) < 2:
        return '<div class="chart legend">history: collecting samples...</div>'
    t0, t1 = samples[0][0], samples[-1][0]
    span = max(t1 - t0, 1e-9)
    top = max(max(s[1] for s in samples), 1)
    gaps = sorted(b[0] - a[0] for a, b in zip(samples, samples[1:], strict=False))
    gap = max(3 * gaps[len(gaps) // 2], 60.0)  # a pause longer than this (monitor stopped) breaks the lines

    def lines(value, colour: str) -> str:
        runs, run = [], []
        for i, sample in enumerate(samples):
            if run and sample[0] - samples[i - 1][0] > gap:
                runs.append(run)
                run = []
            run.append(f"{(sample[0] - t0) / span * width:.1f},{height - value(sample) * (height - 4) - 2:.1f}")
        runs.append(run)
        return "".join(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(r)}"/>'
                       for r in runs)

    step = next((s for s in TICK_STEPS if span / s <= 6), TICK_STEPS[-1])
    fmt = "%H:%M:%S" if step < 60 else "%H:%M" if step < 86400 else "%m-%d"
    first = (int(t0) // step + 1) * step
    ticks = "".join(
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#ddd"/>'
        f'<text class="axis" x="{x:.1f}" y="{height + 12}" text-anchor="middle">{time.strftime(fmt, time.gmtime(t))}'
        f'</text>' for t in range(first, int(t1) + 1, step) for x in [(t - t0) / span * width])
    period = f"{span / 3600:.1f} h" if span >= 3600 else f"{span / 60:.0f} min" if span >= 60 else f"{span:.0f} s"
    return (f'<svg class="chart" width="{width + 60}" height="{height + 16}" viewBox="-30 0 {width + 60} '
            f'{height + 16}"><rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>{ticks}'
            f'<text class="axis" x="-4" y="10" text-anchor="end">{top}</text>'
            f'<text class="axis" x="-4" y="{height}" text-anchor="end">0</text>'
            f'{lines(lambda s: s[1] / top, "#1565c0")}{lines(lambda s: s[2] / max(s[3], 1), "#2e7d32")}</svg>'
            f'<div class="legend">last {period}, times in UTC: <span style="color:#1565c0">servers online (axis: 0 to '
            f'{top})</span>, <span style="color:#2e7d32">blocks covered (0 to 100% of {num_blocks})</span></div>')
