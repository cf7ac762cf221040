"""The one kind of settings model, pydantic's v1 API (as adetailer uses it on both WebUIs): the generation
options, both training configs and the evaluation config declare their fields with it. Forge's pydantic 2
keeps that API as `pydantic.v1`; A1111 pins pydantic 1."""

from __future__ import annotations

try:
    from pydantic.v1 import BaseModel, Extra, Field, ValidationError, validator
except ImportError:
    from pydantic import BaseModel, Extra, Field, ValidationError, validator

__all__ = ["BaseModel", "Extra", "Field", "Settings", "ValidationError", "problems_of", "validator"]


class Settings(BaseModel):
    """A config: unknown keys are refused, values converted to the declared types, or refused."""

    class Config:
        extra = Extra.forbid
        arbitrary_types_allowed = True


def problems_of(error: ValidationError) -> str:
    """'key: reason; ...', as a user reads it (a misspelt key: 'key: unknown setting')."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {'unknown setting' if e['type'] == 'value_error.extra' else e['msg']}"
        for e in error.errors()
    )
