"""The explain view of one reweighted group: PNG pages and a self-contained HTML file.

    from kawhi_client.explain import explain
    view = explain(group, result, image_bytes, patch_side=info["patch_side"])
    view.save("out/")            # out/<id>.png (+ <id>.page2.png ...) and out/<id>.html

``group`` is the wire RolloutGroup (for the texts and rewards), ``result`` its
GroupResult from /v1/reweight, ``image`` its image (bytes, path or PIL image). The
per-visual-token heat map needs the alignment only the engine's explain computes
(``kawhi explain``, ``Engine.explain``, ``POST /v1/explain``). Drawing needs the
``[explain]`` extra (Pillow; matplotlib for the DejaVu fonts and the colour map);
importing this package does not.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kawhi_client.explain.view import (
    DEFAULT_PATCH_SIDE,
    ExplainedResult,
    GroupView,
    ImageLike,
    build_view,
)
from kawhi_client.schema import GroupResult, RolloutGroup

__all__ = ["DEFAULT_PATCH_SIDE", "ExplainedResult", "Explanation", "GroupView", "build_view", "explain",
           "file_stem", "png_bytes"]


@dataclass
class Explanation:
    """One group's explain view; renders lazily."""

    view: GroupView
    max_page_height: int | None = None

    def render(self) -> Any:
        """kawhi_client.explain.png.Rendered: the pages and where tokens and segments were drawn."""
        from kawhi_client.explain.png import DEFAULT_MAX_PAGE_HEIGHT, render_pages

        return render_pages(self.view, max_page_height=self.max_page_height or DEFAULT_MAX_PAGE_HEIGHT)

    def pages(self) -> list[Any]:
        """The PNG pages as PIL images (one unless the responses outgrow a page)."""
        return self.render().pages

    def png(self, page: int = 0) -> bytes:
        """Page ``page`` (0-based) as PNG bytes."""
        pages = self.pages()
        if not 0 <= page < len(pages):
            raise ValueError(f"page {page} does not exist: the view has {len(pages)} page(s)")
        return png_bytes(pages[page])

    def html(self) -> str:
        """One self-contained HTML document (images embedded, no network)."""
        from kawhi_client.explain.html import render_html

        return render_html(self.view)

    def save(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """Write ``<stem>.png`` (later pages ``<stem>.page2.png``...) and ``<stem>.html``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or file_stem(self.view.id, 0)
        written = []
        for number, page in enumerate(self.pages(), start=1):
            path = folder / (f"{stem}.png" if number == 1 else f"{stem}.page{number}.png")
            path.write_bytes(png_bytes(page))
            written.append(path)
        html_path = folder / f"{stem}.html"
        html_path.write_text(self.html(), encoding="utf-8")
        written.append(html_path)
        return written


def explain(
    group: RolloutGroup | Mapping[str, Any],
    result: GroupResult | Mapping[str, Any],
    image: ImageLike,
    *,
    patch_side: int = DEFAULT_PATCH_SIDE,
    heatmap_response: int | None = None,
    visual_alignment: Sequence[Sequence[float]] | None = None,
    model: str | None = None,
    is_demo: bool = False,
    max_page_height: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Explanation:
    """The explain view of ``group`` from its ``result`` and ``image`` (see build_view)."""
    view = build_view(group, result, image, patch_side=patch_side, heatmap_response=heatmap_response,
                      visual_alignment=visual_alignment, model=model, is_demo=is_demo, settings=settings)
    return Explanation(view, max_page_height)


def file_stem(group_id: str | None, index: int) -> str:
    """A safe file name for a group: its id with odd characters replaced, else ``group-<index>``."""
    if not group_id:
        return f"group-{index}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", group_id).strip("._")[:100]
    return stem or f"group-{index}"


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
