"""Help texts of the `kawhi` commands: a default is shown only where it says something."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", left off where X is None or False (an unset flag, an off
    switch: "(default: None)" is noise) or where the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text:
            return help_text
        return super()._get_help_string(action) or help_text
