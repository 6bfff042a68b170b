"""Where a model comes from: a local folder, or a hub id already in the local Hugging Face cache.

Nothing is downloaded (as TEI and vLLM resolve ids offline): an id whose files are not
cached is a :class:`ModelNotFound` naming the fix. ``check_device`` refuses a device
that is not there before any weights are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(ValueError):
    """The model argument names nothing loadable; the message says what to do."""


class DeviceUnavailable(ValueError):
    """The requested torch device does not exist on this machine."""


def locate_model(model: str | Path) -> Path:
    """A folder holding config.json for ``model`` (a folder, or a cached hub id)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{model} is not a model folder (no config.json); pass a Hugging Face "
                                "checkpoint folder such as Qwen2.5-VL-7B-Instruct")
        return path
    if path.exists():
        raise ModelNotFound(f"{model} is a file, not a model folder; pass the folder holding config.json")
    text = str(model)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(text, local_files_only=True))
        except Exception:  # not cached (or no huggingface_hub): never download
            raise ModelNotFound(f"{text} is not in the local Hugging Face cache and nothing is downloaded; "
                                f"run `hf download {text}` (or pass a local folder)") from None
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"the cached snapshot of {text} has no config.json; download it again")
        return folder
    raise ModelNotFound(f"{model}: no such folder; pass a local model folder or a cached hub id (org/name)")


def check_device(device: str) -> None:
    """DeviceUnavailable when ``device`` (cpu, cuda, cuda:1, mps) is not usable here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceUnavailable(f"{device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceUnavailable(f"--device {device}: unsupported device type; use cpu or cuda")


MODEL_CARD_FILE = "KAWHI_MODEL_CARD.json"
DEMO_MARKER_FILE = "KAWHI_DEMO.json"


def embedded_label(folder: Path) -> tuple[str | None, bool, dict[str, Any] | None]:
    """(name, is_demo, model card) a model folder declares: its KAWHI_MODEL_CARD.json (a trained
    embedded model) or its KAWHI_DEMO.json (random weights); (None, False, None) for neither."""
    for file, demo in ((MODEL_CARD_FILE, False), (DEMO_MARKER_FILE, True)):
        path = folder / file
        if path.is_file():
            try:
                card = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(card, dict):
                return card.get("name"), bool(card.get("demo", demo)), None if demo else card
    return None, False, None
