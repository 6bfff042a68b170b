"""Colours and fonts shared by the PNG and HTML views (one definition)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

RGB = tuple[int, int, int]

KEY_RGB: RGB = (230, 85, 13)  # orange: key-region tokens
SAMPLED_RGB: RGB = (33, 113, 181)  # blue: sampled background tokens
OVERLAY_OPACITY = 0.55  # share of the token colour over the image pixel
GRID_RGBA = (40, 40, 40, 70)
HEAT_OPACITY = 0.7  # share of the heat colour over the grey image

TEXT_RGB: RGB = (25, 25, 25)
MUTED_RGB: RGB = (95, 95, 95)
POSITIVE_RGB: RGB = (0, 120, 60)
NEGATIVE_RGB: RGB = (190, 30, 30)
DEMO_RGB: RGB = (190, 30, 30)
# a group whose advantages are all 0: its weights scale nothing, so they are not drawn in colour
ZERO_ADVANTAGE_SWATCH: RGB = (200, 200, 200)
ZERO_ADVANTAGE_TINT: RGB = (246, 246, 246)

# Weight shading: pale yellow (weight 0) -> green -> deep green (the scale's top). Every
# channel falls monotonically, so a larger weight is always a darker swatch.
_WEIGHT_STOPS: tuple[RGB, ...] = ((255, 244, 179), (173, 221, 142), (65, 171, 93), (0, 90, 50))
TINT_STRENGTH = 0.5  # text backgrounds: the weight colour this far from white, so text stays legible


def blend(base: RGB, colour: RGB, opacity: float) -> RGB:
    return tuple(round(b * (1 - opacity) + c * opacity) for b, c in zip(base, colour))  # type: ignore[return-value]


def token_rgb(base: RGB, token_class: str) -> RGB:
    """The overlay colour of an image pixel under a token of ``token_class``."""
    if token_class == "key":
        return blend(base, KEY_RGB, OVERLAY_OPACITY)
    if token_class == "sampled":
        return blend(base, SAMPLED_RGB, OVERLAY_OPACITY)
    return base


def _ramp(stops: tuple[RGB, ...], t: float) -> RGB:
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    return blend(stops[i], stops[i + 1], t - i)


def weight_rgb(weight: float, top: float) -> RGB:
    """The swatch colour of a segment with ``weight`` on a scale 0..``top``."""
    return _ramp(_WEIGHT_STOPS, weight / top if top > 0 else 0.0)


def weight_tint(weight: float, top: float) -> RGB:
    return blend((255, 255, 255), weight_rgb(weight, top), TINT_STRENGTH)


def heat_rgb(t: float) -> RGB:
    """viridis at t in [0, 1], in 256 steps (matplotlib's map when installed, else a close ramp)."""
    return _heat_table()[round(min(max(t, 0.0), 1.0) * 255)]


@lru_cache(maxsize=1)
def _heat_table() -> tuple[RGB, ...]:
    try:
        from matplotlib import colormaps
    except ImportError:
        stops = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
        return tuple(_ramp(stops, i / 255) for i in range(256))
    return tuple(tuple(round(v * 255) for v in colormaps["viridis"](i / 255)[:3]) for i in range(256))  # type: ignore


def css(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _font_dir() -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; Pillow's own font without it."""
    from PIL import ImageFont

    folder = _font_dir()
    if folder is not None:
        path = folder / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)
