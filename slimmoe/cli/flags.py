"""argparse flags generated from Pydantic models, and the way back from the parsed flags.

The typed configs are the schema (as in torchtune's recipes and LitGPT's entry points):
a field's name gives its flag, its annotation the argparse type (``Literal`` gives the
choices), its ``description`` and default the help. A field added to a model is a flag
of every command that uses that model, with no copy in the CLI::

    DISTILL = ModelFlags(DistillConfig, aliases={"teacher_cache_dir": ["--teacher-cache"]})
    DISTILL.add_to(parser)        # --tokens N, --loss {kd_topk,...}, --no-progress, ...
    cfg = DISTILL.build(args)     # DistillConfig from the flags the user gave

Every generated flag has the argparse default SUPPRESS, so the parsed namespace holds
only what was typed and every default lives in one place, the model. Fields of a nested
model are flattened (``PruneConfig.importance.samples`` is ``--samples``; its dest is
``importance.samples``). A bool is a switch: ``--name`` when it defaults to False,
``--no-name`` when it defaults to True. A field with a ``mode="before"`` validator gets
the text as typed and parses it itself (``--total-params 3.8B``). ``X | None`` with a
default other than None also takes ``none``. Types without a flag (dicts, models inside
``X | None``) raise TypeError when the flags are made: skip them or add a flag by hand.

Bad values become :class:`~slimmoe.errors.UserError` with one line naming the config
field (``importance.samples: ...``, the name a YAML config uses) or, with
``errors="flag"`` for models that exist only on the command line, the flag
(``--seq-len: ...``).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from types import NoneType, UnionType
from typing import Any, Literal

from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic.fields import FieldInfo

from slimmoe.config import format_validation_error
from slimmoe.errors import UserError

METAVARS = {int: "N", float: "X", str: None}  # None: the field's name, as argparse does


@dataclass(frozen=True)
class Flag:
    """One generated flag: where its value goes in the model and how argparse reads it."""

    path: tuple[str, ...]  # field path in the model: ("importance", "samples")
    field: FieldInfo
    options: tuple[str, ...]  # "--samples" first, then any aliases
    raw: bool = False  # the model parses the text itself (a mode="before" validator)

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def name(self) -> str:
        return self.options[0]


class ModelFlags:
    """The flags of one Pydantic model. ``skip``, ``aliases`` and ``metavars`` are keyed by
    dotted field path (``"importance.expert_score"``); ``aliases`` adds option strings to a
    generated flag (``{"teacher_cache_dir": ["--teacher-cache"]}``)."""

    def __init__(self, model: type[BaseModel], *, skip: Iterable[str] = (),
                 aliases: Mapping[str, Iterable[str]] | None = None, metavars: Mapping[str, str] | None = None,
                 errors: Literal["field", "flag"] = "field") -> None:
        self.model, self.errors = model, errors
        self.skip, self.aliases, self.metavars = set(skip), dict(aliases or {}), dict(metavars or {})
        self.flags = list(_walk(model, (), self))
        known = {".".join(f.path[:i]) for f in self.flags for i in range(1, len(f.path) + 1)}
        unknown = (self.skip - _all_paths(model)) | (set(self.aliases) | set(self.metavars)) - known
        if unknown:
            raise ValueError(f"{model.__name__}: no such field: {', '.join(sorted(unknown))}")
        self._kwargs = [argparse_kwargs(f, self.metavars.get(f.dest)) for f in self.flags]  # TypeError now, not later

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
               title: str | None = None) -> None:
        """Add the flags to ``parser`` (in an argument group called ``title`` if given)."""
        taken = {a.dest for a in parser._actions}
        clash = [f.dest for f in self.flags if f.dest in taken]
        if clash:  # argparse itself only catches clashing option strings
            raise ValueError(f"{self.model.__name__}: dest already used by the parser: {', '.join(clash)}")
        target = parser.add_argument_group(title, _first_line(self.model.__doc__)) if title else parser
        for flag, kwargs in zip(self.flags, self._kwargs):
            target.add_argument(*flag.options, **kwargs)

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """The values the user typed, nested like the model (``{"importance": {"samples": 4}}``)."""
        values: dict[str, Any] = {}
        for flag in self.flags:
            if hasattr(args, flag.dest):
                node = values
                for part in flag.path[:-1]:
                    node = node.setdefault(part, {})
                node[flag.path[-1]] = getattr(args, flag.dest)
        return values

    def validate(self, values: Mapping[str, Any]) -> Any:
        """The model from ``values``; a bad value is a UserError naming its field or flag."""
        try:
            return self.model.model_validate(values)
        except ValidationError as e:
            raise UserError(self._message(e)) from None

    def build(self, args: argparse.Namespace) -> Any:
        """The model from the flags the user gave; the rest are the model's defaults."""
        return self.validate(self.given(args))

    def _message(self, err: ValidationError) -> str:
        msg = format_validation_error(err)
        if self.errors == "flag":
            loc = ".".join(str(p) for p in err.errors()[0]["loc"])
            flag = next((f for f in self.flags if f.dest == loc), None)
            if flag is not None and msg.startswith(loc + ":"):
                return flag.name + msg[len(loc):]
        return msg


def _walk(model: type[BaseModel], prefix: tuple[str, ...], spec: ModelFlags) -> Iterator[Flag]:
    raw = _raw_fields(model)
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        dotted = ".".join(path)
        if dotted in spec.skip:
            continue
        if _is_model(field.annotation):
            yield from _walk(field.annotation, path, spec)
            continue
        off_switch = _strip_none(field.annotation)[0] is bool and field.default is True
        option = "--" + ("no-" if off_switch else "") + name.replace("_", "-")
        yield Flag(path, field, (option, *spec.aliases.get(dotted, ())), raw=name in raw)


def argparse_kwargs(flag: Flag, metavar: str | None = None) -> dict[str, Any]:
    """``add_argument`` keywords of one flag: type, nargs, choices, action, help."""
    field, dotted = flag.field, flag.dest
    required = field.is_required()
    default = None if required else field.get_default(call_default_factory=True)
    ann, optional = _strip_none(field.annotation)
    kw: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS, "help": _help(field, default, required, optional)}
    if required:
        kw["required"] = True
    if ann is bool:
        kw["action"] = {True: "store_false", False: "store_true"}.get(default, argparse.BooleanOptionalAction)
        return kw
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        kw["choices"], elem = list(args), type(args[0])
    elif origin in (tuple, list):
        elem = args[0] if args else str
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) != 1:
                raise TypeError(f"{dotted}: no flag for {ann} (a tuple of mixed types); skip it")
            kw["nargs"] = len(args)
        else:
            kw["nargs"] = "+"
    else:
        elem = ann
    if isinstance(elem, type) and issubclass(elem, PurePath):
        elem, kw["metavar"] = str, "PATH"  # the model makes the Path
    if elem not in METAVARS:
        raise TypeError(f"{dotted}: no flag for the type {ann}; skip the field or add its flag by hand")
    kw.setdefault("metavar", METAVARS[elem] or flag.path[-1].upper())
    if "choices" in kw:
        del kw["metavar"]  # argparse shows {a,b,c}
    if metavar is not None:
        kw["metavar"] = metavar
    if flag.raw:
        elem = str
    elif optional and default is not None:
        elem = _or_none(elem)
    kw["type"] = elem
    return kw


def _help(field: FieldInfo, default: Any, required: bool, optional: bool) -> str:
    text = (field.description or "").replace("%", "%%")
    if required:
        note = "required"
    elif default is True:
        note = "on by default"
    elif default is None or default is False:
        return text
    else:
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        note = f"default: {shown}" + ("; 'none' turns it off" if optional else "")
    return f"{text} ({note})" if text else note


def _or_none(elem: type) -> Any:
    """argparse type that reads ``none`` as None (its name keeps argparse's 'invalid int value')."""
    def convert(text: str):
        return None if text.strip().lower() == "none" else elem(text)

    convert.__name__ = elem.__name__
    return convert


def _strip_none(ann: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (ann, False)."""
    if typing.get_origin(ann) in (typing.Union, UnionType):
        rest = [a for a in typing.get_args(ann) if a is not NoneType]
        if len(rest) == 1:
            return rest[0], len(rest) < len(typing.get_args(ann))
    return ann, False


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _raw_fields(model: type[BaseModel]) -> set[str]:
    """Fields with a mode="before" validator (decorator or BeforeValidator): they parse text."""
    found = {name for name, f in model.model_fields.items() if any(isinstance(m, BeforeValidator) for m in f.metadata)}
    for dec in model.__pydantic_decorators__.field_validators.values():
        if dec.info.mode == "before":
            found.update(dec.info.fields)
    return found


def _all_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        paths.add(prefix + name)
        if _is_model(field.annotation):
            paths |= _all_paths(field.annotation, prefix + name + ".")
    return paths


def _first_line(doc: str | None) -> str | None:
    return " ".join(doc.strip().split("\n\n")[0].replace("`", "").split()) if doc else None
