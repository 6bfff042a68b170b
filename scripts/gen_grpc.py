"""Generate the Python stubs of proto/kawhi/v1/kawhi.proto into client/kawhi_client/grpc/_proto/.

    python3 scripts/gen_grpc.py            # rewrite the committed stubs
    python3 scripts/gen_grpc.py --check    # exit 1 if they differ from a fresh generation

Needs grpcio-tools (the [dev] extra). protoc writes ``kawhi/v1/kawhi_pb2.py`` and a
``kawhi_pb2_grpc.py`` that imports it as ``from kawhi.v1 import kawhi_pb2``, which would
resolve to the service package ``kawhi``; the stubs are moved into the client package
and that one import is made absolute to where they live. tests/grpc/test_grpc_serve.py
regenerates them and compares them without their version stamps (``version_free``): the
generator's own version (unpinned grpcio-tools, the resolver's version of the day) is
not what the stubs mean. The stamps the committed stubs carry are the oldest grpcio and
protobuf runtimes they accept; the test checks pyproject.toml declares those floors.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO = "kawhi/v1/kawhi.proto"
OUT = ROOT / "client" / "kawhi_client" / "grpc" / "_proto"
PACKAGE = "kawhi_client.grpc._proto"
FILES = ("kawhi_pb2.py", "kawhi_pb2.pyi", "kawhi_pb2_grpc.py")


# The lines protoc and its gRPC plugin stamp with their own version (and the runtime floor it implies).
_STAMPS = (
    re.compile(r"^(GRPC_GENERATED_VERSION = )'([^']*)'$", re.M),
    re.compile(r"^(# Protobuf Python Version: )(\S+)$", re.M),
    re.compile(r"^(\s+_runtime_version\.Domain\.PUBLIC,\n)(\s+\d+,\n\s+\d+,\n\s+\d+,\n)", re.M),
)


def version_free(text: str) -> str:
    """A stub's text with the generator's version stamps replaced by a placeholder."""
    for stamp in _STAMPS:
        text = stamp.sub(lambda m: m.group(1) + "<version>", text)
    return text


def stamped_versions(texts: dict[str, str]) -> dict[str, str]:
    """The runtime floors stamped in the stubs: {"grpcio": "1.85.1", "protobuf": "7.35.1"}."""
    grpc_version = _STAMPS[0].search(texts["kawhi_pb2_grpc.py"]).group(2)
    numbers = re.findall(r"\d+", _STAMPS[2].search(texts["kawhi_pb2.py"]).group(2))
    return {"grpcio": grpc_version, "protobuf": ".".join(numbers)}


def generate() -> dict[str, str]:
    """File name -> content of the stubs a fresh protoc run gives."""
    import grpc_tools
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{includes}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + PROTO)
        out = {name: (Path(tmp) / "kawhi" / "v1" / name).read_text() for name in FILES}
    out["kawhi_pb2_grpc.py"] = out["kawhi_pb2_grpc.py"].replace(
        "from kawhi.v1 import kawhi_pb2 as", f"from {PACKAGE} import kawhi_pb2 as"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    fresh = generate()
    if args.check:
        stale = [n for n, text in fresh.items()
                 if not (OUT / n).exists() or version_free((OUT / n).read_text()) != version_free(text)]
        if stale:
            print("out of date: " + ", ".join(stale) + " (run python3 scripts/gen_grpc.py)", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "__init__.py").write_text('"""Generated from proto/kawhi/v1/kawhi.proto by scripts/gen_grpc.py; do not edit."""\n')
    for name, text in fresh.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
