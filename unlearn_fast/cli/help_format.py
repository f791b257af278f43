"""The ``--help`` layout of every subcommand: each flag's default is named where it has one."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each flag's default, except None / False ones (their help says what unset does)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "%(default)" in text \
                or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


__all__ = ["DefaultsHelpFormatter"]
