"""`pktipc serve --config FILE`: serve's options in a TOML file.

The keys are not listed here: they are read off serve's argparse parser, one
per destination (`--block-size` is `block-size`, `-i` is `interfaces`,
`--no-promisc` is `promisc = false`), so that an option added to serve is a
key at once. A value is converted and checked as the command line would
convert the same text; options given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import difflib
import textwrap
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tomli_w

OWN = ("help", "config", "print_config")       # serve's options that are not config


@dataclass(frozen=True)
class Key:
    name: str
    action: argparse.Action

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def flag(self) -> bool:
        return self.action.nargs == 0

    @property
    def many(self) -> bool:
        a = self.action
        return isinstance(a, argparse._AppendAction) or a.nargs in ("*", "+")

    def allowed(self) -> str:
        """What the key takes, in words."""
        a = self.action
        if self.flag:
            return "true or false"
        if a.choices is not None:
            what = "one of " + ", ".join(map(str, a.choices))
        elif a.type in (int, float):
            what = "an integer" if a.type is int else "a number"
        elif a.type is None:
            what = "a string"
        else:
            opt = a.option_strings[-1] if a.option_strings else a.dest
            what = f"what {opt} takes ({a.metavar or 'a value'})"
        return f"a list, each {what}" if self.many else what


def subparser(parser: argparse.ArgumentParser, cmd: str) -> argparse.ArgumentParser:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[cmd]  # type: ignore[no-any-return]
    raise LookupError(cmd)


def keys(serve: argparse.ArgumentParser) -> dict[str, Key]:
    """The config keys of serve's options, in the parser's order. Options
    sharing a destination (--speed, --realtime) are one key: the one that
    takes a value."""
    out: dict[str, Key] = {}
    for a in serve._actions:
        if a.dest in OWN or a.dest is argparse.SUPPRESS:
            continue
        name = a.dest.replace("_", "-")
        if name not in out or (out[name].flag and a.nargs != 0):
            out[name] = Key(name, a)
    return out


def _convert(k: Key, v: Any) -> Any:
    """`v` as the command line would have it; ValueError saying what is allowed."""
    if k.flag:
        if not isinstance(v, bool):
            raise ValueError(k.allowed())
        a = k.action
        if isinstance(a.const, bool):   # store_true, store_false: the value itself
            return v
        return a.const if v else a.default
    if k.many:
        if not isinstance(v, list):
            raise ValueError(k.allowed())
        return [_scalar(k, x) for x in v]
    return _scalar(k, v)


def _scalar(k: Key, v: Any) -> Any:
    a = k.action
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError(k.allowed())
    conv: Callable[[str], Any] = a.type if callable(a.type) else str
    try:
        x = conv(str(v))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ValueError(k.allowed()) from None
    if a.choices is not None and x not in a.choices:
        raise ValueError(k.allowed())
    return x


def load(path: str, serve: argparse.ArgumentParser) -> dict[str, Any]:
    """{dest: value} of a config file; ValueError (one line, naming the
    file and the key) for anything wrong in it."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not TOML: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    known = keys(serve)
    out: dict[str, Any] = {}
    for name, v in doc.items():
        k = known.get(name)
        if k is None:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"{path}: unknown key {name!r} ({hint}the keys are serve's "
                             "options, as pktipc serve --print-config shows them)")
        try:
            out[k.dest] = _convert(k, v)
        except ValueError as e:
            raise ValueError(f"{path}: {name} = {_toml(v)}: {name} takes {e}") from None
    for group in serve._mutually_exclusive_groups:
        both = sorted({a.dest.replace("_", "-") for a in group._group_actions
                       if a.dest in out})
        if len(both) > 1:
            raise ValueError(f"{path}: {' and '.join(both)}: give one of them, not both")
    return out


def _toml(v: Any) -> str:
    """`v` as TOML, on one line."""
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return tomli_w.dumps({"v": v}).removeprefix("v = ").strip()


def parse(factory: Callable[[], argparse.ArgumentParser],
          argv: Sequence[str] | None) -> argparse.Namespace:
    """factory().parse_args(argv), with serve --config FILE read under the
    command line. A required choice of serve (-i or -r) may come from either."""
    parser = factory()
    serve = subparser(parser, "serve")
    required = [g for g in serve._mutually_exclusive_groups if g.required]
    for g in required:
        g.required = False
    a = parser.parse_args(argv)
    if a.cmd != "serve":
        return a
    if a.config is not None:
        try:
            config = load(a.config, serve)
        except ValueError as e:
            serve.exit(2, f"pktipc: error: {e}\n")
        _merge(a, config, _given(factory, argv), serve)
    for g in required:
        if all(getattr(a, x.dest) in (None, x.default) for x in g._group_actions):
            opts = " ".join(x.option_strings[0] for x in g._group_actions)
            serve.error(f"one of the arguments {opts} is required"
                        + (f" (here or in {a.config})" if a.config else ""))
    return a


def _given(factory: Callable[[], argparse.ArgumentParser],
           argv: Sequence[str] | None) -> set[str]:
    """The destinations argv sets itself (parsed again with no defaults)."""
    parser = factory()
    serve = subparser(parser, "serve")
    for g in serve._mutually_exclusive_groups:
        g.required = False
    for act in serve._actions:
        act.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) & {a.dest for a in serve._actions}


def _merge(a: argparse.Namespace, config: dict[str, Any], given: set[str],
           serve: argparse.ArgumentParser) -> None:
    # An option of a mutually exclusive group given on the command line
    # replaces the file's choice in that group (-i over the file's files).
    for g in serve._mutually_exclusive_groups:
        dests = {x.dest for x in g._group_actions}
        if dests & given:
            for d in dests - given:
                config.pop(d, None)
    for dest, v in config.items():
        if dest not in given:
            setattr(a, dest, v)


def dump(serve: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """The effective configuration as TOML that --config reads back; options
    that are not set are commented out."""
    lines = ["# pktipc serve: the effective configuration (pktipc serve --config FILE "
             "reads it back)"]
    for k in keys(serve).values():
        lines.append("")
        act = k.action
        what = ", ".join(act.option_strings) or k.dest
        if act.metavar and act.nargs != 0:
            what += f" {act.metavar}"
        doc = (act.help or "").replace("%(default)s", str(act.default))
        lines += textwrap.wrap(f"{what}: {doc}" if doc else what, 78, initial_indent="# ",
                               subsequent_indent="#   ")
        v = getattr(a, k.dest)
        if k.flag and not isinstance(act.const, bool):
            v = v == act.const
        lines.append(f"# {k.name} =" if v is None else tomli_w.dumps({k.name: v}).rstrip())
    return "\n".join(lines) + "\n"
