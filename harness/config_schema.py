"""One schema mechanism for every TOML file migstall reads.

Scenario files, ``nightly.toml`` and series manifests are described by pydantic v2
models derived from :class:`ConfigModel` (``extra="forbid"``, frozen, strict
types: a TOML string is never silently turned into a number).  :func:`validate`
runs a model over a parsed TOML document and turns the first problem pydantic
reports into the project's one-line :class:`~harness.errors.UserError`: the file,
the table, the key, what is wrong and the fix (a "did you mean" for an unknown
key, from the model's own field names).

Checks that span fields or need the disk or the host (sizes, matrices, paths,
host specs) stay with each loader, after the model: the model answers only
"is this the right shape and type".
"""

from __future__ import annotations

import difflib
import logging
import sys
from typing import (
    Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union, get_args, get_origin,
)

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import UserError

if sys.version_info >= (3, 10):
    from types import UnionType
    _UNIONS: Tuple[Any, ...] = (Union, UnionType)
else:  # pragma: no cover - exercised on Python 3.9 only
    _UNIONS = (Union,)

log = logging.getLogger(__name__)

M = TypeVar("M", bound="ConfigModel")


class ConfigModel(BaseModel):
    """Base of every config table: unknown keys are errors, instances are frozen,
    and types are strict (``vcpus = "2"`` is not an integer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


#: pydantic error type -> what the value should have been
_WANTED = {
    "string_type": "a string",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table",
}


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X`` (other unions and plain types unchanged)."""
    if get_origin(annotation) in _UNIONS:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _table_kind(annotation: Any) -> Tuple[str, Optional[Type[BaseModel]]]:
    """How a field nests another table: ("table" | "array" | "map" | "", the sub-model)."""
    t = _unwrap(annotation)
    if _is_model(t):
        return "table", t
    origin, args = get_origin(t), get_args(t)
    if origin in (list, tuple, List, Tuple) and args and _is_model(args[0]):
        return "array", args[0]
    if origin in (dict, Dict) and len(args) == 2 and _is_model(args[1]):
        return "map", args[1]
    return "", None


class _Where:
    """Where an error is: the table label, the model of that table, the key in it."""

    def __init__(self, model: Type[BaseModel], loc: Sequence[Union[str, int]]) -> None:
        self.table = ""                  # "" = the top level, else "[base]", "[[host]] #2", "[kernels.x]"
        self.model: Type[BaseModel] = model
        self.key: Optional[str] = None   # the key the error is about (None: the table itself)
        self.table_shape = ""            # key is a table/array/map of the wrong type: which of them
        parts = list(loc)
        while parts:
            part = parts.pop(0)
            field = self.model.model_fields.get(str(part))
            kind, sub = _table_kind(field.annotation) if field is not None else ("", None)
            if sub is None:
                self.key = str(part)
                return
            if not parts:                # the table / array / map itself has the wrong type
                self.key, self.table_shape = str(part), kind
                return
            if kind == "table":
                self.table, self.model = f"[{part}]", sub
            elif kind == "array":
                self.table, self.model = f"[[{part}]] #{int(parts.pop(0)) + 1}", sub
            else:
                self.table, self.model = f"[{part}.{parts.pop(0)}]", sub

    def label(self) -> str:
        return self.table or "the top level"


def _first(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The error to report: an unknown key first (a typo often explains the rest), else the first."""
    for e in errors:
        if e["type"] == "extra_forbidden":
            return e
    return errors[0]


def format_error(exc: ValidationError, model: Type[BaseModel], file: Optional[str],
                 label: Optional[Callable[[str], str]] = None) -> str:
    """One line for the first problem in ``exc`` (raised validating ``model``).

    ``file`` names the file (None for command-line flags); ``label`` maps a key
    to what the user typed (e.g. ``vcpus`` -> ``--vcpus``)."""
    err = _first(exc.errors())
    where = _Where(model, err["loc"])
    key = where.key or ""
    shown_key = label(key) if label else key
    at = f"{file}: " if file else ""
    prefix = (f"{file} {where.table}: " if where.table else at) if file else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        names = list(where.model.model_fields)
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"
        return f"{at}unknown key {key!r} in {where.label()}; {hint}"
    if kind == "missing":
        field = where.model.model_fields.get(key)
        what = f" ({field.description})" if field is not None and field.description else ""
        return f"{at}missing {key!r} in {where.label()}{what}; add it"
    if kind == "value_error":
        return f"{prefix}{shown_key} {err['ctx']['error']}"
    shown = repr(err["input"])
    if where.key is None and not where.table:   # the document itself (never from TOML): pydantic's words
        return f"{at}{err['msg']}"
    if where.key is None:           # [kernels.NAME] = 3: the entry of a map of tables
        return f"{at}{where.table} {shown} is not a table; write it as {where.table}"
    if where.table_shape == "array":
        return f"{prefix}{shown_key} {shown} is not an array of tables; write each entry as [[{key}]]"
    if where.table_shape == "table":
        return f"{prefix}{shown_key} {shown} is not a table; write it as [{key}]"
    if where.table_shape == "map":
        return f"{prefix}{shown_key} {shown} is not a table; write it as [{key}.NAME] tables"
    wanted = _WANTED.get(kind)
    if wanted is None:              # a constraint or type the table above does not name: pydantic's words
        log.debug("config error %s without a phrase: %s", kind, err)
        wanted = f"valid ({err['msg'][0].lower()}{err['msg'][1:]})"
    return f"{prefix}{shown_key} {shown} is not {wanted}; fix the value"


def validate(model: Type[M], data: Any, file: Optional[str], *,
             label: Optional[Callable[[str], str]] = None) -> M:
    """``model.model_validate(data)``, a ValidationError turned into a one-line UserError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_error(exc, model, file, label)) from None


def optional(description: str) -> Any:
    """A key that may be left out (None when it is): ``key: Optional[str] = optional("what it is")``."""
    return Field(default=None, description=description)
