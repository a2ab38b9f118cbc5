"""Credentials of gateway callers: HTTP Basic or a bearer token, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac

from skyvault.config.settings import GatewaySettings
from skyvault.errors import AuthenticationError, ConfigError


def check_configured(settings: GatewaySettings) -> None:
    """Refuse to serve without any credentials to check.

    Raises:
        ConfigError: neither ``gateway.username`` + ``gateway.password`` nor ``gateway.token`` is set.

    """
    if settings.token is None and (settings.username is None or settings.password is None):
        raise ConfigError(
            "the gateway needs credentials: gateway.username with gateway.password "
            "(SKYVAULT_GATEWAY__PASSWORD_FILE) or gateway.token (SKYVAULT_GATEWAY__TOKEN_FILE)"
        )


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def authenticate(authorization: str | None, settings: GatewaySettings) -> str:
    """Who sent a request, from its ``Authorization`` header: the Basic user name or ``bearer``.

    Raises:
        AuthenticationError: no credentials, a scheme that is not configured, or wrong ones.

    """
    if not authorization:
        raise AuthenticationError("credentials are required (HTTP Basic or a bearer token)")
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and settings.token is not None:
        if _same(value, settings.token.get_secret_value()):
            return "bearer"
        raise AuthenticationError("the bearer token is not valid")
    if scheme == "basic" and settings.username is not None and settings.password is not None:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationError("HTTP Basic credentials are not valid base64 'user:password'") from None
        ok_user = _same(user, settings.username)
        ok_password = _same(password, settings.password.get_secret_value())
        if sep and ok_user and ok_password:
            return user
        raise AuthenticationError("wrong user name or password")
    raise AuthenticationError(f"authorization scheme {scheme!r} is not accepted here")
