"""Which install extra brings which module, and the one line that names a missing one.

`pip install kawhi-rl` is the light client; the engine commands need `kawhi-rl[engine]`
(torch, transformers ...) and `kawhi serve` needs `kawhi-rl[server]`. A command run in an
install that lacks its extra ends in one line naming the extra to install, never in a
ModuleNotFoundError traceback (the entry point, ``kawhi.cli:entry``, prints it).
"""

from __future__ import annotations

# top-level module -> the extra that installs it (pyproject.toml, [project.optional-dependencies])
EXTRA_OF_MODULE = {
    "torch": "engine",
    "transformers": "engine",
    "numpy": "engine",
    "scipy": "engine",
    "PIL": "engine",
    "safetensors": "engine",
    "tokenizers": "engine",
    "tqdm": "engine",
    "fastapi": "server",
    "uvicorn": "server",
    "starlette": "server",
    "pydantic_settings": "server",
    "redis": "server",
    "prometheus_client": "server",
    "multipart": "server",
    "grpc": "grpc",
    "grpc_status": "grpc",
    "grpc_health": "grpc",
    "grpc_reflection": "server",
    "matplotlib": "explain",
    "ray": "ray",
}

TORCH_HINT = ("without torch yet, install it first: the CPU wheel from PyTorch's CPU index "
              "(pip install torch --index-url https://download.pytorch.org/whl/cpu) or your CUDA build")


def missing_extra(exc: ImportError) -> str | None:
    """The extra whose absence caused ``exc``, or None when it is not one of ours."""
    name = getattr(exc, "name", None) or ""
    return EXTRA_OF_MODULE.get(name.split(".")[0])


def missing_extra_message(exc: ImportError, command: str = "this command") -> str | None:
    """One line for the user: what is missing and which extra brings it (None: not an extra)."""
    extra = missing_extra(exc)
    if extra is None:
        return None
    module = (exc.name or "").split(".")[0]
    line = f"{command} needs the '{extra}' extra ({module} is not installed): pip install 'kawhi-rl[{extra}]'"
    if extra in ("engine", "server"):  # both bring torch: an unguided pip would pull the CUDA build
        line += f"; {TORCH_HINT}"
    return line
