"""The plugin's runtime without a vLLM process: hot swap, warming and bookkeeping decisions
against a real catalog over gRPC and a real node cache. vLLM's admin routes are stood in for by
a recorder (the real routes are exercised end to end in ``test_vllm_server.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.client import CatalogClient
from catalog.pack import import_peft_dir
from engine_plugin.vllm import runtime as runtime_module
from engine_plugin.vllm.runtime import LoracatRuntime
from engine_plugin.vllm.settings import PluginSettings
from tests import factories
from tests.servers import running_catalog


class AdminRecorder:
    """Stands in for vLLM's admin routes: keeps a name table as vLLM would."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # lora_name -> path
        self.calls: list[tuple[str, str]] = []

    def healthy(self) -> bool:
        return True

    def loaded(self) -> list[str]:
        return list(self.names)

    def load(self, name: str, path: str) -> None:
        self.calls.append(("load", name))
        self.names[name] = path

    def unload(self, name: str) -> bool:
        self.calls.append(("unload", name))
        return any(self.names.pop(k) for k in list(self.names) if k.split("#")[0] == name)


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    model = factories.build_model(factories.tiny_llama_config())
    out = tmp_path_factory.mktemp("peft")
    return [
        import_peft_dir(
            factories.make_peft_adapter(model, out / f"a{i}", rank=4, seed=i),
            base_id="org/base",
        )
        for i in range(3)
    ]


@pytest.fixture
def client(tmp_path: Path, packs: list[bytes]) -> Iterator[CatalogClient]:
    with running_catalog(tmp_path / "catalog") as running, running.client() as client:
        client.push("acme/s", packs[0], aliases=["serving"])
        client.push("acme/s", packs[1])
        client.push("acme/w", packs[2])
        yield client


def make_runtime(client: CatalogClient, tmp_path: Path, **env: str) -> LoracatRuntime:
    settings = PluginSettings.from_environment(
        {
            "LORACAT_SERVER": client.target,
            "LORACAT_BASE_ID": "org/base",
            "LORACAT_VLLM_CACHE_DIR": str(tmp_path / "node"),
            "LORACAT_ENGINE_ID": "vllm-test",
            **env,
        },
        ["--max-loras", "2", "--max-cpu-loras", "2"],
    )
    return LoracatRuntime(settings, catalog=client, admin=AdminRecorder(), start=False)  # type: ignore[arg-type]


def test_an_alias_move_drops_the_name_and_the_next_resolve_gets_the_new_revision(
    client: CatalogClient, tmp_path: Path
) -> None:
    runtime = make_runtime(client, tmp_path)
    admin: AdminRecorder = runtime.admin  # type: ignore[assignment]
    first = runtime.resolve("acme/s@serving")
    pinned = runtime.resolve("acme/s@1")
    admin.names.update({first.lora_name: str(first.path), pinned.lora_name: str(pinned.path)})
    assert first.lora_name == "acme/s@serving#1" and pinned.lora_name == "acme/s@1"

    runtime.check_once()
    assert admin.calls == []  # nothing moved

    client.set_alias("acme/s", "serving", 2, expected=1)
    runtime.attach("acme/s@2")  # the hint
    runtime.check_once()
    assert ("unload", "acme/s@serving") in admin.calls
    assert ("unload", "acme/s@1") not in admin.calls  # immutable names never move
    assert "acme/s@serving" not in runtime.bindings()
    # The new revision is on node disk already, before any request asked for it.
    second_digest = str(client.resolve("acme/s@2").digest)
    assert second_digest in {e.key.replace("-", ":", 1) for e in runtime.cache.entries()}
    # The old directory stays held through the grace period (requests in flight).
    assert str(first.revision.digest) in runtime.cache.held()
    again = runtime.resolve("acme/s@serving")
    assert again.lora_name == "acme/s@serving#2"
    assert str(again.revision.digest) == second_digest


def test_the_old_revision_is_released_after_the_grace_period(
    client: CatalogClient, tmp_path: Path
) -> None:
    runtime = make_runtime(client, tmp_path, LORACAT_VLLM_RELEASE_GRACE_S="0")
    admin: AdminRecorder = runtime.admin  # type: ignore[assignment]
    first = runtime.resolve("acme/s@serving")
    admin.names[first.lora_name] = str(first.path)
    client.set_alias("acme/s", "serving", 2, expected=1)
    runtime.check_once()
    runtime.check_once()
    assert str(first.revision.digest) not in runtime.cache.held()


def test_a_catalog_that_is_down_changes_nothing_vllm_holds(
    client: CatalogClient, tmp_path: Path
) -> None:
    runtime = make_runtime(client, tmp_path)
    admin: AdminRecorder = runtime.admin  # type: ignore[assignment]
    first = runtime.resolve("acme/s@serving")
    admin.names[first.lora_name] = str(first.path)
    runtime.catalog = CatalogClient("127.0.0.1:1", timeout=1.0)  # nothing listens there
    runtime.check_once()
    assert admin.calls == []
    assert runtime.bindings()["acme/s@serving"] == first
    assert runtime.counters["recheck_errors"] == 1


def test_hinted_revisions_are_loaded_into_vllm_within_its_cpu_cache(
    client: CatalogClient, tmp_path: Path
) -> None:
    runtime = make_runtime(client, tmp_path)
    admin: AdminRecorder = runtime.admin  # type: ignore[assignment]
    runtime.prefetch(["acme/s@1", "acme/s@2", "acme/w@1"])
    runtime.check_once()
    # --max-cpu-loras 2: two this pass, the third the next.
    assert [c for c in admin.calls if c[0] == "load"] == [
        ("load", "acme/s@1"),
        ("load", "acme/s@2"),
    ]
    runtime.check_once()
    assert ("load", "acme/w@1") in admin.calls
    assert set(runtime.bindings()) == {"acme/s@1", "acme/s@2", "acme/w@1"}
    assert all(Path(p, "adapter_config.json").is_file() for p in admin.names.values())


def test_names_vllm_no_longer_lists_are_forgotten(
    client: CatalogClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime(client, tmp_path, LORACAT_VLLM_RELEASE_GRACE_S="0")
    runtime.resolve("acme/w")  # resolved, but vLLM never registered it (its load failed)
    monkeypatch.setattr(runtime_module, "STALE_AFTER_S", 0.0)
    runtime.check_once()
    assert runtime.bindings() == {}
    assert runtime.cache.held() == []
    assert runtime.counters["dropped"] == 1
