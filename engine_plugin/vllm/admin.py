"""vLLM's own HTTP admin API, called from inside the server's process (no vLLM imports).

Swapping a name to a new revision and warming a hinted adapter go through the routes vLLM
documents for that (``/v1/unload_lora_adapter`` and ``/v1/load_lora_adapter``, enabled by
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), not through vLLM's internals, so they keep vLLM's
own per-name locking. Every call has a timeout.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from catalog.errors import FailedPrecondition, NotFound, Unavailable

TIMEOUT_S = 30.0


class VllmAdmin:
    """The admin routes of one vLLM server at ``url`` (``http://127.0.0.1:8000``)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = TIMEOUT_S):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def healthy(self) -> bool:
        """Whether the server answers ``/health`` with 200."""
        try:
            self._call("GET", "/health", None, timeout=2.0)
        except (Unavailable, NotFound, FailedPrecondition):
            return False
        return True

    def loaded(self) -> list[str]:
        """The ``lora_name`` of every adapter vLLM has registered (``/v1/models``).

        Raises ``Unavailable``."""
        body = self._call("GET", "/v1/models", None)
        return [m["id"] for m in body.get("data", []) if m.get("parent")]

    def load(self, name: str, path: str) -> None:
        """Register ``name`` with the adapter at ``path`` (vLLM loads it into its LoRA cache).

        Raises:
            FailedPrecondition: vLLM refused it (already registered, shapes, rank).
            Unavailable: the server cannot be reached.
        """
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload(self, name: str) -> bool:
        """Drop ``name`` from vLLM's table (requests already running keep their adapter);
        False when it was not registered. Raises ``Unavailable``."""
        try:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except NotFound:
            return False
        return True

    def _call(
        self, method: str, route: str, payload: dict[str, Any] | None, timeout: float | None = None
    ) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + route, data=data, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _message(exc.read())
            if exc.code == 404:
                raise NotFound(f"vLLM {route}: {detail}") from None
            if 400 <= exc.code < 500:
                raise FailedPrecondition(f"vLLM {route}: {detail}") from None
            raise Unavailable(f"vLLM {route} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"vLLM at {self.url} unreachable: {exc}") from None
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            return {"text": raw.decode(errors="replace")}
        return parsed if isinstance(parsed, dict) else {"value": parsed}


def _message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(body)[:500]
