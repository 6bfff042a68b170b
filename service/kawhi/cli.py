"""The `kawhi` command: `kawhi reweight` (batch JSONL), `kawhi explain` (pictures), `kawhi heads`,
`kawhi info`, `kawhi serve` (HTTP) and `kawhi ray serve` (on a Ray cluster, kawhi.ray).

`kawhi reweight` runs the same request pipeline as the server (kawhi.pipeline): one
output line per input line, a bad line becomes an error record with the same type and
pointer the server would give. A user's mistake (missing file, not a model folder, a
hub id not in the local cache, no such device, a bad flag) is one line on stderr that
names the fix, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from kawhi_client.options import OPTIONS, SGUF_OPTIONS, OptionSpec

from kawhi import __version__
from kawhi.errors import UserError
from kawhi.extras import missing_extra_message

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not usage + error
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- options, from their one definition


def _flag(spec: OptionSpec, prefix: str = "") -> str:
    return "--" + (prefix + spec.name).replace("_", "-")


def _add_option(group: Any, spec: OptionSpec, dest: str, prefix: str = "") -> None:
    help_text = f"{spec.help} (default: {spec.default}"
    if spec.kind in ("float", "int"):
        help_text += f"; range {spec.range_text()}"
    help_text += ")"
    if spec.kind == "float":
        group.add_argument(_flag(spec, prefix), dest=dest, type=float, default=None, help=help_text)
    elif spec.kind == "int":
        group.add_argument(_flag(spec, prefix), dest=dest, type=int, default=None, help=help_text)
    elif spec.kind == "bool":  # an output switch (--return-ref-logprobs): off unless given
        group.add_argument(_flag(spec, prefix), dest=dest, action="store_true", default=None, help=help_text)
    elif spec.kind == "heads":
        group.add_argument(_flag(spec, prefix), dest=dest, default=None,
                           help="'preset', 'all' or comma-separated head indices (default: preset)")
    elif spec.registry:  # registered names are checked by the pipeline, so plug-ins are reachable
        group.add_argument(_flag(spec, prefix), dest=dest, default=None,
                           help=f"{help_text}; built in: {', '.join(spec.choices)}")
    else:
        group.add_argument(_flag(spec, prefix), dest=dest, default=None, choices=spec.choices, help=help_text)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option (--temperature, --regions, --sguf-beta ...), default None = keep."""
    group = parser.add_argument_group("method options (the same as a request's options, docs/api.md)")
    for spec in OPTIONS:
        _add_option(group, spec, spec.name)
    for spec in SGUF_OPTIONS:
        _add_option(group, spec, "sguf_" + spec.name, prefix="sguf_")


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags the user set, as a wire options mapping."""
    options: dict[str, Any] = {}
    for spec in OPTIONS:
        value = getattr(args, spec.name, None)
        if value is None:
            continue
        if spec.kind == "heads" and value not in ("preset", "all"):
            try:
                value = [int(h) for h in str(value).split(",") if h.strip()]
            except ValueError:
                raise UserError("--heads must be 'preset', 'all' or comma-separated integers") from None
        options[spec.name] = value
    sguf = {s.name: getattr(args, "sguf_" + s.name) for s in SGUF_OPTIONS
            if getattr(args, "sguf_" + s.name, None) is not None}
    if sguf:
        options["sguf"] = sguf
    return options


def _option_flag(pointer: str) -> str:
    """/options/sguf/beta -> --sguf-beta."""
    parts = [p for p in pointer.split("/")[2:] if p]
    return "--" + "-".join(parts).replace("_", "-") if parts else "an option"


# ---------------------------------------------------------------------- engine


def load_engine(args: argparse.Namespace) -> Any:
    """The engine of --model/--device/--dtype/--heads-file; UserError for every mistake a user can make."""
    # a client-only install fails here with ModuleNotFoundError: main() names the extra
    from kawhi.engine.engine import Engine
    from kawhi.heads.files import HeadsFileError
    from kawhi.models.locate import DeviceUnavailable, ModelNotFound

    try:
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype,
                             heads_file=getattr(args, "heads_file", None))
    except (ModelNotFound, DeviceUnavailable, HeadsFileError) as exc:
        raise UserError(str(exc)) from None
    except (OSError, ValueError) as exc:  # a folder that looks like a model but does not load
        raise UserError(f"cannot load the model {args.model}: {str(exc).splitlines()[0][:200]}") from None
    return engine  # the demo model is announced once, by Engine.load's warning


# ---------------------------------------------------------------------- reweight


def _read_lines(source: str) -> tuple[list[tuple[int, str]], Path]:
    """(line number, text) of the non-blank input lines, and the folder image paths are relative to."""
    if source == "-":
        return [(n, line) for n, line in enumerate(sys.stdin, start=1) if line.strip()], Path.cwd()
    path = Path(source)
    try:
        with path.open(encoding="utf-8") as handle:
            return [(n, line) for n, line in enumerate(handle, start=1) if line.strip()], path.resolve().parent
    except FileNotFoundError:
        raise UserError(f"input file {source} does not exist (use - to read standard input)") from None
    except IsADirectoryError:
        raise UserError(f"input {source} is a folder; pass a JSONL file (one rollout group per line)") from None
    except UnicodeDecodeError:
        raise UserError(f"input file {source} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror}") from None


JSONL_HINT = ("kawhi reweight reads one rollout group per line (JSONL); "
              "convert a request body with: jq -c '.groups[]' BODY.json > groups.jsonl")


def check_jsonl_shape(lines: Sequence[tuple[int, str]]) -> None:
    """UserError (before any model loads) when the input is not JSONL of groups but an HTTP
    request body (``{"groups": [...]}``) or one JSON document spread over several lines."""
    if not lines:
        return
    try:
        first = json.loads(lines[0][1])
    except ValueError:
        first = None
    if isinstance(first, dict) and isinstance(first.get("groups"), list):
        raise UserError(f"line {lines[0][0]} is a /v1/reweight request body ({{\"groups\": [...]}}), not a group; "
                        + JSONL_HINT)
    if first is None and len(lines) > 1:
        try:
            whole = json.loads("".join(text for _, text in lines))
        except ValueError:
            return  # JSONL with a bad first line: that line becomes an error record
        what = "a request body" if isinstance(whole, dict) and "groups" in whole else "one JSON document"
        raise UserError(f"the input is {what} over {len(lines)} lines, not one group per line; " + JSONL_HINT)


@contextlib.contextmanager
def _output(target: str) -> Iterator[TextIO]:
    if target == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    try:
        handle = open(target, "w", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}") from None
    with handle:
        yield handle


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def reweight_lines(pipeline: Any, lines: Sequence[tuple[int, str]], options: dict[str, Any], base_dir: Path,
                   batch_groups: int, progress: Any = None) -> dict[int, dict[str, Any]]:
    """One record per input line: a GroupResult, or ``{"id", "line", "error"}``."""
    from kawhi.errors import KawhiError
    from kawhi.pipeline.parse import loads_checked

    records: dict[int, dict[str, Any]] = {}
    for chunk in _chunks(lines, batch_groups):
        numbers, docs = [], []
        for number, line in chunk:
            try:
                docs.append(loads_checked(line))
                numbers.append(number)
            except KawhiError as exc:
                records[number] = {"id": None, "line": number, "error": exc.to_problem()}
        parsed = pipeline.parse_groups(docs, options)
        try:
            results = pipeline.reweight(parsed, allow_paths=True, base_dir=base_dir).results
        except KawhiError as exc:  # a chunk-level limit (tokens of all its groups): every line of it fails
            results = [None] * len(numbers)
            for number in numbers:
                records[number] = {"id": None, "line": number, "error": exc.to_problem()}
            numbers = []
        for number, result in zip(numbers, results):
            record = result.model_dump(exclude_none=True)
            if result.error is not None:
                record = {"id": result.id, "line": number, "error": record["error"]}
            records[number] = record
        if progress is not None:
            progress.update(len(chunk))
    return records


def checked_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags as options, checked by the wire schema before any model loads."""
    from kawhi.errors import KawhiError
    from kawhi.pipeline.parse import parse_options

    options = method_options_from_args(args)
    try:
        parse_options(options)
    except KawhiError as exc:
        raise UserError(f"invalid option {_option_flag(exc.pointer)}: {exc.detail}") from None
    return options


def resolved_options(resolver: Any, options: dict[str, Any]) -> Any:
    """``resolver.resolve_options(options)`` (a Pipeline or an Engine: checks against the model)."""
    from kawhi.errors import KawhiError

    try:
        return resolver.resolve_options(options)
    except KawhiError as exc:
        raise UserError(f"invalid option {_option_flag(exc.pointer)}: {exc.detail}") from None


def cmd_reweight(args: argparse.Namespace) -> int:
    options = checked_options(args)
    lines, base_dir = _read_lines(args.input)  # before the model loads: a wrong path fails at once
    check_jsonl_shape(lines)  # a request body piped in is one line of advice, not one error record
    with _output(args.output) as out:  # likewise an output that cannot be written
        engine = load_engine(args)
        from kawhi.pipeline import Pipeline

        pipeline = Pipeline(engine)
        config = resolved_options(pipeline, options)
        provenance = {"model": engine.model_name, "version": __version__, "options": config.to_dict()}
        started = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:  # progress is optional
            tqdm = None
        with contextlib.ExitStack() as stack:
            bar = None if args.quiet or tqdm is None else stack.enter_context(
                tqdm(total=len(lines), unit="group", file=sys.stderr))
            records = reweight_lines(pipeline, lines, options, base_dir, args.batch_groups, bar)
        elapsed = time.perf_counter() - started
        ok = 0
        for number, _ in lines:
            record = records[number]
            ok += "error" not in record
            record["kawhi"] = provenance  # which model, version and options produced this line
            out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"kawhi: {ok} group(s) reweighted, {len(lines) - ok} failed, {elapsed:.2f} s "
          f"({elapsed / max(len(lines), 1) * 1000:.0f} ms/group) -> {args.output}", file=sys.stderr)
    return 0 if ok > 0 else 1


def cmd_info(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    print(json.dumps(engine.info(), indent=2, default=str))
    return 0


# ---------------------------------------------------------------------- parser


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local model folder or a hub id in the local Hugging Face cache (default: the embedded kawhi-tiny model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--heads-file", default=os.environ.get("KAWHI_HEADS_FILE") or None,
                        help="vision-critical heads file for --heads preset (default: $KAWHI_HEADS_FILE)")


def add_explain_parser(sub: Any) -> None:
    """Register `kawhi explain IN.jsonl -o DIR/` (one PNG, more pages if needed, and one HTML
    per group) with the same input and options as `kawhi reweight`."""
    ex = sub.add_parser("explain", help="draw what KAWHI saw for each group of a JSONL file (PNG + HTML)",
                        description="Reweight each group (same input and options as 'kawhi reweight') and write "
                                    "DIR/<id>.png and DIR/<id>.html: the image as the model saw it with its key and "
                                    "sampled visual tokens, and each response's paragraphs shaded by weight.")
    ex.add_argument("input", help="input JSONL, or - for standard input; image paths are relative to its folder")
    ex.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    ex.add_argument("--heatmap", type=int, default=None, metavar="RESPONSE",
                    help="also draw each visual token's alignment with response RESPONSE (0-based)")
    ex.add_argument("--page-height", type=int, default=None, metavar="PX",
                    help="start a new PNG page past this height (default: 1600)")
    _add_model_flags(ex)
    ex.add_argument("--batch-groups", type=int, default=8, help="groups prepared and run together")
    add_method_options(ex)
    ex.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from kawhi_client.explain import Explanation, file_stem

    from kawhi.engine.engine import load_image_bytes
    from kawhi.pipeline.local import LocalService

    options = checked_options(args)
    lines, base_dir = _read_lines(args.input)
    engine = load_engine(args)
    resolved_options(engine, options)
    local = LocalService(engine)
    load_image = functools.partial(load_image_bytes, base_dir=base_dir)
    used: set[str] = set()
    written: list[Path] = []
    failed = 0
    for chunk in _chunks(lines, args.batch_groups):
        groups, numbers = [], []
        for number, line in chunk:
            try:
                groups.append(json.loads(line))
                numbers.append(number)
            except json.JSONDecodeError as exc:
                print(f"kawhi: line {number}: not JSON: {exc}", file=sys.stderr)
                failed += 1
        outcomes = local.explain(groups, options, load_image=load_image, base_dir=base_dir,
                                 heatmap_response=args.heatmap, max_page_height=args.page_height) if groups else []
        for number, outcome in zip(numbers, outcomes):
            if not isinstance(outcome, Explanation):
                error = outcome.error
                where = f" at {error.pointer}" if error.pointer else ""
                print(f"kawhi: line {number} ({outcome.id or 'no id'}): {error.title}{where}: {error.detail}",
                      file=sys.stderr)
                failed += 1
                continue
            stem = file_stem(outcome.view.id, number)
            if stem in used:
                stem = f"{stem}-line{number}"
            used.add(stem)
            written += outcome.save(args.output, stem)
    ok = len(lines) - failed
    pictures = ", ".join(str(p) for p in written if p.suffix == ".png")
    print(f"kawhi: {ok} group(s) explained, {failed} failed -> {args.output}/" + (f" (look at {pictures})"
          if pictures else ""), file=sys.stderr)
    return 0 if ok > 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kawhi", description="KAWHI reward shaping for RL of VLMs.")
    parser.add_argument("--version", action="version", version=f"kawhi {__version__}")
    parser.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS,
                        help="logging level (default: warning)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rw = sub.add_parser("reweight", help="reweight rollout groups from JSONL (one rollout group per line)")
    rw.add_argument("input", help="input JSONL, or - for standard input; image paths are relative to its folder")
    rw.add_argument("-o", "--output", required=True, help="output JSONL (one result per input line), or - for stdout")
    _add_model_flags(rw)
    rw.add_argument("--batch-groups", type=int, default=8, help="groups prepared and run together")
    rw.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_method_options(rw)
    rw.set_defaults(func=cmd_reweight)

    info = sub.add_parser("info", help="print the model, heads, defaults and limits as JSON")
    _add_model_flags(info)
    info.set_defaults(func=cmd_info)

    from kawhi.discovery.cli import add_heads_parser

    add_explain_parser(sub)
    add_heads_parser(sub)

    try:
        import kawhi.server  # noqa: F401  (a client-only install stops here: no [server] extra)
        from kawhi.serve import add_serve_parser
    except ImportError as exc:  # the server extra is not installed
        serve = sub.add_parser("serve", help="run the HTTP service (needs: pip install 'kawhi-rl[server]')")
        serve.set_defaults(func=lambda _args, _exc=exc: _missing_server(_exc))
    else:
        add_serve_parser(sub)
        from kawhi.ray.cli import add_ray_parser

        add_ray_parser(sub)
    return parser


def _missing_server(exc: ImportError) -> int:
    print(f"kawhi serve needs the server extra: pip install 'kawhi-rl[server]' (missing: {exc.name})", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"kawhi {args.command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a client-only install (pip install kawhi-rl) running an engine command
        message = missing_extra_message(exc, f"kawhi {args.command}")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kawhi: interrupted", file=sys.stderr)
        return 130


def _command(argv: Sequence[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    return f"kawhi {words[0]}" if words else "kawhi"


def entry(argv: Sequence[str] | None = None) -> int:
    """The `kawhi` console script: :func:`main`, with a missing extra reported in one line (exit 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(args)
    except ModuleNotFoundError as exc:  # not ImportError: a broken install of a present module is not "missing"
        message = missing_extra_message(exc, _command(args))
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
