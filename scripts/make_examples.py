#!/usr/bin/env python3
"""Draw the example images and write examples/rollouts.jsonl.

Everything here is deterministic: the figures are drawn with PIL from fixed
numbers (no randomness, no downloaded fonts: only PIL's bundled default font),
so running the script twice gives byte-identical files.  Its outputs are
committed; run it again only when you change the examples:

    python3 scripts/make_examples.py

The JSONL file holds one rollout group per line in the wire format of the API
(see the "A rollout group (input)" section of the API docs).  Images are given
as {"path": ...} relative to the JSONL file's folder, which only the CLI
accepts.  The three groups are chosen to exercise the documented rules:

* bar_chart  - G=5, mixed 0/1 rewards, one single-paragraph response;
* triangle   - G=4, mixed 0/1 rewards, one response ending in "\\n\\n";
* line_plot  - G=4, all rewards equal (every response correct), so the group
               advantage is zero for all of them (the equal-rewards rule).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
IMAGES = EXAMPLES / "images"

# Draw at SS times the final size, then downsample: cheap anti-aliasing that
# stays deterministic (PIL's ImageDraw itself does not anti-alias shapes).
SS = 2

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GRID = (225, 225, 225)
GREY = (110, 110, 110)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled default font (Aileron when FreeType is present).

    Pillow >= 10.1 accepts a size; older Pillow (or no FreeType) falls back to
    the fixed bitmap font, which is smaller but still legible.
    """
    try:
        return ImageFont.load_default(size=size * SS)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def text_at(draw: ImageDraw.ImageDraw, xy, text: str, fnt, fill=BLACK,
            anchor: str = "mm") -> None:
    """Draw text anchored at xy (final-image coordinates)."""
    x, y = xy
    draw.text((x * SS, y * SS), text, font=fnt, fill=fill, anchor=anchor)


def canvas(w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (w * SS, h * SS), WHITE)
    return img, ImageDraw.Draw(img)


def finish(img: Image.Image, path: Path) -> None:
    w, h = img.size
    small = img.resize((w // SS, h // SS), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No metadata, fixed compression: byte-identical output on every run.
    small.save(path, format="PNG", optimize=False, compress_level=9)


def S(*coords: float) -> list[float]:
    """Scale final-image coordinates to the supersampled canvas."""
    return [c * SS for c in coords]


# --------------------------------------------------------------------------
# Figure 1: bar chart
# --------------------------------------------------------------------------

BAR_DATA = [("Jan", 12), ("Feb", 18), ("Mar", 27), ("Apr", 9), ("May", 21)]
BAR_COLOURS = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83),
               (155, 89, 182)]


def draw_bar_chart(path: Path) -> None:
    W, H = 448, 336
    img, d = canvas(W, H)
    f_title, f_tick, f_label = font(16), font(12), font(12)

    left, right, top, bottom = 58, 428, 46, 286  # plot area
    y_max = 30
    text_at(d, (W / 2, 20), "Books read per month", f_title)

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * v / y_max

    # Horizontal grid and y ticks every 5.
    for v in range(0, y_max + 1, 5):
        y = y_of(v)
        if v:
            d.line(S(left, y, right, y), fill=GRID, width=SS)
        d.line(S(left - 5, y, left, y), fill=BLACK, width=SS)
        text_at(d, (left - 9, y), str(v), f_tick, anchor="rm")

    # Bars.
    n = len(BAR_DATA)
    slot = (right - left) / n
    bar_w = slot * 0.6
    for i, ((label, v), colour) in enumerate(zip(BAR_DATA, BAR_COLOURS)):
        cx = left + slot * (i + 0.5)
        x0, x1 = cx - bar_w / 2, cx + bar_w / 2
        d.rectangle(S(x0, y_of(v), x1, bottom), fill=colour, outline=BLACK,
                    width=SS)
        d.line(S(cx, bottom, cx, bottom + 5), fill=BLACK, width=SS)
        text_at(d, (cx, bottom + 14), label, f_tick)

    # Axes on top of the bars.
    d.line(S(left, top - 6, left, bottom), fill=BLACK, width=2 * SS)
    d.line(S(left, bottom, right, bottom), fill=BLACK, width=2 * SS)
    text_at(d, ((left + right) / 2, H - 16), "Month", f_label)

    # Rotated y-axis label.
    label = "Number of books"
    tw, th = text_size(d, label, f_label)
    tmp = Image.new("RGB", (tw + 4 * SS, th + 6 * SS), WHITE)
    ImageDraw.Draw(tmp).text((tmp.width // 2, tmp.height // 2), label,
                             font=f_label, fill=BLACK, anchor="mm")
    tmp = tmp.rotate(90, expand=True)
    img.paste(tmp, (int(16 * SS - tmp.width / 2),
                    int((top + bottom) / 2 * SS - tmp.height / 2)))
    finish(img, path)


# --------------------------------------------------------------------------
# Figure 2: right triangle with altitude and circumcircle
# --------------------------------------------------------------------------

def draw_triangle(path: Path) -> None:
    W, H = 392, 392
    img, d = canvas(W, H)
    f_vertex, f_side, f_title = font(18), font(14), font(13)

    # Right angle at C; AC = 6, BC = 8, AB = 10 (drawn at 28 px per unit).
    # The hypotenuse AB is a diameter of the circumcircle; D is the foot of
    # the altitude from C, so CD = AC * BC / AB = 4.8.
    u = 28.0
    C = (82.0, 300.0)
    A = (C[0], C[1] - 6 * u)       # up from C
    B = (C[0] + 8 * u, C[1])       # right of C
    O = ((A[0] + B[0]) / 2, (A[1] + B[1]) / 2)  # noqa: E741  (the figure's label)
    r = 5 * u
    # Foot of the perpendicular from C onto AB.
    abx, aby = B[0] - A[0], B[1] - A[1]
    t = ((C[0] - A[0]) * abx + (C[1] - A[1]) * aby) / (abx ** 2 + aby ** 2)
    D = (A[0] + t * abx, A[1] + t * aby)

    text_at(d, (W / 2, 18), "Right triangle ABC with altitude CD", f_title,
            fill=GREY)

    # Circumcircle (centre O = midpoint of AB).
    d.ellipse(S(O[0] - r, O[1] - r, O[0] + r, O[1] + r),
              outline=(70, 120, 200), width=2 * SS)
    d.ellipse(S(O[0] - 3, O[1] - 3, O[0] + 3, O[1] + 3), fill=(70, 120, 200))
    text_at(d, (O[0] + 4, O[1] - 17), "O", f_side, fill=(70, 120, 200))

    # Triangle.
    d.polygon(S(*A, *B, *C), outline=BLACK, width=3 * SS)
    # Altitude CD, dashed.
    n_dash = 14
    for k in range(n_dash):
        if k % 2:
            continue
        p0 = (C[0] + (D[0] - C[0]) * k / n_dash, C[1] + (D[1] - C[1]) * k / n_dash)
        p1 = (C[0] + (D[0] - C[0]) * (k + 1) / n_dash,
              C[1] + (D[1] - C[1]) * (k + 1) / n_dash)
        d.line(S(*p0, *p1), fill=(200, 60, 60), width=2 * SS)

    # Right-angle marks at C and at D.
    m = 14
    d.line(S(C[0], C[1] - m, C[0] + m, C[1] - m), fill=BLACK, width=2 * SS)
    d.line(S(C[0] + m, C[1] - m, C[0] + m, C[1]), fill=BLACK, width=2 * SS)
    ab_len = math.hypot(abx, aby)
    ux, uy = abx / ab_len, aby / ab_len            # along AB (towards B)
    cdx, cdy = C[0] - D[0], C[1] - D[1]
    cd_len = math.hypot(cdx, cdy)
    vx, vy = cdx / cd_len, cdy / cd_len            # from D towards C
    m2 = 11
    p1 = (D[0] + ux * m2, D[1] + uy * m2)
    p2 = (p1[0] + vx * m2, p1[1] + vy * m2)
    p3 = (D[0] + vx * m2, D[1] + vy * m2)
    d.line(S(*p1, *p2), fill=(200, 60, 60), width=2 * SS)
    d.line(S(*p2, *p3), fill=(200, 60, 60), width=2 * SS)

    # Vertices.
    for P in (A, B, C, D):
        d.ellipse(S(P[0] - 3.5, P[1] - 3.5, P[0] + 3.5, P[1] + 3.5), fill=BLACK)
    text_at(d, (A[0] - 14, A[1] - 6), "A", f_vertex)
    text_at(d, (B[0] + 10, B[1] + 14), "B", f_vertex)
    text_at(d, (C[0] - 14, C[1] + 12), "C", f_vertex)
    text_at(d, (D[0] + 8, D[1] - 14), "D", f_vertex, fill=(200, 60, 60))

    # Side lengths.
    text_at(d, (A[0] - 18, (A[1] + C[1]) / 2), "6", f_side)
    text_at(d, ((B[0] + C[0]) / 2, C[1] + 16), "8", f_side)
    finish(img, path)


# --------------------------------------------------------------------------
# Figure 3: line plot
# --------------------------------------------------------------------------

LINE_DATA = [("Mon", 14), ("Tue", 17), ("Wed", 16), ("Thu", 21), ("Fri", 19),
             ("Sat", 23), ("Sun", 18)]


def draw_line_plot(path: Path) -> None:
    W, H = 448, 336
    img, d = canvas(W, H)
    f_title, f_tick = font(16), font(12)
    left, right, top, bottom = 52, 424, 46, 290
    y_min, y_max = 10, 25
    text_at(d, (W / 2, 20), "Daily high temperature (C)", f_title)

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * (v - y_min) / (y_max - y_min)

    for v in range(y_min, y_max + 1, 5):
        y = y_of(v)
        if v != y_min:
            d.line(S(left, y, right, y), fill=GRID, width=SS)
        d.line(S(left - 5, y, left, y), fill=BLACK, width=SS)
        text_at(d, (left - 9, y), str(v), f_tick, anchor="rm")

    n = len(LINE_DATA)
    step = (right - left) / n
    pts = [(left + step * (i + 0.5), y_of(v)) for i, (_, v) in enumerate(LINE_DATA)]
    for (label, _), (x, _) in zip(LINE_DATA, pts):
        d.line(S(x, bottom, x, bottom + 5), fill=BLACK, width=SS)
        text_at(d, (x, bottom + 14), label, f_tick)
    colour = (214, 96, 30)
    d.line([c for p in pts for c in S(*p)], fill=colour, width=3 * SS,
           joint="curve")
    values = [v for _, v in LINE_DATA]
    for i, ((x, y), v) in enumerate(zip(pts, values)):
        d.ellipse(S(x - 4.5, y - 4.5, x + 4.5, y + 4.5), fill=colour,
                  outline=BLACK, width=SS)
        # Label a dip below its point so the line does not cross the label.
        dip = 0 < i < n - 1 and v < values[i - 1] and v < values[i + 1]
        text_at(d, (x, y + 15 if dip else y - 14), str(v), f_tick, fill=GREY)

    d.line(S(left, top - 6, left, bottom), fill=BLACK, width=2 * SS)
    d.line(S(left, bottom, right, bottom), fill=BLACK, width=2 * SS)
    finish(img, path)


# --------------------------------------------------------------------------
# Rollout groups
# --------------------------------------------------------------------------

def groups() -> list[dict]:
    bar = {
        "id": "example-bar-chart",
        "image": {"path": "images/bar_chart.png"},
        "prompt": (
            "The chart shows how many books a reading club finished each month. "
            "Which month had the most books, and how many more books were read "
            "that month than in the month with the fewest? Answer with a number."
        ),
        "responses": [
            {"text": (
                "The chart has five bars, one for each month from Jan to May, and "
                "the y-axis counts books from 0 to 30 in steps of 5.\n\n"
                "The tallest bar is the yellow one for Mar. Its top lies a little "
                "above the 25 gridline, about two fifths of the way to 30, so Mar "
                "has 27 books.\n\n"
                "The shortest bar is the green one for Apr. It stops just below the "
                "10 gridline, so Apr has 9 books.\n\n"
                "The difference is 27 - 9 = 18.\n\n"
                "Therefore the answer is 18."),
             "reward": 1.0},
            {"text": (
                "Looking at the bars, the red bar for Feb and the purple bar for May "
                "are both tall, but the purple one reaches about 21 and the red one "
                "18.\n\n"
                "The month with the most books therefore seems to be May with 21, "
                "and the fewest is Jan with 12.\n\n"
                "21 - 12 = 9, so the answer is 9."),
             "reward": 0.0},
            {"text": (
                "Reading the axis, the gridlines are at 5, 10, 15, 20, 25 and 30. "
                "Jan is about 12, Feb about 18, Mar about 27, Apr about 9 and May "
                "about 21.\n\n"
                "The maximum is Mar (27) and the minimum is Apr (9).\n\n"
                "27 - 9 = 18. Therefore the answer is 18."),
             "reward": 1.0},
            # The single-paragraph response.
            {"text": (
                "The yellow Mar bar is the tallest at 27 books and the green Apr bar "
                "is the shortest at 9 books, so Mar had 27 - 9 = 18 more books; the "
                "answer is 18."),
             "reward": 1.0},
            {"text": (
                "The tallest bar is Mar. Its top is close to the 30 line, so I read "
                "it as 30 books.\n\n"
                "The shortest bar is Apr, which is just under 10; I will take it as "
                "10.\n\n"
                "30 - 10 = 20.\n\n"
                "Therefore the answer is 20."),
             "reward": 0.0},
        ],
    }

    tri = {
        "id": "example-triangle",
        "image": {"path": "images/triangle.png"},
        "prompt": (
            "In the figure, triangle ABC has a right angle at C, AC = 6 and BC = 8. "
            "CD is the altitude from C to AB, and O is the centre of the circle "
            "through A, B and C. Find the length of CD."
        ),
        "responses": [
            {"text": (
                "From the figure, the right angle is marked at C, with AC = 6 on the "
                "vertical leg and BC = 8 on the horizontal leg.\n\n"
                "By the Pythagorean theorem, AB = sqrt(6^2 + 8^2) = sqrt(100) = 10. "
                "This matches the circle: AB passes through the centre O, so it is a "
                "diameter, as it must be for a right angle at C.\n\n"
                "The area of triangle ABC is (1/2) * AC * BC = (1/2) * 6 * 8 = 24. "
                "It is also (1/2) * AB * CD, because CD is perpendicular to AB "
                "(the small square at D).\n\n"
                "So (1/2) * 10 * CD = 24, which gives CD = 4.8.\n\n"
                "Therefore the answer is 4.8."),
             "reward": 1.0},
            {"text": (
                "CD goes from the right angle C to the hypotenuse, and O is the "
                "midpoint of AB, so D looks like it is the same point as O.\n\n"
                "The radius of the circle is half of AB. AB = 10, so the radius is 5, "
                "and CD = CO = 5.\n\n"
                "Therefore the answer is 5."),
             "reward": 0.0},
            # Ends with a trailing blank line, as some decoders emit.
            {"text": (
                "The triangle is right-angled at C, so AB is the hypotenuse: "
                "AB^2 = 6^2 + 8^2 = 36 + 64 = 100 and AB = 10.\n\n"
                "The altitude to the hypotenuse satisfies CD = AC * BC / AB.\n\n"
                "CD = 6 * 8 / 10 = 48 / 10 = 4.8.\n\n"
                "Therefore the answer is 4.8.\n\n"),
             "reward": 1.0},
            {"text": (
                "In the picture, D lies on AB and the dashed red segment CD is "
                "perpendicular to it, splitting ABC into two smaller right "
                "triangles.\n\n"
                "Triangle ACD is similar to triangle ABC, so AD / AC = AC / AB. With "
                "AC = 6 and AB = 6 + 8 = 14, AD = 36 / 14 = 18/7.\n\n"
                "Then CD = sqrt(AC^2 - AD^2) = sqrt(36 - 324/49) = sqrt(1440/49), "
                "which is about 5.42.\n\n"
                "Therefore the answer is about 5.42."),
             "reward": 0.0},
        ],
    }

    line = {
        "id": "example-line-plot-equal-rewards",
        "image": {"path": "images/line_plot.png"},
        "prompt": (
            "The line plot shows the daily high temperature over one week. On which "
            "day was it warmest, and what was the temperature?"
        ),
        "responses": [
            {"text": (
                "The plot has one point per day from Mon to Sun, and each point is "
                "labelled with its value.\n\n"
                "The highest point is the sixth one, above Sat, labelled 23; the next "
                "highest is Thu at 21.\n\n"
                "Therefore the answer is Saturday, 23 degrees C."),
             "reward": 1.0},
            {"text": (
                "Reading the y-axis, the gridlines are at 15, 20 and 25. Only one "
                "point lies above the 20 gridline by more than a degree: Sat, at "
                "23.\n\n"
                "Therefore the warmest day was Saturday with 23 C."),
             "reward": 1.0},
            {"text": (
                "The orange line rises from 14 on Mon, dips on Wed and Fri, and peaks "
                "on Sat before falling to 18 on Sun.\n\n"
                "The peak value printed above the Sat point is 23.\n\n"
                "Therefore the answer is Saturday, 23."),
             "reward": 1.0},
            {"text": (
                "Values: Mon 14, Tue 17, Wed 16, Thu 21, Fri 19, Sat 23, Sun 18.\n\n"
                "The maximum is 23, on Sat.\n\n"
                "Therefore the answer is Saturday at 23 degrees."),
             "reward": 1.0},
        ],
    }
    return [bar, tri, line]


def main() -> None:
    draw_bar_chart(IMAGES / "bar_chart.png")
    draw_triangle(IMAGES / "triangle.png")
    draw_line_plot(IMAGES / "line_plot.png")

    out = EXAMPLES / "rollouts.jsonl"
    with open(out, "w", encoding="utf-8", newline="\n") as fh:
        for g in groups():
            fh.write(json.dumps(g, ensure_ascii=False) + "\n")
    for p in sorted(IMAGES.glob("*.png")) + [out]:
        print(f"wrote {p.relative_to(ROOT)} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
