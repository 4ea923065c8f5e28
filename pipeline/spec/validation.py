"""Spec validation helpers: parsing a YAML/JSON document safely, and turning a pydantic
validation error into one :class:`~pipeline.errors.SpecError` line (field, value, fix)."""

from __future__ import annotations

import difflib
import json
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from pipeline.errors import SpecError, short

MAX_SPEC_VALUES = 100_000  # scalars after YAML alias expansion (an alias bomb has ~1e8)


def parse_document(data: bytes, where: str, json_only: bool = False) -> Any:
    """Parse a YAML/JSON document, refusing alias bombs (more than :data:`MAX_SPEC_VALUES`
    values once aliases are expanded).

    Raises:
        SpecError: not UTF-8, not valid YAML/JSON, or too many values.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError("<file>", f"{where!r} is not UTF-8 text (byte {exc.start})",
                        "save the job file as UTF-8 YAML or JSON") from None
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#")
                               for ln in text.splitlines()):
        raise SpecError("<file>", f"{where!r} is empty", "describe the job: at least data: and "
                        "backbone: (see the README's job file reference)")
    try:
        if json_only:
            raw = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except SpecError:
        raise
    except Exception as exc:
        detail = short(" ".join(str(exc).split()), 200)
        raise SpecError("<file>", f"{where!r} is not valid YAML/JSON ({detail})",
                        "fix the syntax at the position shown") from None
    _count_values(raw, where)
    return raw


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique (a repeated key would silently keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SpecError(str(key), "given twice in the job file (the last would silently "
                            "win)", "keep one of them")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(str(key), f"given twice in the job file (line "
                                f"{key_node.start_mark.line + 1}; the last would silently win)",
                                "keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _count_values(raw: Any, where: str) -> None:
    """Walk the parsed document (aliases expand to shared objects: walk them as often as they
    are referenced) and stop at :data:`MAX_SPEC_VALUES`."""
    budget = MAX_SPEC_VALUES
    stack = [raw]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise SpecError("<file>", f"{where!r} expands to more than {MAX_SPEC_VALUES} values"
                            " (YAML aliases?)", "write the job spec out plainly, without "
                            "anchors and aliases that multiply it")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


# --- errors -----------------------------------------------------------------------------

_LITERAL_WHAT = {"source": "source", "strategy": "strategy", "feature_dtype": "dtype",
                 "precision": "precision", "optimizer": "optimizer", "heads": "head",
                 "batch_size": "batch size"}


def custom(field: str, problem: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("ff", "{problem}", {"problem": problem, "fix": fix,
                                                  "field": field})


def spec_error(exc: ValidationError, model: type[BaseModel], section: str) -> SpecError:
    """The first pydantic error as one line: field, problem with the value, and the fix."""
    err = exc.errors(include_url=False)[0]
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, SpecError):  # a nested section's own error: already one line
        return inner
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    ctx = err.get("ctx") or {}
    if ctx.get("field"):  # a model validator names its field; a field validator has it
        loc = [*loc, str(ctx["field"])]
    # pydantic tags union members (e.g. 'int', "literal['auto']"): not part of the field name
    loc = [p for p in loc if not (p in ("int", "float", "str", "function-before")
                                  or p.startswith(("literal[", "function-")))]
    field = ".".join([section, *loc] if section else loc) or "<spec>"
    owner, leaf = _owner(model, loc)
    value = err.get("input")
    kind = err["type"]
    meta = owner.model_fields.get(leaf) if owner is not None and leaf else None
    extra = meta.json_schema_extra if meta is not None else None
    fix = str(extra.get("fix")) if isinstance(extra, dict) and extra.get("fix") else ""
    v = short(value)
    if kind == "ff":
        problem = str(ctx.get("problem") or err["msg"])
        fix = str(ctx.get("fix") or fix or "see the README's job file reference")
    elif kind == "extra_forbidden":
        names = list(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
        problem = "unknown field"
        fix = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(names)}"
    elif kind == "missing":
        problem, fix = "is required", fix or "give it a value"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        problem = f"expected a mapping, got {type(value).__name__} {v}"
        fix = "write it as key: value pairs"
    elif kind == "literal_error":
        what = _LITERAL_WHAT.get(leaf, "value")
        problem = f"unknown {what} {v}"
        options = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        fix = f"use one of {options}"
    elif kind.startswith("int_"):
        problem, fix = f"{v} is not an int", fix or "write a whole number"
    elif kind.startswith("float_") or kind == "finite_number":
        problem, fix = f"{v} is not a finite number", fix or "write a number"
    elif kind.startswith("bool_"):
        problem, fix = f"{v} is not true/false", "write true or false"
    elif kind in ("too_long", "string_too_long"):
        problem = f"{v} is too long (at most {ctx.get('max_length')})"
        fix = fix or "shorten it"
    elif kind in ("too_short", "string_too_short"):
        problem = f"{v} is empty" if not value else \
            f"{v} is too short (at least {ctx.get('min_length')})"
        fix = fix or "give it a value"
    elif kind.startswith(("string_", "str_")):
        problem = f"{v} is not a string" if kind == "string_type" else f"{v}: {err['msg']}"
        fix = fix or "write a text value"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ("> ", "gt"), "greater_than_equal": (">= ", "ge"),
                "less_than": ("< ", "lt"), "less_than_equal": ("<= ", "le")}[kind]
        bounds = _bounds(meta)
        if leaf.endswith("fraction") and "gt" in bounds and "lt" in bounds:
            problem = f"{v} is not in ({bounds['gt']:g}, {bounds['lt']:g})"
        elif "ge" in bounds and "lt" in bounds and bounds["lt"] <= 1:
            problem = f"{v} is not in [{bounds['ge']:g}, {bounds['lt']:g})"
        elif "gt" in bounds and "le" in bounds and kind == "less_than_equal":
            problem = f"{v} must be <= {bounds['le']:g}"
        else:
            limit = ctx.get(sign[1], bounds.get(sign[1]))
            problem = f"{v} must be {sign[0]}{limit:g}" if isinstance(limit, (int, float)) \
                else f"{v} must be {sign[0]}{limit}"
        fix = fix or "use a value within the bounds"
    elif kind in ("list_type", "tuple_type"):
        problem, fix = f"{v} is not a list", fix or "write e.g. [linear, mlp]"
    else:
        problem = f"{v}: {err['msg']}"
        fix = fix or "see the README's job file reference"
    return SpecError(field, problem, fix)


def _owner(model: type[BaseModel], loc: list[str]) -> tuple[type[BaseModel] | None, str]:
    """The model class that owns the field at ``loc`` (descending through sections)."""
    owner: type[BaseModel] | None = model
    for i, part in enumerate(loc):
        if owner is None or part not in owner.model_fields:
            return owner, part
        if i == len(loc) - 1:
            return owner, part
        ann = owner.model_fields[part].annotation
        owner = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return owner, ""


def _bounds(meta: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in getattr(meta, "metadata", []) or []:
        for key in ("gt", "ge", "lt", "le"):
            if getattr(m, key, None) is not None:
                out[key] = float(getattr(m, key))
    return out
