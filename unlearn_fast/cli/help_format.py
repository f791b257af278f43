"""The ``--help`` layout of every subcommand (each flag's default is named where it has one), and its usage
errors: one line naming the problem, the closest flag for a misspelt one, and where the flags are listed."""
from __future__ import annotations

import argparse
import difflib
import re


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each flag's default, except None / False ones (their help says what unset does)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "%(default)" in text \
                or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


def closest_flags(parser: argparse.ArgumentParser, message: str) -> list:
    """[(flag, closest known flag)] for each ``--flag`` argparse called unrecognized in ``message`` that has a
    close spelling among ``parser``'s flags."""
    if "unrecognized arguments:" not in message:
        return []
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    asked = [t.split("=", 1)[0] for t in message.split("unrecognized arguments:", 1)[1].split() if t.startswith("--")]
    found = [difflib.get_close_matches(t, known, n=1, cutoff=0.75) for t in asked]
    return [(t, m[0]) for t, m in zip(asked, found) if m]


def short_usage_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser``'s usage errors one line on stderr (exit 2), in place of argparse's usage block above the
    error (45 lines for ``unlearn``, which pushed the one line that matters off the screen); returns ``parser``."""

    def error(message: str):
        pairs = closest_flags(parser, message)
        hint = (f" (did you mean {pairs[0][1]}?)" if len(pairs) == 1 else
                " (" + "; ".join(f"{t}: did you mean {m}?" for t, m in pairs) + ")" if pairs else "")
        message = re.sub(r"\s+", " ", message).strip()
        parser.exit(2, f"{parser.prog}: error: {message}{hint}; '{parser.prog} --help' lists every flag\n")

    parser.error = error  # argparse calls self.error(message) for every usage error
    return parser


__all__ = ["DefaultsHelpFormatter", "short_usage_errors", "closest_flags"]
