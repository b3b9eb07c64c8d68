"""Passing a KV cache to a transformers causal LM, and reading it back, on either side of the
rename of ``past_key_values`` to ``cache``.

Newer transformers (5.25 in the dev venv) name the model's cache argument and output field
``cache``; ``past_key_values`` still works there but warns that it is deprecated (a
``FutureWarning`` per call, and a logged warning for the output field) and goes in 5.40. Older
ones (5.17 on the GPU machine, 5.19 in the vLLM venv) know only ``past_key_values``, and would
take ``cache=`` silently into their ``**kwargs`` and run without the cache. So the name is read
from the model's own ``forward`` signature, never guessed from a version number.
"""

from __future__ import annotations

import inspect
from typing import Any

_NEW_NAME = "cache"
_OLD_NAME = "past_key_values"


def cache_keyword(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache under: ``cache`` where its signature
    names it, else ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return _NEW_NAME if _NEW_NAME in parameters else _OLD_NAME


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to pass ``cache`` to ``model`` (or to a wrapper that forwards its
    keyword arguments to it, such as ``ResidentEngine.forward`` or a PEFT model)."""
    return {cache_keyword(model): cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a model's output holds (its ``cache`` field, or ``past_key_values`` on older
    transformers).

    Raises:
        KeyError: the output holds no cache (the call did not use one).
    """
    # A transformers ModelOutput is a mapping of the fields that are set.
    if _NEW_NAME in output:
        return output[_NEW_NAME]
    if _OLD_NAME in output:
        return output[_OLD_NAME]
    raise KeyError(f"the model's output holds no KV cache (fields: {', '.join(output)})")
