"""The explain view as PNG pages (Pillow, DejaVu fonts from matplotlib).

A page: a title row, then the image column on the left (the model's input with the
token overlay and its legend, and optionally the alignment heat map) and the
responses on the right, each segment shaded by its weight with its numbers. The
responses flow down the right column; when they outgrow ``max_page_height`` they
continue on another page, which repeats the image column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kawhi_client.explain.style import (
    DEMO_RGB,
    GRID_RGBA,
    HEAT_OPACITY,
    KEY_RGB,
    MUTED_RGB,
    NEGATIVE_RGB,
    OVERLAY_OPACITY,
    POSITIVE_RGB,
    SAMPLED_RGB,
    TEXT_RGB,
    blend,
    font,
    heat_rgb,
    weight_rgb,
)
from kawhi_client.explain.view import GroupView, ResponseView

__all__ = ["DEFAULT_MAX_PAGE_HEIGHT", "Box", "Rendered", "display_cell", "heat_panel", "render_pages",
           "token_panel"]

DEFAULT_MAX_PAGE_HEIGHT = 1600
MARGIN = 24
GAP = 32
TEXT_WIDTH = 720
SWATCH = 8
PAD = 8
BODY, SMALL, HEAD, TITLE = 14, 12, 15, 19
BODY_LINE, SMALL_LINE, HEAD_LINE = 20, 17, 24
IMAGE_MAX_W, IMAGE_MAX_H, LEFT_MIN_W = 560, 620, 380

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


@dataclass
class Rendered:
    """The pages and where things were drawn on them (tests read pixels back there).

    token_box: (x0, y0) of the overlay panel and its cell side in px, same on every page;
    heat_box: the same for the heat map, or None; segment_boxes[(r, s)] = (page, box) of
    the weight swatch (blocks) or the first shaded run (inline) of segment s of response r;
    paragraph_map_box: where the per-paragraph heat map's cells are.
    """

    pages: list[Any]
    cell: int
    token_origin: tuple[int, int]
    heat_origin: tuple[int, int] | None
    segment_boxes: dict[tuple[int, int], tuple[int, Box]] = field(default_factory=dict)
    # (page, box) of the per-paragraph heat map's cells: cell (r, j) starts at
    # (x0 + j * PMAP_CELL_W, y0 + r * (PMAP_CELL_H + 2))
    paragraph_map_box: tuple[int, Box] | None = None


def display_cell(grid: tuple[int, int]) -> int:
    """Side in px of one visual token on screen: the image fits IMAGE_MAX_W x IMAGE_MAX_H."""
    rows, cols = grid
    return max(4, min(40, IMAGE_MAX_W // cols, IMAGE_MAX_H // rows))


def token_panel(view: GroupView, cell: int) -> Any:
    """The model's input scaled to ``cell`` px per token, key/sampled tokens tinted, grid drawn."""
    from PIL import Image

    rows, cols = view.grid
    base = view.image.resize((cols * cell, rows * cell), Image.Resampling.BICUBIC).convert("RGB")
    colour = {"key": KEY_RGB, "sampled": SAMPLED_RGB}
    tints = {i: (colour[view.token_class(i)], OVERLAY_OPACITY) for i in view.selected}
    return _tint_tokens(base, view.grid, cell, tints)


def heat_panel(view: GroupView, cell: int) -> tuple[Any, float, float]:
    """The image in grey with each token tinted by its alignment (viridis, min..max). Returns
    (panel, min, max)."""
    from PIL import Image

    assert view.heatmap is not None
    rows, cols = view.grid
    low, high = min(view.heatmap), max(view.heatmap)
    span = high - low
    grey = view.image.convert("L").resize((cols * cell, rows * cell), Image.Resampling.BICUBIC).convert("RGB")
    tints = {i: (heat_rgb((v - low) / span if span > 0 else 0.5), HEAT_OPACITY) for i, v in enumerate(view.heatmap)}
    return _tint_tokens(grey, view.grid, cell, tints), low, high


def _tint_tokens(base: Any, grid: tuple[int, int], cell: int, tints: dict[int, tuple[Any, float]]) -> Any:
    """Blend each token's cell of ``base`` with its (colour, opacity); then draw the grid."""
    from PIL import Image

    rows, cols = grid
    layer = Image.new("RGBA", (cols, rows), (0, 0, 0, 0))
    for index, (rgb, opacity) in tints.items():
        layer.putpixel((index % cols, index // cols), (*rgb, round(opacity * 255)))
    layer = layer.resize(base.size, Image.Resampling.NEAREST)
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    _draw_grid(out, rows, cols, cell)
    return out


def _draw_grid(image: Any, rows: int, cols: int, cell: int) -> None:
    from PIL import Image, ImageDraw

    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = image.size
    for c in range(cols + 1):
        x = min(c * cell, w - 1)
        draw.line([(x, 0), (x, h - 1)], fill=GRID_RGBA)
    for r in range(rows + 1):
        y = min(r * cell, h - 1)
        draw.line([(0, y), (w - 1, y)], fill=GRID_RGBA)
    image.paste(Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB"))


# ---------------------------------------------------------------------------- text layout


def wrap(text: str, size: int, width: float, bold: bool = False) -> list[str]:
    """Lines of ``text`` no wider than ``width`` px; explicit newlines kept, long words broken."""
    f = font(size, bold)
    lines: list[str] = []
    for raw in text.split("\n"):
        line = ""
        for word in raw.split(" "):
            candidate = word if not line else f"{line} {word}"
            if f.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while f.getlength(word) > width and len(word) > 1:
                cut = max(1, next((k for k in range(len(word), 0, -1) if f.getlength(word[:k]) <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


@dataclass
class _Item:
    """One row of the right column: its height and how to draw it at (x, y) on a page."""

    height: int
    draw: Callable[[Any, int, int], Box | None]
    response: int
    segment: int | None = None
    continues: bool = True  # part of a response (so a page break repeats its header)
    keep_with_next: bool = False  # a header or label: never the last row of a page
    spacer: bool = False  # dropped at a page break
    resume: _Item | None = None  # drawn first on a new page when a break falls inside a segment
    paragraph_map: bool = False  # the per-paragraph heat map (its box is recorded)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "none"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _response_items(view: GroupView, response: ResponseView, width: int) -> list[_Item]:
    items = [_header_item(response, width, continued=False)]
    if not response.segments:
        items.append(_text_item(response.index, None, "(empty response: no tokens to weight)", None, width,
                                colour=MUTED_RGB))
        return items
    if response.blocks:
        for seg in response.segments:
            swatch, tint = view.shade(seg.weight)
            numbers = f"weight {seg.weight:.3f}   α {seg.alpha:+.4f}   token advantage {seg.advantage:+.3f}"
            items.append(_text_item(response.index, seg.index, f"¶{seg.index}   {numbers}", (swatch, tint), width,
                                    size=SMALL, colour=MUTED_RGB, line=SMALL_LINE))
            items[-1].keep_with_next = True
            resume = _text_item(response.index, seg.index, f"¶{seg.index} (continued)   {numbers}", (swatch, tint),
                                width, size=SMALL, colour=MUTED_RGB, line=SMALL_LINE)
            for text in wrap(seg.text.rstrip(), BODY, width - SWATCH - 2 * PAD):
                items.append(_text_item(response.index, seg.index, text, (swatch, tint), width))
                items[-1].resume = resume
            items.append(_spacer(response.index, 4))
    else:
        items.extend(_inline_items(view, response, width))
    return items


def _header_item(response: ResponseView, width: int, continued: bool) -> _Item:
    def draw(d: Any, x: int, y: int) -> None:
        head = f"Response #{response.index}" + ("  (continued)" if continued else "")
        d.text((x, y + 2), head, font=font(HEAD, True), fill=TEXT_RGB)
        cx = x + int(font(HEAD, True).getlength(head)) + 18
        d.text((cx, y + 4), f"reward {_fmt(response.reward)}", font=font(BODY), fill=TEXT_RGB)
        cx += int(font(BODY).getlength(f"reward {_fmt(response.reward)}")) + 16
        colour = POSITIVE_RGB if response.advantage > 0 else NEGATIVE_RGB if response.advantage < 0 else MUTED_RGB
        d.text((cx, y + 4), f"group advantage {response.advantage:+.3f}", font=font(BODY, True), fill=colour)
        return None

    return _Item(HEAD_LINE + 4, draw, response.index, continues=False, keep_with_next=True)


def _text_item(r: int, s: int | None, text: str, shade: tuple[Any, Any] | None, width: int, *,
               size: int = BODY, colour: Any = TEXT_RGB, line: int = BODY_LINE) -> _Item:
    def draw(d: Any, x: int, y: int) -> Box | None:
        box = None
        if shade is not None:
            swatch, tint = shade
            d.rectangle([x + SWATCH, y, x + width - 1, y + line - 1], fill=tint)
            box = (x, y, x + SWATCH, y + line)
            d.rectangle([x, y, x + SWATCH - 1, y + line - 1], fill=swatch)
        d.text((x + SWATCH + PAD, y + (line - size) // 2 - 1), text, font=font(size), fill=colour)
        return box

    return _Item(line, draw, r, s)


def _spacer(r: int, height: int) -> _Item:
    return _Item(height, lambda d, x, y: None, r, continues=False, spacer=True)


def _inline_items(view: GroupView, response: ResponseView, width: int) -> list[_Item]:
    """Sentences or tokens: one flowing text, each run shaded, its weight after it in small type."""
    import re

    body, small = font(BODY), font(SMALL)
    label_each = len(response.segments) <= 60
    pieces: list[tuple[str, int | None]] = []  # (text, segment) ; segment None = a label
    for seg in response.segments:
        pieces.extend((m.group(0), seg.index) for m in re.finditer(r"\S+\s*|\s+", seg.text))
        if label_each:
            pieces.append((f"w{seg.weight:.2f} ", None))
    lines: list[list[tuple[int, str, int | None]]] = [[]]
    x, limit = 0, width - PAD
    for text, seg_index in pieces:
        f = small if seg_index is None else body
        w = int(f.getlength(text.rstrip()))
        if x > 0 and x + w > limit:
            lines.append([])
            x = 0
        lines[-1].append((x, text.replace("\n", " "), seg_index))
        x += int(f.getlength(text.replace("\n", " ")))
        if "\n" in text:
            lines.append([])
            x = 0
    items = []
    for fragments in (line for line in lines if line):
        def draw(d: Any, x0: int, y: int, fragments: list = fragments) -> Box | None:
            first = None
            for fx, text, seg_index in fragments:
                if seg_index is None:
                    d.text((x0 + PAD + fx, y + 5), text, font=small, fill=MUTED_RGB)
                    continue
                seg = response.segments[seg_index]
                w = int(body.getlength(text))
                box = (x0 + PAD + fx, y, x0 + PAD + fx + w, y + BODY_LINE)
                d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=view.shade(seg.weight)[1])
                d.text((box[0], y + 2), text, font=body, fill=TEXT_RGB)
                first = first or box
            return first

        segs = [s for _, _, s in fragments if s is not None]
        items.append(_Item(BODY_LINE, draw, response.index, segs[0] if segs else None))
    return items


# ---------------------------------------------------------------------------- page


def _legend_row(d: Any, x: int, y: int, colour: Any, text: str, outline_only: bool = False) -> None:
    if outline_only:
        d.rectangle([x, y + 2, x + 13, y + 15], outline=MUTED_RGB)
    else:
        d.rectangle([x, y + 2, x + 13, y + 15], fill=blend((255, 255, 255), colour, OVERLAY_OPACITY),
                    outline=colour)
    d.text((x + 22, y + 1), text, font=font(BODY), fill=TEXT_RGB)


def _left_column(view: GroupView, cell: int) -> tuple[int, int, Callable[[Any, Any, int, int], tuple]]:
    """(width, height, draw(page, draw, x, y) -> (token origin, heat origin))."""
    rows, cols = view.grid
    panel = token_panel(view, cell)
    heat = heat_panel(view, cell) if view.heatmap is not None else None
    width = max(panel.width, LEFT_MIN_W)
    counts = view.counts
    height = HEAD_LINE + SMALL_LINE + 6 + panel.height + 8 + 3 * 22
    if heat is not None:
        height += 16 + HEAD_LINE + heat[0].height + 8 + 14 + SMALL_LINE
    info = f"model: {view.model}" if view.model else ""
    height += SMALL_LINE + 8 if info else 0

    def draw(page: Any, d: Any, x: int, y: int) -> tuple:
        d.text((x, y), "The image as the model saw it", font=font(HEAD, True), fill=TEXT_RGB)
        y += HEAD_LINE
        d.text((x, y), f"resized to {cols * view.patch_side}x{rows * view.patch_side} px: {rows} x {cols} "
               f"visual tokens of {view.patch_side} px", font=font(SMALL), fill=MUTED_RGB)
        y += SMALL_LINE + 6
        page.paste(panel, (x, y))
        token_origin = (x, y)
        y += panel.height + 8
        _legend_row(d, x, y, KEY_RGB, f"key region (SGUF): {counts['key']} tokens")
        _legend_row(d, x, y + 22, SAMPLED_RGB, f"sampled background: {counts['sampled']} tokens")
        _legend_row(d, x, y + 44, None, f"not used for alignment: {counts['other']} tokens", outline_only=True)
        y += 66
        heat_origin = None
        if heat is not None:
            image, low, high = heat
            y += 16
            d.text((x, y), f"Alignment of each visual token with response #{view.heatmap_response}",
                   font=font(HEAD, True), fill=TEXT_RGB)
            y += HEAD_LINE
            page.paste(image, (x, y))
            heat_origin = (x, y)
            y += image.height + 8
            for i in range(image.width):
                d.line([(x + i, y), (x + i, y + 11)], fill=heat_rgb(i / max(image.width - 1, 1)))
            y += 14
            d.text((x, y), f"{low:+.4f}", font=font(SMALL), fill=MUTED_RGB)
            mid = "mean cosine over heads and the response's tokens"
            d.text((x + (image.width - font(SMALL).getlength(mid)) / 2, y), mid, font=font(SMALL), fill=MUTED_RGB)
            d.text((x + image.width - font(SMALL).getlength(f"{high:+.4f}"), y), f"{high:+.4f}", font=font(SMALL),
                   fill=MUTED_RGB)
        if info:
            d.text((x, y + 26 if heat is not None else y + 8), info, font=font(SMALL), fill=MUTED_RGB)
        return token_origin, heat_origin

    return width, height, draw


PMAP_CELL_W, PMAP_CELL_H, PMAP_LABEL_W = 44, 20, 40


def _paragraph_map(view: GroupView, width: int) -> _Item:
    """The per-paragraph heat map: one row per response, one cell per paragraph, coloured
    by its weight (paragraphs are what gets weighted); beyond the width, "+N" says how many."""
    fit = max(1, (width - PMAP_LABEL_W - 30) // PMAP_CELL_W)
    rows = view.paragraph_matrix
    height = SMALL_LINE + 4 + len(rows) * (PMAP_CELL_H + 2) + 8

    def draw(d: Any, x: int, y: int) -> Box:
        d.text((x, y), "weight per paragraph (rows: responses; columns: paragraphs ¶0, ¶1, ...)", font=font(SMALL),
               fill=MUTED_RGB)
        y0 = y + SMALL_LINE + 4
        for r, weights in enumerate(rows):
            cy = y0 + r * (PMAP_CELL_H + 2)
            d.text((x, cy + 3), f"#{r}", font=font(SMALL, True), fill=TEXT_RGB)
            for j, weight in enumerate(weights[:fit]):
                cx = x + PMAP_LABEL_W + j * PMAP_CELL_W
                swatch = view.shade(weight)[0]
                d.rectangle([cx, cy, cx + PMAP_CELL_W - 3, cy + PMAP_CELL_H - 1], fill=swatch)
                label = f"{weight:.2f}"
                ink = (255, 255, 255) if sum(swatch) < 380 else TEXT_RGB
                d.text((cx + (PMAP_CELL_W - 3 - font(SMALL).getlength(label)) / 2, cy + 3), label, font=font(SMALL),
                       fill=ink)
            if len(weights) > fit:
                d.text((x + PMAP_LABEL_W + fit * PMAP_CELL_W, cy + 3), f"+{len(weights) - fit}", font=font(SMALL),
                       fill=MUTED_RGB)
        return (x + PMAP_LABEL_W, y0, x + PMAP_LABEL_W + fit * PMAP_CELL_W, y0 + len(rows) * (PMAP_CELL_H + 2))

    return _Item(height, draw, -1, continues=False, paragraph_map=True)


def _intro_items(view: GroupView, width: int) -> list[_Item]:
    """Above the responses: the settings that produced the weights, the notes that change
    how to read them, and the per-paragraph heat map."""
    items: list[_Item] = []
    lines = view.settings_lines()
    if lines:
        items.append(_text_item(-1, None, "Settings", None, width, size=SMALL, colour=TEXT_RGB, line=SMALL_LINE))
        for line in lines:
            for text in wrap(line, SMALL, width - SWATCH - 2 * PAD):
                items.append(_text_item(-1, None, text, None, width, size=SMALL, colour=MUTED_RGB, line=SMALL_LINE))
    for note in (view.normalize_note(), view.ZERO_ADVANTAGE_NOTE if view.advantages_all_zero else None):
        if note:
            items.append(_spacer(-1, 4))
            for text in wrap(note, SMALL, width - SWATCH - 2 * PAD, bold=True):
                items.append(_text_item(-1, None, text, None, width, size=SMALL, colour=DEMO_RGB, line=SMALL_LINE))
    if any(view.paragraph_matrix):
        items.append(_spacer(-1, 6))
        items.append(_paragraph_map(view, width))
    for item in items:
        item.continues = False
    return items


def _weight_legend(view: GroupView, width: int) -> _Item:
    top = view.weight_top

    def draw(d: Any, x: int, y: int) -> None:
        label = "segment shading = weight (share of the group advantage its tokens keep)"
        d.text((x, y), label, font=font(SMALL), fill=MUTED_RGB)
        bar_x, bar_y, bar_w = x, y + SMALL_LINE, 260
        for i in range(bar_w):
            d.line([(bar_x + i, bar_y), (bar_x + i, bar_y + 11)], fill=weight_rgb(top * i / (bar_w - 1), top))
        for value in (0.0, top / 2, top):
            tx = bar_x + round(value / top * (bar_w - 1))
            text = f"{value:g}"
            d.text((min(tx - font(SMALL).getlength(text) / 2, bar_x + bar_w - font(SMALL).getlength(text)),
                    bar_y + 13), text, font=font(SMALL), fill=MUTED_RGB)
            d.line([(tx, bar_y + 11), (tx, bar_y + 13)], fill=MUTED_RGB)
        return None

    return _Item(SMALL_LINE + 36, draw, -1, continues=False)


def render_pages(view: GroupView, *, max_page_height: int = DEFAULT_MAX_PAGE_HEIGHT) -> Rendered:
    """Draw ``view`` as one or more RGB pages of at most ``max_page_height`` px (unless the
    image column alone is taller)."""
    from PIL import Image, ImageDraw

    cell = display_cell(view.grid)
    left_w, left_h, draw_left = _left_column(view, cell)
    page_w = MARGIN + left_w + GAP + TEXT_WIDTH + MARGIN
    title_lines = wrap(f"Prompt: {view.prompt}", BODY, page_w - 2 * MARGIN)[:3]
    top = MARGIN + HEAD_LINE + 4 + len(title_lines) * BODY_LINE + (BODY_LINE if view.is_demo else 0) + 12
    room = max(max_page_height - top - MARGIN, left_h)

    # Pack the right column into pages.
    pages_items: list[list[_Item]] = [[]]
    used = 0
    legend = _weight_legend(view, TEXT_WIDTH)
    stream: list[_Item] = _intro_items(view, TEXT_WIDTH)
    stream.append(_spacer(-1, 10))
    for response in view.responses:
        stream.extend(_response_items(view, response, TEXT_WIDTH))
        stream.append(_spacer(response.index, 14))
    pages_items[0].append(legend)
    used = legend.height
    for position, item in enumerate(stream):
        needed = item.height
        if item.keep_with_next and position + 1 < len(stream):
            needed += stream[position + 1].height
        if used + needed > room and used > legend.height:
            if item.spacer:
                continue
            pages_items.append([legend])
            used = legend.height
            if item.continues:
                header = _header_item(view.responses[item.response], TEXT_WIDTH, continued=True)
                pages_items[-1].append(header)
                used += header.height
            if item.resume is not None:
                pages_items[-1].append(item.resume)
                used += item.resume.height
        pages_items[-1].append(item)
        used += item.height

    rendered = Rendered([], cell, (0, 0), None)
    for number, items in enumerate(pages_items, start=1):
        height = top + max(left_h, sum(i.height for i in items)) + MARGIN
        page = Image.new("RGB", (page_w, height), (255, 255, 255))
        d = ImageDraw.Draw(page)
        title = f"KAWHI explain: group {view.id or '(no id)'}"
        d.text((MARGIN, MARGIN), title, font=font(TITLE, True), fill=TEXT_RGB)
        pages_note = f"page {number} of {len(pages_items)}   ·   {len(view.responses)} responses"
        d.text((page_w - MARGIN - font(BODY).getlength(pages_note), MARGIN + 4), pages_note, font=font(BODY),
               fill=MUTED_RGB)
        y = MARGIN + HEAD_LINE + 4
        for line in title_lines:
            d.text((MARGIN, y), line, font=font(BODY), fill=MUTED_RGB)
            y += BODY_LINE
        if view.is_demo:
            d.text((MARGIN, y), "DEMO model (random weights): these numbers test the plumbing, not the method",
                   font=font(BODY, True), fill=DEMO_RGB)
        rendered.token_origin, rendered.heat_origin = draw_left(page, d, MARGIN, top)
        x, y = MARGIN + left_w + GAP, top
        for item in items:
            box = item.draw(d, x, y)
            if box is not None and item.segment is not None:
                rendered.segment_boxes.setdefault((item.response, item.segment), (number - 1, box))
            if box is not None and item.paragraph_map:
                rendered.paragraph_map_box = (number - 1, box)
            y += item.height
        rendered.pages.append(page)
    return rendered
