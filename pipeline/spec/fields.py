"""What every spec section shares: the frozen base model and the strict number types."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic_core import PydanticCustomError

from pipeline.errors import short
from pipeline.spec.validation import spec_error


def no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("ff", "{value} is not a number", {"value": short(value)})
    return value


def fix(text: str) -> Any:
    return {"fix": text}


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(no_bool), Field(allow_inf_nan=False)]
Fraction01 = Annotated[Float, Field(gt=0, lt=1)]
Share = Annotated[Float, Field(gt=0, le=1)]


class Section(BaseModel):
    """A spec section: frozen, unknown keys refused, errors mapped to :class:`SpecError`."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)
    section: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise spec_error(exc, type(self), self.section) from None

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (nested sections merge dicts), validated again."""
        return type(self)(**merge(self.model_dump(), changes))


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
