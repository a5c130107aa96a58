"""One config system for every stage: typed dataclasses whose fields carry their help, choices and CLI flags.

    @dataclass(kw_only=True)
    class NERConfig:
        learning_rate: float = option(5e-5, "peak learning rate", aliases=["--lr"])
        data: str = option(help="task directory with train/dev/test files")        # no default: required

    cfg = parse(NERConfig, argv, prog="biobert ner")      # flags, --config FILE, key=value, --print-config

Layers, later wins: the dataclass defaults < a config file (YAML/JSON, ``--config``) < flags and ``key=value``
overrides (``section.key=value`` for nested sections). A file value ``???`` means "must be given" (a recipe that
cannot guess it, e.g. which BERT to continue from). Every field is a flag: ``learning_rate`` answers to
``--learning-rate`` and ``--learning_rate`` (the HF TrainingArguments spelling), booleans to ``--x/--no-x``, nested
fields to ``--section.key``. Unknown keys and flags fail with the closest known name. Validation lives in each
dataclass's ``__post_init__`` (raising ValueError); values are converted by the field's type before that runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any

import yaml

REQUIRED = "???"
_HIDDEN = ("--local_rank", "--local-rank")  # appended by the deepspeed launcher: the rank comes from the environment


def option(default: Any = MISSING, help: str = "", *, factory=None, choices=None, aliases=(), false_aliases=(),
           positional=False, flag: bool = True):
    """A config field. No default (and no factory) = required. ``positional``: a positional CLI argument.
    ``false_aliases``: extra flags that set a boolean to False (``--cased`` for ``lower_case``).
    ``flag=False``: settable from files and key=value only (nested dicts, internal fields)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases),
            "false_aliases": tuple(false_aliases), "positional": positional, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_choices(cfg) -> None:
    """Raise ValueError for a field whose value is not one of its ``choices`` (call from ``__post_init__``, so
    configs built in code are held to the same rule as those parsed from a command line)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        for item in (value if isinstance(value, (list, tuple)) else [value]) if choices else []:
            if item is not None and item not in choices:
                raise ValueError(f"{f.name}: {item!r} is not one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------- types and values


def _unwrap(hint) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``str`` -> (str, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), True
    return hint, False


def is_section(hint) -> bool:
    return dataclasses.is_dataclass(_unwrap(hint)[0])


def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(hint, value: Any, where: str) -> Any:
    """``value`` (from YAML, JSON or a command line string) as the field type ``hint``; ValueError naming ``where``."""
    kind, optional = _unwrap(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and kind is not str):
        if optional:
            return None
        raise ValueError(f"{where}: a value is required, got {value!r}")
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE + _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value))
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = _parse_scalar(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, (list, tuple)):
                raise ValueError
            # `--seeds 1 2 3` and `--seeds 1,2,3` alike
            value = [p for v in value for p in (v.split(",") if isinstance(v, str) and "," in v else [v]) if p != ""]
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ValueError
                return tuple(coerce(a, v, where) for a, v in zip(args, value))
            item = args[0] if args else str
            out = [coerce(item, v, where) for v in value]
            return tuple(out) if origin is tuple else out
        if kind is dict or origin is dict:
            if isinstance(value, str):
                value = _parse_scalar(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {_type_name(hint)}, got {value!r}") from None
    return value


def _type_name(hint) -> str:
    kind, optional = _unwrap(hint)
    name = getattr(kind, "__name__", str(kind).replace("typing.", ""))
    if typing.get_origin(kind) in (list, tuple):
        name = str(kind).replace("typing.", "")
    return name + (" or null" if optional else "")


def _parse_scalar(text: str) -> Any:
    for load in (json.loads, yaml.safe_load):  # JSON first: YAML 1.1 reads 1e-4 as a string
        try:
            return load(text)
        except (json.JSONDecodeError, yaml.YAMLError):
            pass
    return text


# ---------------------------------------------------------------- files, overrides, building


def read_file(path: str | Path) -> dict:
    """A YAML or JSON mapping; ValueError naming the file on a parse error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a YAML or JSON config file") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def deep_merge(dst: dict, src: dict) -> dict:
    """Merge ``src`` into ``dst`` (nested dicts merged, everything else replaced); returns dst."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = json.loads(json.dumps(v)) if isinstance(v, dict) else v
    return dst


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is a value, not a section")
        tree = node
    tree[leaf] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["optimizer.lr=1e-4", "max_steps=10"]`` -> [("optimizer.lr", 1e-4), ("max_steps", 10)]."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ValueError(f"argument {item!r} is not key=value (for example optimizer.lr=1e-4)")
        out.append((key, _parse_scalar(value)))
    return out


def known_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class (sections expanded)."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = hints(cls)[f.name]
        if is_section(hint):
            keys += known_keys(_unwrap(hint)[0], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a leaf name typed without its section, or the section missed by a typo
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known[:40])}"


def _flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def build(cls, values: dict, where: str):
    """Instantiate a (nested) config dataclass from a dict: unknown keys named with the closest known one, values
    converted by type, ``???`` and missing required fields named with their flag and help."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            prefix = f"{where}." if where else ""
            known = [prefix + k for k in known_keys(cls)]
            raise ValueError(f"unknown key {prefix + key!r}; {did_you_mean(prefix + key, known)}")
    kwargs, th = {}, hints(cls)
    for name, f in names.items():
        hint = th[name]
        here = f"{where}.{name}" if where else name
        if is_section(hint):
            sub = values.get(name)
            if sub is not None and not isinstance(sub, dict):
                raise ValueError(f"{here}: expected a section (a mapping), got {sub!r}")
            kwargs[name] = build(_unwrap(hint)[0], sub or {}, here)
            continue
        if name in values:
            value = values[name]
            if isinstance(value, str) and value == REQUIRED:
                raise ValueError(f"{here} is required by this config ({f.metadata.get('help') or name}): "
                                 f"add {here}=VALUE")
            kwargs[name] = coerce(hint, value, here)
        elif f.default is MISSING and f.default_factory is MISSING:
            what = f.metadata.get("help") or name
            raise ValueError(f"{here} is required ({what}): add {here}=VALUE" if "." in here
                             else f"{_flag_name(name)} is required: {what}")
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    check_choices(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """Plain data (tuples as lists), ready for JSON/YAML."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors become one line (biobert.errors) with a suggestion."""

    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message}")


def _describe(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(cls.__name__ + "(") else doc.split("\n\n")[0]


def _add_fields(parser, cls, prefix: str = "", group=None, skip: set | None = None) -> list[str]:
    """One flag per leaf field (keys in ``skip`` left out, added ones put in); returns the option strings added."""
    added = []
    th = hints(cls)
    skip = set() if skip is None else skip
    for f in dataclasses.fields(cls):
        hint, key = th[f.name], prefix + f.name
        if key in skip:
            continue
        skip.add(key)
        if is_section(hint):
            sub = _unwrap(hint)[0]
            title = f"{key} ({_describe(sub)})" if _describe(sub) else key
            added += _add_fields(parser, sub, key + ".", parser.add_argument_group(title), skip)
            continue
        meta = f.metadata
        if not meta.get("flag", True):
            continue
        target = group or parser
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        text = meta.get("help", "")
        if meta.get("choices"):
            text += f" (one of: {', '.join(map(str, meta['choices']))})"
        text += " [required]" if default is MISSING else f" [default: {default}]"
        text = text.replace("%", "%%")
        kind, _ = _unwrap(hint)
        kw: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=text)
        if meta.get("choices") and kind is str:  # lists and other kinds are checked after conversion, in build()
            kw["choices"] = meta["choices"]
        if typing.get_origin(kind) in (list, tuple):
            kw["nargs"] = "+" if not meta.get("positional") or default is MISSING else "*"
        if meta.get("positional"):
            kw.pop("dest")
            target.add_argument(key, metavar=key.upper(), **kw)
            continue
        names = [_flag_name(key)] + [a for a in meta.get("aliases", ()) if a != _flag_name(key)]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(kind)
            kw["metavar"] = (getattr(kind, "__name__", "X") if origin not in (list, tuple) else "X").upper()
        target.add_argument(*names, **kw)
        added += names
        if "_" in key:  # the underscore spelling (HF TrainingArguments style) works too, without cluttering --help
            target.add_argument("--" + key, **{**kw, "help": argparse.SUPPRESS})
            added.append("--" + key)
        if meta.get("false_aliases"):
            target.add_argument(*meta["false_aliases"], dest=key, action="store_false", default=argparse.SUPPRESS,
                                help=f"same as --no-{key.replace('_', '-')}")
            added += list(meta["false_aliases"])
    return added


def make_parser(cls, prog: str, description: str = "", *, config_help: str | None = None,
                overrides: bool = True) -> tuple[argparse.ArgumentParser, list[str]]:
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
    flags = _add_fields(parser, cls)
    if config_help is not None:
        parser.add_argument("--config", dest="config_file", default=None, help=config_help)
        flags.append("--config")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (after every layer) as YAML and exit")
    parser.add_argument(*_HIDDEN, dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    has_positional = any(f.metadata.get("positional") for f in dataclasses.fields(cls))
    if overrides and not has_positional:
        parser.add_argument("key_values", nargs="*", metavar="KEY=VALUE",
                            help="any setting as key=value (nested ones as section.key=value)")
    return parser, flags + ["--print-config", "--debug"]


def parse_args(parser: argparse.ArgumentParser, flags: list[str], argv: list[str] | None) -> argparse.Namespace:
    """parse_known_args, then name an unknown flag with the closest known one."""
    ns, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for item in unknown:
        if item.startswith("-"):
            name = item.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"see {parser.prog} --help"
            raise ValueError(f"{parser.prog}: unknown option {name}; {hint}")
        raise ValueError(f"{parser.prog}: unexpected argument {item!r} (overrides are key=value)")
    return ns


def given_values(ns: argparse.Namespace) -> dict:
    """The flags the user gave, as a nested dict (argparse defaults are suppressed, so absent = not given)."""
    out: dict = {}
    for key, value in vars(ns).items():
        if key in ("config_file", "print_config", "local_rank", "key_values") or value is argparse.SUPPRESS:
            continue
        set_dotted(out, key, value)
    return out


def parse(cls, argv: list[str] | None = None, *, prog: str, description: str = "", base: dict | None = None,
          resolve_config=None, config_file: bool = True):
    """Command line -> validated ``cls``. ``base``: values under the config file (e.g. a recipe's).
    ``resolve_config(name) -> Path`` finds packaged configs by name (default: the path itself).
    ``config_file=False``: no ``--config`` (the command has a field of that name). ``--print-config`` prints the result
    and exits 0."""
    help_text = "YAML/JSON file with any of these settings (flags and key=value win over it)"
    parser, flags = make_parser(cls, prog, description, config_help=help_text if config_file else None)
    ns = parse_args(parser, flags, argv)
    values = deep_merge({}, base or {})
    if getattr(ns, "config_file", None):
        path = resolve_config(ns.config_file) if resolve_config else Path(ns.config_file)
        deep_merge(values, read_file(path))
    deep_merge(values, given_values(ns))
    for key, value in parse_overrides(getattr(ns, "key_values", None) or []):
        set_dotted(values, key, value)
    cfg = build(cls, values, "")
    if ns.print_config:
        print(dump_yaml(to_dict(cfg)), end="")
        raise SystemExit(0)
    return cfg


def parse_suite(cls, task_classes, argv: list[str] | None = None, *, prog: str, description: str = ""):
    """For commands that run other stages (the evaluation suite, sweeps, benchmarks): their own settings ``cls``
    plus every field of ``task_classes`` as pass-through flags. -> (cls instance, {task key: raw value} given)."""
    parser, flags = make_parser(cls, prog, description)
    own = {f.name for f in dataclasses.fields(cls)}
    group = parser.add_argument_group("task settings (passed to every task that has them)")
    seen = set(own)
    for task_cls in task_classes:
        flags += _add_fields(parser, task_cls, group=group, skip=seen)
    ns = parse_args(parser, flags, argv)
    values, tasks = {}, {}
    for key, value in given_values(ns).items():
        (values if key in own else tasks)[key] = value
    for key, value in parse_overrides(getattr(ns, "key_values", None) or []):
        set_dotted(values if key.split(".")[0] in own else tasks, key, value)
    task_keys = {f.name for c in task_classes for f in dataclasses.fields(c)}
    for key in tasks:
        if key not in task_keys:
            raise ValueError(f"{prog}: unknown key {key!r}; {did_you_mean(key, sorted(own | task_keys))}")
    cfg = build(cls, values, "")
    if ns.print_config:
        print(dump_yaml({**to_dict(cfg), "task_settings": tasks}), end="")
        raise SystemExit(0)
    return cfg, tasks


def parse_command(commands: dict[str, type], argv: list[str] | None = None, *, prog: str, description: str = ""):
    """For tools with subcommands (``python -m launch.shard_parts slice|merge ...``): the first argument picks the
    config class, the rest is parsed by ``parse`` (no ``--config``). -> an instance of the chosen class."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        print(f"usage: {prog} {{{','.join(commands)}}} [--help] ...\n\n{description.strip()}\n\ncommands:")
        print("\n".join(f"  {name:<{width}}  {_describe(cls)}" for name, cls in commands.items()))
        raise SystemExit(0)
    if not argv or argv[0] not in commands:
        got = f"unknown command {argv[0]!r}" if argv else "no command given"
        close = difflib.get_close_matches(argv[0], list(commands), n=1) if argv else []
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(commands)}"
        raise ValueError(f"{prog}: {got}; {hint}")
    cls = commands[argv[0]]
    return parse(cls, argv[1:], prog=f"{prog} {argv[0]}", description=_describe(cls), config_file=False)
