"""The vLLM ``LoRAResolver`` that takes adapters from a loracat catalog.

vLLM calls ``resolve_lora(base_model_name, lora_name)`` the first time a request names a model it
does not know (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), under its own per-name lock, on
its event loop; the catalog calls and the fetch run on a worker thread. What vLLM answers the
client follows from what this returns or raises (checked in vLLM 0.32's
``entrypoints/serve/exception_handling``):

* a name without ``/`` is not a loracat reference: ``None`` (other resolvers may know it; vLLM
  answers 404);
* a malformed reference (``../../etc``, spaces, 300 characters) or a revision trained for another
  base: ``VLLMValidationError``, a 400 naming the problem;
* an unknown adapter, revision or alias: ``VLLMNotFoundError``, a 404 with the catalog's message;
* the catalog unreachable: ``GracefulHTTPError`` 503 (retry later); names already loaded keep
  being served, since vLLM does not ask the resolver about them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError, VLLMNotFoundError, VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from catalog.errors import (
    CatalogError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from engine_plugin.vllm.runtime import Binding, LoracatRuntime, RuntimeStarter

log = logging.getLogger(__name__)


class LoracatResolver(LoRAResolver):  # type: ignore[misc]  # vLLM is untyped to mypy
    """Resolves loracat references (``t/n``, ``t/n@7``, ``t/n@serving``, ``t/n@sha256:...``)
    to PEFT directories materialized on node-local disk (see the module docstring)."""

    def __init__(self, runtime: LoracatRuntime | RuntimeStarter) -> None:
        self._runtime = runtime

    @property
    def runtime(self) -> LoracatRuntime:
        if isinstance(self._runtime, RuntimeStarter):
            return self._runtime.get()
        return self._runtime

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if "/" not in lora_name:
            return None
        started = time.perf_counter()

        def resolve() -> Binding:
            runtime = self.runtime  # built at the first resolve if vLLM's server is not up yet
            runtime.settle_base(base_model_name)
            return runtime.resolve(lora_name)

        try:
            # One hop to a worker thread and back: each hop waits for the GIL, which vLLM's
            # API server holds often, and the cold path is timed against a plain download.
            binding = await asyncio.to_thread(resolve)
        except InvalidArgument as exc:
            raise VLLMValidationError(f"loracat: {exc}", parameter="model") from None
        except NotFound as exc:
            raise VLLMNotFoundError(f"loracat: {exc}") from None
        except FailedPrecondition as exc:
            raise VLLMValidationError(f"loracat: {exc}", parameter="model") from None
        except (Unavailable, DeadlineExceeded) as exc:
            raise GracefulHTTPError(
                f"loracat: the catalog is unavailable, {lora_name!r} cannot be resolved now "
                f"(adapters already loaded keep serving): {exc}",
                HTTPStatus.SERVICE_UNAVAILABLE,
            ) from None
        except CatalogError as exc:
            raise GracefulHTTPError(
                f"loracat: {lora_name!r} could not be materialized: {exc}",
                HTTPStatus.BAD_GATEWAY,
            ) from None
        revision = binding.revision
        log.info(
            "loracat resolved %s to %s@%d (%s) at %s in %.1f ms (%s)",
            lora_name,
            revision.adapter,
            revision.number,
            revision.digest.short,
            binding.path,
            (time.perf_counter() - started) * 1e3,
            ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in binding.materialized.timings.items()),
        )
        # vLLM replaces the id with its own counter; it must only be >= 1 here.
        return LoRARequest(lora_name=binding.lora_name, lora_int_id=1, lora_path=str(binding.path))
