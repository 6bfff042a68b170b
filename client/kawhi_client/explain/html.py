"""The explain view as one self-contained HTML document.

The image panels are the PNG view's own (embedded as data URIs); an SVG layer over
them names each visual token on hover. Each segment's text is shaded with the same
weight colours as the PNG, and hovering it shows its numbers. No script, no network.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from kawhi_client.explain.png import display_cell, heat_panel, token_panel
from kawhi_client.explain.style import (
    DEMO_RGB,
    KEY_RGB,
    MUTED_RGB,
    NEGATIVE_RGB,
    OVERLAY_OPACITY,
    POSITIVE_RGB,
    SAMPLED_RGB,
    TEXT_RGB,
    blend,
    css,
    heat_rgb,
    weight_rgb,
)
from kawhi_client.explain.view import GroupView, ResponseView

__all__ = ["render_html"]

_CLASS_TEXT = {"key": "key region", "sampled": "sampled background", "other": "not used for alignment"}

_STYLE = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: %(text)s; background: #fff;
       margin: 24px; font-size: 14px; line-height: 1.45; }
h1 { font-size: 19px; margin: 0 0 4px 0; }
h2 { font-size: 15px; margin: 18px 0 6px 0; }
h2 .num { font-weight: normal; margin-left: 14px; }
.muted { color: %(muted)s; }
.small { font-size: 12px; }
.demo { color: %(demo)s; font-weight: bold; }
.page { display: flex; flex-wrap: wrap; gap: 32px; align-items: flex-start; }
.left { flex: 0 1 auto; max-width: 100%%; }
.right { flex: 1 1 360px; max-width: 760px; min-width: 0; }
svg { display: block; max-width: 100%%; height: auto; }
.bar, .scale { max-width: 100%%; }
.settings { margin: 0 0 8px 0; padding-left: 18px; }
.note { color: %(demo)s; font-weight: bold; font-size: 12px; margin: 6px 0; }
.pmap { border-collapse: separate; border-spacing: 2px; margin: 4px 0 10px 0; font-size: 12px; }
.pmap th { font-weight: bold; text-align: right; padding-right: 6px; }
.pmap td { min-width: 38px; text-align: center; padding: 1px 3px; }
.pmap-wrap { overflow-x: auto; max-width: 100%%; }
svg rect.token { fill: transparent; }
svg rect.token:hover { fill: rgba(255, 255, 255, 0.35); stroke: #000; stroke-width: 2; }
.legend div { margin: 3px 0; }
.chip { display: inline-block; width: 12px; height: 12px; margin-right: 8px; vertical-align: -1px;
        border: 1px solid; }
.bar { width: 260px; height: 12px; margin-top: 4px; }
.scale { width: 260px; display: flex; justify-content: space-between; }
.pos { color: %(pos)s; font-weight: bold; }
.neg { color: %(neg)s; font-weight: bold; }
.zero { color: %(muted)s; font-weight: bold; }
.seg { position: relative; }
.seg:hover { outline: 2px solid #222; z-index: 2; }
.block { border-left: 8px solid; padding: 2px 8px 4px 8px; margin: 0 0 4px 0; }
.block .label { font-size: 12px; color: %(muted)s; }
.block .text { white-space: pre-wrap; }
.inline { white-space: pre-wrap; margin: 0; }
.tip { display: none; position: absolute; left: 12px; top: 100%%; background: #222; color: #fff;
       font-size: 12px; padding: 4px 8px; border-radius: 3px; white-space: nowrap; z-index: 3; }
.seg:hover > .tip { display: block; }
"""


def _data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _panel(view: GroupView, image: Any, cell: int, describe: Any) -> str:
    rows, cols = view.grid
    w, h = image.size
    rects = []
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        rects.append(f'<rect class="token" x="{c * cell}" y="{r * cell}" width="{cell}" height="{cell}">'
                     f"<title>{html.escape(describe(index, r, c))}</title></rect>")
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" '
            f'role="img"><image href="{_data_uri(image)}" x="0" y="0" width="{w}" height="{h}"/>'
            + "".join(rects) + "</svg>")


def _tip(text: str) -> str:
    return f'<span class="tip">{html.escape(text)}</span>'


def _segment_numbers(response: ResponseView, index: int) -> str:
    seg = response.segments[index]
    return (f"response #{response.index}, segment {seg.index}: weight {seg.weight:.4f} · α {seg.alpha:+.5f} · "
            f"token advantage {seg.advantage:+.4f} (group advantage {response.advantage:+.4f} × weight)")


def _response(view: GroupView, response: ResponseView) -> str:
    adv = response.advantage
    adv_class = "pos" if adv > 0 else "neg" if adv < 0 else "zero"
    reward = "none" if response.reward is None else f"{response.reward:.2f}"
    out = [f'<section class="response" id="response-{response.index}"><h2>Response #{response.index}'
           f'<span class="num">reward {reward}</span>'
           f'<span class="num {adv_class}">group advantage {adv:+.3f}</span></h2>']
    if not response.segments:
        out.append('<p class="muted">(empty response: no tokens to weight)</p>')
    elif response.blocks:
        for seg in response.segments:
            numbers = _segment_numbers(response, seg.index)
            swatch, tint = view.shade(seg.weight)
            out.append(
                f'<div class="seg block" data-weight="{seg.weight:.6g}" data-alpha="{seg.alpha:.6g}" '
                f'style="background:{css(tint)};'
                f'border-left-color:{css(swatch)}" title="{html.escape(numbers)}">'
                f'<div class="label">¶{seg.index} &nbsp; weight {seg.weight:.3f} &nbsp; α {seg.alpha:+.4f} &nbsp; '
                f'token advantage {seg.advantage:+.3f}</div>'
                f'<div class="text">{html.escape(seg.text.rstrip())}</div>{_tip(numbers)}</div>')
    else:
        spans = []
        for seg in response.segments:
            numbers = _segment_numbers(response, seg.index)
            spans.append(f'<span class="seg" data-weight="{seg.weight:.6g}" data-alpha="{seg.alpha:.6g}" '
                         f'style="background:{css(view.shade(seg.weight)[1])}" title="{html.escape(numbers)}">'
                         f"{html.escape(seg.text)}{_tip(numbers)}</span>")
        out.append('<p class="inline">' + "".join(spans) + "</p>")
    out.append("</section>")
    return "".join(out)


def _paragraph_map(view: GroupView) -> str:
    """The per-paragraph heat map: a row per response, a cell per paragraph, coloured by weight."""
    rows = []
    for r, weights in enumerate(view.paragraph_matrix):
        cells = []
        for j, weight in enumerate(weights):
            swatch = view.shade(weight)[0]
            ink = "#fff" if sum(swatch) < 380 else css(TEXT_RGB)
            cells.append(f'<td data-weight="{weight:.6g}" style="background:{css(swatch)};color:{ink}" '
                         f'title="response #{r}, ¶{j}: weight {weight:.4f}">{weight:.2f}</td>')
        rows.append(f"<tr><th>#{r}</th>{''.join(cells)}</tr>")
    return ('<div class="small muted">weight per paragraph (rows: responses; columns: paragraphs ¶0, ¶1, ...)'
            f'</div><div class="pmap-wrap"><table class="pmap">{"".join(rows)}</table></div>')


def _settings(view: GroupView) -> str:
    lines = view.settings_lines()
    out = []
    if lines:
        out.append('<h2>Settings</h2><ul class="settings small muted">'
                   + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    for note in (view.normalize_note(), view.ZERO_ADVANTAGE_NOTE if view.advantages_all_zero else None):
        if note:
            out.append(f'<p class="note">{html.escape(note)}</p>')
    return "".join(out)


def _chip(colour: Any, opacity: float = OVERLAY_OPACITY) -> str:
    if colour is None:
        return f'<span class="chip" style="border-color:{css(MUTED_RGB)}"></span>'
    return (f'<span class="chip" style="background:{css(blend((255, 255, 255), colour, opacity))};'
            f'border-color:{css(colour)}"></span>')


def render_html(view: GroupView) -> str:
    """The whole document as a string."""
    rows, cols = view.grid
    cell = display_cell(view.grid)
    counts = view.counts
    title = f"KAWHI explain: group {view.id or '(no id)'}"

    def token_text(index: int, r: int, c: int) -> str:
        return f"visual token {index} (row {r}, column {c}): {_CLASS_TEXT[view.token_class(index)]}"

    left = [
        "<h2>The image as the model saw it</h2>",
        f'<div class="small muted">resized to {cols * view.patch_side}x{rows * view.patch_side} px: {rows} x {cols} '
        f"visual tokens of {view.patch_side} px (hover a token)</div>",
        _panel(view, token_panel(view, cell), cell, token_text),
        '<div class="legend">',
        f"<div>{_chip(KEY_RGB)}key region (SGUF): {counts['key']} tokens</div>",
        f"<div>{_chip(SAMPLED_RGB)}sampled background: {counts['sampled']} tokens</div>",
        f"<div>{_chip(None)}not used for alignment: {counts['other']} tokens</div>",
        "</div>",
    ]
    if view.heatmap is not None:
        heat, low, high = heat_panel(view, cell)
        heatmap = view.heatmap

        def heat_text(index: int, r: int, c: int) -> str:
            return (f"{token_text(index, r, c)}; mean cosine with response #{view.heatmap_response}: "
                    f"{heatmap[index]:+.5f}")

        stops = ", ".join(css(heat_rgb(i / 10)) for i in range(11))
        left += [
            f"<h2>Alignment of each visual token with response #{view.heatmap_response}</h2>",
            _panel(view, heat, cell, heat_text),
            f'<div class="bar" style="width:{heat.width}px;background:linear-gradient(to right, {stops})"></div>',
            f'<div class="scale small muted" style="width:{heat.width}px"><span>{low:+.4f}</span>'
            f"<span>mean cosine over heads and the response's tokens</span><span>{high:+.4f}</span></div>",
        ]
    if view.model:
        left.append(f'<p class="small muted">model: {html.escape(view.model)}</p>')

    top = view.weight_top
    ramp = ", ".join(css(weight_rgb(top * i / 10, top)) for i in range(11))
    right = [
        '<div class="small muted">segment shading = weight (share of the group advantage its tokens keep); '
        "hover a segment for its numbers</div>",
        f'<div class="bar" style="background:linear-gradient(to right, {ramp})"></div>',
        f'<div class="scale small muted"><span>0</span><span>{top / 2:g}</span><span>{top:g}</span></div>',
    ]
    right.append(_settings(view))
    if any(view.paragraph_matrix):
        right.append(_paragraph_map(view))
    right += [_response(view, r) for r in view.responses]

    style = _STYLE % {"text": css(TEXT_RGB), "muted": css(MUTED_RGB), "demo": css(DEMO_RGB),
                      "pos": css(POSITIVE_RGB), "neg": css(NEGATIVE_RGB)}
    demo = ('<p class="demo">DEMO model (random weights): these numbers test the plumbing, not the method</p>'
            if view.is_demo else "")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="muted">Prompt: {html.escape(view.prompt)}</p>{demo}'
        f'<div class="page"><div class="left">{"".join(left)}</div>'
        f'<div class="right">{"".join(right)}</div></div></body></html>\n'
    )
