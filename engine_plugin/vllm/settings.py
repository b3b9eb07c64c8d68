"""The plugin's settings: environment variables, with vLLM's own command line as the fallback.

vLLM constructs the resolver without arguments, so everything the plugin needs arrives through
the environment. Where vLLM's flags already say it (the port the server listens on, its LoRA
limits), the plugin reads them from the command line instead of asking for them twice.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from catalog.errors import InvalidArgument

DEFAULT_CACHE_BYTES = 8 << 30


def _vllm_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The few vLLM server flags the plugin reads, as vLLM parses them (``--port 8000`` and
    ``--port=8000``); everything else on the command line is ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-cpu-loras", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    flags, rest = parser.parse_known_args(list(argv))
    # `vllm serve MODEL ...` (the GPU build's command) names the model positionally.
    if flags.model is None and len(rest) >= 2 and rest[0] == "serve" and rest[1][:1] != "-":
        flags.model = rest[1]
    return flags


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "")
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"{name}={text!r} is not a number") from None


@dataclass(frozen=True)
class PluginSettings:
    """Everything the vLLM plugin is configured with.

    Environment (all optional except ``LORACAT_SERVER``):

    * ``LORACAT_SERVER``: the catalog's gRPC address (``127.0.0.1:7070``).
    * ``LORACAT_BASE_ID``: the catalog's base id for the served model, when it differs from the
      model path vLLM serves (a hub id for a local copy).
    * ``LORACAT_VLLM_CACHE_DIR``: the node-local directory cache, shared by every vLLM process
      on the host (default ``$TMPDIR/loracat-vllm``); ``LORACAT_VLLM_CACHE_BYTES`` its budget
      (default 8 GiB; 0 = unbounded); ``LORACAT_VLLM_CACHE_POLICY`` its eviction policy;
      ``LORACAT_VLLM_CACHE_FSYNC=1`` fsyncs each directory so that it is served after a
      reboot too (by default directories are valid for the boot that wrote them, guarded by
      a boot-id marker, and nothing is fsynced; see ``node_cache``).
    * ``LORACAT_VLLM_SERVER_EXPORT=0``: never ask the catalog to write the PEFT files (by
      default a catalog on this host started with ``--peft-export-root`` over the cache
      directory writes them; any other catalog is fetched from, as with ``0``).
    * ``LORACAT_VLLM_URL``: this vLLM server's own URL, for the admin calls that swap and warm
      adapters (default ``http://127.0.0.1:<--port>``).
    * ``LORACAT_ENGINE_ID``: the id this vLLM registers with (default ``vllm-<host>-<port>``).
    * ``LORACAT_VLLM_RECHECK_S``: how often mutable names are re-resolved (default 1 s; hints
      from the catalog wake the checker at once).
    * ``LORACAT_VLLM_WARM``: ``0`` turns hint-driven warming off.
    * ``LORACAT_VLLM_RELEASE_GRACE_S``: how long a replaced revision's directory stays held
      (requests in flight on it may still need it; default 300 s).
    """

    server: str
    base_id: str | None
    cache_dir: Path
    cache_bytes: int
    cache_policy: str
    cache_fsync: bool
    server_export: bool
    vllm_url: str
    api_key: str | None
    engine_id: str
    model: str | None
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    recheck_s: float
    warm: bool
    release_grace_s: float

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
    ) -> PluginSettings:
        """Read the settings. Raises ``InvalidArgument`` for a malformed value."""
        env = os.environ if env is None else env
        flags = _vllm_flags(sys.argv[1:] if argv is None else argv)
        port = flags.port
        url = env.get("LORACAT_VLLM_URL") or f"http://127.0.0.1:{port}"
        cache_bytes = int(_number(env, "LORACAT_VLLM_CACHE_BYTES", DEFAULT_CACHE_BYTES))
        if cache_bytes < 0:
            raise InvalidArgument(f"LORACAT_VLLM_CACHE_BYTES must be >= 0, got {cache_bytes}")
        cache_dir = env.get("LORACAT_VLLM_CACHE_DIR") or str(
            Path(tempfile.gettempdir()) / "loracat-vllm"
        )
        return cls(
            server=env.get("LORACAT_SERVER", ""),
            base_id=env.get("LORACAT_BASE_ID") or None,
            cache_dir=Path(cache_dir),
            cache_bytes=cache_bytes,
            cache_policy=env.get("LORACAT_VLLM_CACHE_POLICY", "lru"),
            cache_fsync=env.get("LORACAT_VLLM_CACHE_FSYNC", "0") not in ("", "0"),
            server_export=env.get("LORACAT_VLLM_SERVER_EXPORT", "1") != "0",
            vllm_url=url.rstrip("/"),
            api_key=env.get("VLLM_API_KEY") or flags.api_key,
            engine_id=env.get("LORACAT_ENGINE_ID") or f"vllm-{socket.gethostname()}-{port}",
            model=flags.model,
            max_loras=flags.max_loras,
            max_lora_rank=flags.max_lora_rank,
            max_cpu_loras=flags.max_cpu_loras or flags.max_loras,
            recheck_s=_number(env, "LORACAT_VLLM_RECHECK_S", 1.0),
            warm=env.get("LORACAT_VLLM_WARM", "1") != "0",
            release_grace_s=_number(env, "LORACAT_VLLM_RELEASE_GRACE_S", 300.0),
        )
