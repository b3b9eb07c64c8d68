"""loracat as the adapter source of vLLM (the ``loracat[vllm]`` extra).

vLLM loads this through the entry point ``loracat`` of the ``vllm.general_plugins`` group
(``VLLM_PLUGINS=loracat`` selects it) and calls :func:`register` in each of its processes::

    LORACAT_SERVER=127.0.0.1:7070 VLLM_PLUGINS=loracat VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
      python -m vllm.entrypoints.openai.api_server --model BASE_DIR --enable-lora ...

Then a request whose ``model`` is a loracat reference (``acme/support@serving``) is served by
that revision. The parts: ``resolver`` (vLLM's ``LoRAResolver``), ``runtime`` (names, hot swap,
warming, residency), ``adapters`` (parse, resolve, base check, materialize), ``node_cache``
(node-local PEFT directories shared by the host's vLLM processes), ``admin`` (vLLM's HTTP admin
routes), ``settings`` (environment). Only ``resolver`` and :func:`register` import vLLM.
"""

from __future__ import annotations

import logging
import multiprocessing

log = logging.getLogger(__name__)

#: The resolver's name in vLLM's ``LoRAResolverRegistry``.
RESOLVER_NAME = "loracat"


def register() -> None:
    """vLLM's plugin hook: register the loracat resolver (``LORACAT_SERVER`` must be set).

    vLLM calls it in every process it starts. Resolvers are called only in API server
    processes; in the main one the plugin connects to the catalog as soon as vLLM's server
    answers and follows its hints, which warms adapters before their first request. In any
    other process (an engine core, or an extra API server of ``--api-server-count``) it
    connects at its first resolve, if one ever comes. Hot swap and warming assume one API
    server process (the default): they call the server's own admin routes, which a port shared
    by several API servers would spread among them.

    Raises:
        InvalidArgument: a malformed ``LORACAT_*`` setting.
    """
    from engine_plugin.vllm.settings import PluginSettings

    settings = PluginSettings.from_environment()
    if not settings.server:
        log.warning("loracat vLLM plugin loaded without LORACAT_SERVER: not registering")
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    _log_like_vllm()

    from engine_plugin.vllm.resolver import LoracatResolver
    from engine_plugin.vllm.runtime import RuntimeStarter

    # The catalog connection opens once vLLM serves (see RuntimeStarter), not here.
    starter = RuntimeStarter(settings, eager=multiprocessing.parent_process() is None)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, LoracatResolver(starter))
    log.info(
        "loracat resolver registered: catalog %s, node cache %s, engine id %s",
        settings.server,
        settings.cache_dir,
        settings.engine_id,
    )


class _ToVllmLogger(logging.Handler):
    """Hands records to the ``vllm`` logger, whose handlers vLLM sets up (at some point after
    plugins load), so the plugin's records appear in vLLM's log, formatted as vLLM's."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def _log_like_vllm() -> None:
    """Send the plugin's log records where vLLM sends its own (vLLM configures only the
    ``vllm`` logger, so ours would otherwise show warnings only, on stderr)."""
    ours = logging.getLogger("engine_plugin")
    if any(isinstance(h, _ToVllmLogger) for h in ours.handlers):
        return
    ours.addHandler(_ToVllmLogger())
    ours.setLevel(logging.INFO)
    ours.propagate = False
