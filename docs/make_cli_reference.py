"""Write docs/cli.md, the reference of every ``anomaly`` subcommand, from the argparse parsers.

The reference is generated so that it cannot drift from the code: ``tests/test_docs.py`` fails when
the committed ``docs/cli.md`` differs from what this script renders. Run it after changing a
subcommand's options:

    python docs/make_cli_reference.py            # rewrite docs/cli.md
    python docs/make_cli_reference.py --check    # exit 1 if docs/cli.md is out of date

The text is built from each action's option strings, metavar, default and help (not from
``format_help()``, whose layout changes between Python versions and with the terminal's width),
so the same code gives the same file on every machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["render", "write", "main", "CLI_MD"]

CLI_MD = Path(__file__).resolve().parent / "cli.md"

_HEADER = """# CLI reference

Generated from the argparse parsers by `python docs/make_cli_reference.py`; do not edit by hand
(`tests/test_docs.py` fails when this file and the parsers disagree).

Every subcommand prints its own help with `anomaly COMMAND --help`. A user mistake (a missing
folder, an unreadable image, a bad bundle, an unknown model) prints one line and exits with status 2;
see [exit-codes.md](exit-codes.md).
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._get_subactions()}
    return {}


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        m = action.metavar
        return " ".join(m) if isinstance(m, tuple) else str(m)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _args_part(action: argparse.Action) -> str:
    """The argument part of an option or positional: ``DIR``, ``[N ...]``, ``PATH [PATH ...]``."""
    if action.nargs == 0:
        return ""
    m = _metavar(action)
    if action.nargs is None:
        return m
    if action.nargs == "?":
        return f"[{m}]"
    if action.nargs == "*":
        return f"[{m} ...]"
    if action.nargs == "+":
        return f"{m} [{m} ...]"
    if isinstance(action.nargs, int):
        return " ".join([m] * action.nargs)
    return m


def _help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own expansion: %(default)s, %(choices)s, %(prog)s
        params = dict(vars(action), prog=prog)
        for name in list(params):
            if params[name] is argparse.SUPPRESS:
                del params[name]
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        text = text % params
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default_text(action: argparse.Action) -> str:
    d = action.default
    if action.nargs == 0 or d is None or d is argparse.SUPPRESS or d == [] or d == {} or d == "":
        return ""
    return f"`{d}`"


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    parts = [prog]
    if any(a.option_strings for a in _visible(parser)):
        parts.append("[OPTIONS]")
    for a in _visible(parser):
        if not a.option_strings:
            parts.append(_args_part(a))
    for a in _visible(parser):
        if a.option_strings and a.required:
            parts.append(f"{a.option_strings[-1]} {_args_part(a)}".strip())
    return " ".join(parts)


def _table(actions: list[argparse.Action], prog: str) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for a in actions:
        if a.option_strings:
            arg = ", ".join(f"{o} {_args_part(a)}".strip() for o in a.option_strings)
        else:
            arg = _args_part(a)
        required = " (required)" if a.option_strings and a.required else ""
        rows.append(f"| `{arg}`{required} | {_default_text(a)} | {_help_text(a, prog)} |")
    return rows


def _render_parser(prog: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    out = [f"## `{prog}`", ""]
    description = " ".join((parser.description or summary or "").split())
    if description:
        out += [description, ""]
    out += ["```", _synopsis(prog, parser), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a in _visible(parser)]
        if not actions:
            continue
        if group.title == "positional arguments":
            out += ["Arguments:", ""]
        elif group.title in ("options", "optional arguments"):
            out += ["Options:", ""]
        else:
            out += [f"{group.title[:1].upper()}{group.title[1:]}" + (f": {' '.join(group.description.split())}" if group.description else ":"), ""]
        out += _table(actions, prog) + [""]
    if parser.epilog:
        out += [" ".join(parser.epilog.split()), ""]
    return out


def render() -> str:
    """The whole of docs/cli.md for the parsers of this checkout (a str ending in one newline)."""
    from anomaly.cli import build_parser

    root = build_parser()
    subs = _subparsers(root)
    helps = _subcommand_help(root)
    out = [_HEADER, "## `anomaly`", "", " ".join((root.description or "").split()), "",
           "```", _synopsis("anomaly", root).replace(" command", " COMMAND ..."), "```", ""]
    out += _table([a for a in _visible(root) if a.option_strings], "anomaly") + [""]
    out += ["| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#anomaly-{name}) | {' '.join(helps.get(name, '').split())} |" for name in subs]
    out.append("")
    for name, sub in subs.items():
        out += _render_parser(f"anomaly {name}", sub, helps.get(name, ""))
    return "\n".join(out).rstrip("\n") + "\n"


def write(path: Path = CLI_MD) -> bool:
    """Write the reference to ``path`` (temp file, fsync, rename); True when it changed."""
    text = render()
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cli.", suffix=".md")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write docs/cli.md from the anomaly command's parsers.")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/cli.md is out of date")
    args = p.parse_args(argv)
    if args.check:
        current = CLI_MD.read_text(encoding="utf-8") if CLI_MD.exists() else ""
        if current != render():
            print(f"{CLI_MD} is out of date: run python docs/make_cli_reference.py", file=sys.stderr)
            return 1
        print(f"{CLI_MD} is up to date")
        return 0
    print(f"{'wrote' if write() else 'unchanged'} {CLI_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
