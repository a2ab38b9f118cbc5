"""Safe, deterministic identifiers for collections, products and datasets."""

from __future__ import annotations

import re

from skyvault.errors import InvalidIdentifierError

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe identifier, else raise naming it.

    Safe ids are 1-200 characters of ``[A-Za-z0-9._-]``, start with a letter, a digit or ``_``
    (never ``.`` or ``-``) and never contain ``..``; they can be used as a path segment or object
    key segment as they are.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        raise InvalidIdentifierError(
            f"invalid {what} {value!r}: use at most 200 letters, digits, '.', '_' or '-', starting "
            "with a letter, digit or '_', no '..' or '/'"
        )
    return value


def product_id_from_name(name: str) -> str:
    """Derive a product id from a file name or browse identifier (extension dropped).

    Raises:
        InvalidIdentifierError: the name contains ``..``, ``/`` or characters outside the safe set.

    """
    stem = name
    for ext in (".tif", ".tiff", ".TIF", ".TIFF", ".xml", ".json", ".vrt", ".jp2"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return check_id(stem, "product id")
