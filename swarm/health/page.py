"""The health page: server-rendered HTML (no JavaScript), refreshing itself, with an SVG history chart."""

from __future__ import annotations

import time
from html import escape

from swarm.health.state import ModelStatus, ServerStatus, SwarmState

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin: 0 0 .2em; } .totals { color: #555; margin-bottom: 1em; }
section.model { border: 1px solid #ddd; border-radius: 8px; padding: .8em 1em; margin-bottom: 1.2em; }
.badge { padding: .1em .5em; border-radius: 4px; color: white; font-size: .85em; margin-left: .5em; }
.badge.healthy { background: #2e7d32; } .badge.broken { background: #c62828; }
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
 <span class="swatch block weak"></span> 1 server <span class="swatch block missing"></span> none &middot; servers:
 black: online, grey: offline or not answering (a crashed server's record says online until it expires)</div>"""


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
</body></html>"""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _model_section(model: ModelStatus, samples: list[tuple[float, int, int, int]]) -> str:
    model_id = escape(model.model_id)
    status = "healthy" if model.healthy else "broken"
    blocks = "".join(
        f'<span class="block {state}" data-block="{i}" data-servers="{count}" '
        f'title="block {i}: {count} server(s)">{count}</span>'
        for i, (count, state) in enumerate(zip(model.coverage, model.block_states, strict=True)))
    rows = "\n".join(_server_row(s) for s in model.servers)
    return f"""<section class="model" data-model="{model_id}" data-healthy="{str(model.healthy).lower()}">
<h2>{model_id}<span class="badge {status}">{status}</span></h2>
<div>{model.num_blocks} blocks, {model.missing_blocks} without a server &middot; announced throughput
 {model.throughput_sum:.0f} tokens/s, weakest block {model.weakest_block_throughput:.0f} tokens/s</div>
<div class="coverage" data-model="{model_id}">{blocks}</div>
{_chart(samples, model.num_blocks)}
<table class="servers" data-model="{model_id}">
<thead><tr><th>peer</th><th>name</th><th>blocks</th><th>state</th><th>precision</th><th>adapters</th>
<th>throughput (tokens/s)</th><th>decode steps/s (measured)</th><th>free cache (tokens)</th><th>RTT (ms)</th>
<th>version</th><th>reachable</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</section>"""


def _server_row(server: ServerStatus) -> str:
    kind = "offline" if server.state != "online" else "reachable" if server.reachable else "unreachable"
    reachable = {True: "yes", False: "no", None: "-"}[server.reachable]
    # a server whose record says online but that does not answer has crashed or left: offline, whatever it said
    state = "offline (not answering)" if kind == "unreachable" else server.state

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return (f'<tr class="server {kind}" data-peer="{escape(server.peer_id)}">'
            f"<td title='{escape(server.peer_id)}'>{escape(server.short_id)}</td>"
            f"<td>{escape(server.public_name or '')}</td><td>{server.start}:{server.end}</td>"
            f"<td class='state'>{escape(state)}</td><td>{escape(server.dtype)} / {escape(server.quantization)}</td>"
            f"<td class='adapters'>{escape(', '.join(server.adapters)) or '-'}</td>"
            f"<td>{number(server.throughput, 0)}</td><td class='speed' data-claim='{escape(server.claim or '')}'>"
            f"{number(server.inference_rps)} ({_measured(server)})</td>"
            f"<td>{server.cache_tokens_left}</td><td>{'-' if server.rtt_ms is None else f'{server.rtt_ms:.1f}'}</td>"
            f"<td>{escape(server.version)}</td><td class='reachable'>{reachable}</td></tr>")


def _measured(server: ServerStatus) -> str:
    if server.claim == "no answer":
        return "<b>no answer</b>"
    if server.measured_rps is None:
        return "-"
    text = f"{server.measured_rps:.1f}"
    return f"<b>{text}: slower than claimed</b>" if server.claim == "slower than claimed" else text


def _chart(samples: list[tuple[float, int, int, int]], num_blocks: int, width: int = 480, height: int = 70) -> str:
    """Servers online (blue) and covered blocks in % (green) over the sampled period, as an inline SVG."""
    if len(samples) < 2:
        return '<div class="chart legend">history: collecting samples...</div>'
    t0, t1 = samples[0][0], samples[-1][0]
    top = max(max(s[1] for s in samples), 1)

    def points(value) -> str:
        return " ".join(f"{(t - t0) / max(t1 - t0, 1e-9) * width:.1f},{height - value(s) * (height - 4) - 2:.1f}"
                        for s in samples for t in [s[0]])

    servers = points(lambda s: s[1] / top)
    covered = points(lambda s: s[2] / max(s[3], 1))
    span = t1 - t0
    period = f"{span / 3600:.1f} h" if span >= 3600 else f"{span / 60:.0f} min" if span >= 60 else f"{span:.0f} s"
    # a time axis below the plot: the first, middle and last sample's UTC time; 0 and the top value on the left
    ticks = "".join(
        f'<text class="axis" x="{x:.0f}" y="{height + 12}" text-anchor="{anchor}">'
        f'{time.strftime("%H:%M" if span >= 120 else "%H:%M:%S", time.gmtime(t0 + fraction * span))}</text>'
        for fraction, x, anchor in ((0, 0, "start"), (0.5, width / 2, "middle"), (1, width, "end")))
    return (f'<svg class="chart" width="{width + 30}" height="{height + 16}" viewBox="-30 0 {width + 30} '
            f'{height + 16}"><rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>'
            f'<text class="axis" x="-4" y="10" text-anchor="end">{top}</text>'
            f'<text class="axis" x="-4" y="{height}" text-anchor="end">0</text>{ticks}'
            f'<polyline fill="none" stroke="#1565c0" stroke-width="2" points="{servers}"/>'
            f'<polyline fill="none" stroke="#2e7d32" stroke-width="2" points="{covered}"/></svg>'
            f'<div class="legend">last {period} (UTC): <span style="color:#1565c0">servers online (axis: 0 to {top})'
            f'</span>, <span style="color:#2e7d32">blocks covered (0 to 100% of {num_blocks})</span></div>')
