"""The client's HTTP: one ``httpx.Client``, and which failures are worth a retry.

A server that is down, restarting or slow (refused or broken connections, a read that takes
longer than ``timeout_s``, HTTP 502 / 503 / 504) raises :class:`Transient`, which the teacher
retries with backoff (:mod:`kdkit.lm.serve.client`). Any other answer above 399 is the server
saying no to this request, which a retry would not change: a one-line :class:`KDError` with the
server's own message (HTTP 401 names the token's environment variable).
"""

from __future__ import annotations

import importlib
import logging
import socket
from typing import Any

from kdkit.errors import KDError

__all__ = ["Http", "Refused", "Transient", "require_httpx"]

_HINT = "pip install 'kdkit[serve]'"


class Transient(Exception):
    """A failure that a later try may not have (the server down, restarting or slow)."""


class Refused(KDError):
    """The server answered this request with an HTTP error (``status``): a retry would not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def require_httpx() -> Any:
    try:
        return importlib.import_module("httpx")
    except ImportError as e:
        raise KDError(f"a served teacher needs the 'httpx' package ({e}); {_HINT}") from None


def server_message(response: Any) -> str:
    """The error message of a vLLM-style (``{"error": {"message"}}``), SGLang-style
    (``{"message"}``) or FastAPI-style (``{"detail"}``) JSON body, else its first line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error,
                      body.get("message"), body.get("detail")):  # fmt: skip
            if isinstance(value, str) and value:
                return value.splitlines()[0][:300]
    text = response.text.strip().splitlines()
    return text[0][:300] if text else "(no message)"


class Http:
    """``httpx.Client`` for one server: its base URL, the shared token and the per-request
    timeout; :meth:`request` sorts failures into :class:`Transient` and :class:`KDError`."""

    def __init__(self, url: str, *, token: str | None, token_env: str, timeout_s: float) -> None:
        httpx = require_httpx()
        quiet = logging.getLogger("httpx")  # a line per request at INFO: thousands per run
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
        self.url, self.token_env, self.timeout_s = url.rstrip("/"), token_env, timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self._httpx = httpx
        # headers and body go out as two writes: without TCP_NODELAY, Nagle's algorithm holds
        # the body until the server's delayed ACK (~40 ms a request, measured on loopback)
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.HTTPTransport(socket_options=nodelay)
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        httpx = self._httpx
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise Transient(f"no answer within {self.timeout_s:g} s") from None
        except httpx.TransportError as err:
            first = (str(err) or type(err).__name__).splitlines()[0]
            raise Transient(f"{type(err).__name__}: {first}") from None
        status = response.status_code
        if status in (502, 503, 504):
            raise Transient(f"HTTP {status} ({server_message(response)})")
        if status in (401, 403):
            raise Refused(
                f"the served teacher at {self.url} refused this client (HTTP {status}: "
                f"{server_message(response)}); set ${self.token_env} to the server's token",
                status,
            )
        if status >= 400:
            raise Refused(
                f"the served teacher at {self.url} answered {method} {path} with HTTP {status}: "
                f"{server_message(response)}",
                status,
            )
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise KDError(f"the served teacher at {self.url}: {path} did not answer JSON") from None

    def close(self) -> None:
        self.client.close()
