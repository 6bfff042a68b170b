"""`kawhi ... --help` reads as help: no source-file names, no "(default: None)"."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from kawhi.cli import build_parser

NOISE = re.compile(r"\(default: None\)|default None\b|\(\w+/[\w/]+\.py\)|\w+_client/\w+\.py")


def all_parsers(parser: argparse.ArgumentParser, name: str = "kawhi") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def test_no_help_text_names_a_source_file_or_a_none_default() -> None:
    parsers = dict(all_parsers(build_parser()))
    assert {"kawhi reweight", "kawhi serve", "kawhi heads discover", "kawhi info"} <= set(parsers)
    noisy = {name: sorted(set(NOISE.findall(" ".join(p.format_help().split())))) for name, p in parsers.items()}
    assert not {k: v for k, v in noisy.items() if v}, noisy


def test_a_meaningful_default_is_still_shown() -> None:
    parsers = dict(all_parsers(build_parser()))
    assert "(default: 12)" in " ".join(parsers["kawhi heads discover"].format_help().split())  # --top-k
    assert "default 8000" in parsers["kawhi serve"].format_help()  # --port
