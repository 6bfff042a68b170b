"""The `kawhi` command: `kawhi reweight` (batch JSONL) and `kawhi serve` (HTTP)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

from kawhi import __version__


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per MethodConfig field (--temperature, --regions, ...), default None = keep."""
    from kawhi.engine.config import MethodConfig

    group = parser.add_argument_group("method options (defaults: see kawhi.engine.config.MethodConfig)")
    for f in dataclasses.fields(MethodConfig):
        if f.name == "sguf":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "heads":
            group.add_argument(flag, default=None, help="'preset', 'all' or comma-separated head indices "
                               f"(default: {default})")
        elif isinstance(default, bool):  # an output switch (--return-ref-logprobs): off unless given
            group.add_argument(flag, action="store_true", default=None, help=f"(default: {default})")
        elif isinstance(default, str):
            group.add_argument(flag, default=None, choices=_literal_choices(f.name),
                               help=f"(default: {default})")
        else:
            group.add_argument(flag, type=type(default), default=None, help=f"(default: {default})")


def _literal_choices(name: str) -> list[str] | None:
    """The allowed values of a string option, from the wire schema (one definition)."""
    from kawhi_client.schema import Options

    annotation = Options.model_fields[name].annotation
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags the user set, as an options mapping."""
    from kawhi.engine.config import MethodConfig

    options = {}
    for f in dataclasses.fields(MethodConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "heads" and value not in ("preset", "all"):
            value = [int(h) for h in str(value).split(",") if h.strip()]
        options[f.name] = value
    return options


def _read_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cmd_reweight(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from kawhi.engine.engine import Engine, GroupError, OptionsError, load_image_bytes
    from kawhi.engine.errors import group_error_from_validation
    from kawhi.engine.images import decode_image, sha256_hex
    from kawhi_client.schema import RolloutGroup

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    if engine.is_demo:
        print("kawhi: using the embedded DEMO model (random weights): results are for plumbing, "
              "not for training. Pass --model PATH for real use.", file=sys.stderr)
    try:
        config = engine.resolve_options(method_options_from_args(args))
    except OptionsError as exc:
        print(f"kawhi: invalid option --{exc.field.replace('_', '-')}: {exc.detail}", file=sys.stderr)
        return 2
    base_dir = args.input.resolve().parent
    lines = list(_read_jsonl(args.input))
    records: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()
    ok = 0
    with tqdm(total=len(lines), unit="group", disable=args.quiet, file=sys.stderr) as progress:
        for chunk in _chunks(lines, args.batch_groups):
            prepared = []
            for number, line in chunk:
                group_id = None
                try:
                    raw = json.loads(line)
                    group_id = raw.get("id") if isinstance(raw, dict) else None
                    group = RolloutGroup.model_validate(raw)
                    data = load_image_bytes(group.image, base_dir)
                    image = decode_image(data, engine.limits.image)
                    prepared.append(engine.prepare(group, config, image, image_sha256=sha256_hex(data), index=number))
                except GroupError as exc:
                    records[number] = _error_record(number, group_id, exc)
                except ValidationError as exc:
                    records[number] = _error_record(number, group_id, group_error_from_validation(exc))
                except json.JSONDecodeError as exc:
                    records[number] = _error_record(number, group_id, GroupError("", f"not JSON: {exc}",
                                                                                 title="Invalid line"))
            for group, result in zip(prepared, engine.run(prepared)):
                records[group.index] = result.model_dump(exclude_none=True)
            progress.update(len(chunk))
    elapsed = time.perf_counter() - started
    with args.output.open("w", encoding="utf-8") as out:
        for number, _ in lines:
            record = records[number]
            if "error" not in record:
                ok += 1
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    failed = len(lines) - ok
    print(f"kawhi: {ok} group(s) reweighted, {failed} failed, {elapsed:.2f} s "
          f"({elapsed / max(len(lines), 1) * 1000:.0f} ms/group) -> {args.output}", file=sys.stderr)
    return 0 if ok > 0 else 1


def _error_record(number: int, group_id: Any, error: Any) -> dict[str, Any]:
    """The output line for input line ``number`` that could not be processed."""
    return {"id": group_id, "line": number, "error": error.to_problem()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kawhi", description="KAWHI reward shaping for RL of VLMs.")
    parser.add_argument("--version", action="version", version=f"kawhi {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    rw = sub.add_parser("reweight", help="reweight rollout groups from a JSONL file (one API.md group per line)")
    rw.add_argument("input", type=Path, help="input JSONL; image paths are relative to its folder")
    rw.add_argument("-o", "--output", type=Path, required=True, help="output JSONL, one result per input line")
    rw.add_argument("--model", default=None, help="local model folder (default: the embedded demo model)")
    rw.add_argument("--device", default="cpu")
    rw.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    rw.add_argument("--batch-groups", type=int, default=8, help="groups prepared and run together")
    rw.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_method_options(rw)
    rw.set_defaults(func=cmd_reweight)

    try:
        from kawhi.server.main import add_serve_parser
    except ImportError as exc:  # the server extra is not installed
        serve = sub.add_parser("serve", help="run the HTTP service (needs: pip install 'kawhi[server]')")
        serve.set_defaults(func=lambda _args, _exc=exc: _missing_server(_exc))
    else:
        add_serve_parser(sub)
    return parser


def _missing_server(exc: ImportError) -> int:
    print(f"kawhi serve needs the server extra: pip install 'kawhi[server]' ({exc})", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
