"""Parsing request payloads into typed models, with errors that name the field at fault."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from skyvault.config.settings import LimitSettings
from skyvault.discovery.reports import json_depth
from skyvault.errors import RequestError

M = TypeVar("M", bound=BaseModel)


def json_object(data: bytes, limits: LimitSettings) -> dict[str, Any]:
    """The JSON object in a request body (nesting checked before parsing).

    Raises:
        RequestError: not UTF-8 JSON, not an object, or nested deeper than ``limits``.

    """
    if json_depth(data) > limits.max_nesting_depth:
        raise RequestError(
            f"request body is nested deeper than limits.max_nesting_depth = {limits.max_nesting_depth}",
            field="body",
        )
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"request body is not UTF-8 JSON: {e}", field="body") from e
    if not isinstance(doc, dict):
        raise RequestError(f"request body must be a JSON object, got {type(doc).__name__}", field="body")
    return doc


def validated(model: type[M], doc: dict[str, Any]) -> M:
    """``doc`` as ``model``.

    Raises:
        RequestError: a field is missing or of the wrong type; ``field`` names the first one and
            the message names every one.

    """
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        problems = [(".".join(str(p) for p in err["loc"]) or "body", err["msg"]) for err in e.errors()]
        text = "; ".join(f"{where}: {msg}" for where, msg in problems)
        raise RequestError(f"invalid request: {text}", field=problems[0][0]) from e
