"""The resolver's decisions without vLLM: reference parsing, the base check before any fetch,
materialization as a PEFT directory that PEFT reads back, and the plugin's settings. A real
catalog over real gRPC, real PEFT adapters."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from catalog.client import CatalogClient
from catalog.errors import IncompatibleAdapter, InvalidArgument, InvalidReference, NotFound
from catalog.model import Ref, Revision
from catalog.pack import import_peft_dir, read_pack
from catalog.peft_export import NONCE_FILE
from catalog.service.server import create_server, open_catalog
from engine_plugin.vllm import adapters as adapters_module
from engine_plugin.vllm.adapters import CatalogAdapters, base_identity, served_base_identity
from engine_plugin.vllm.node_cache import BOOT_MARKER, USED_STAMP, PeftDirCache
from engine_plugin.vllm.runtime import lora_name_for
from engine_plugin.vllm.settings import PluginSettings
from tests import factories
from tests.servers import running_catalog


class CountingCatalog:
    """The real client, counting the fetches it makes (to show what was never fetched)."""

    def __init__(self, client: CatalogClient) -> None:
        self.client = client
        self.fetches = 0

    def resolve(self, ref: Ref | str) -> Revision:
        return self.client.resolve(ref)

    def fetch(self, ref: Any) -> memoryview:
        self.fetches += 1
        return self.client.fetch(ref)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = factories.build_model(factories.tiny_llama_config())
    return factories.make_peft_adapter(
        model, tmp_path_factory.mktemp("peft") / "a", rank=4, target_modules=("q_proj", "v_proj")
    )


@pytest.fixture
def catalog(tmp_path: Path, peft_dir: Path) -> Iterator[CountingCatalog]:
    with running_catalog(tmp_path / "catalog") as running, running.client() as client:
        client.push(
            "acme/support", import_peft_dir(peft_dir, base_id="org/base-7b"), aliases=["serving"]
        )
        client.push("acme/other", import_peft_dir(peft_dir, base_id="org/another-base"))
        yield CountingCatalog(client)


def adapters_for(catalog: CountingCatalog, tmp_path: Path, base: str = "org/base-7b"):  # type: ignore[no-untyped-def]
    return CatalogAdapters(catalog, PeftDirCache(tmp_path / "node"), base, max_rank=16)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc",
        "acme/support/../../x",
        "acme/has space",
        "a" * 300,
        "acme/" + "n" * 300,
        "acme/support@sha256:abc",  # a digest prefix under 12 hex digits
        "acme/support@0",
        "Acme/Support",
        "acme/support@",
        "",
    ],
)
def test_anything_but_a_reference_is_refused(
    name: str, catalog: CountingCatalog, tmp_path: Path
) -> None:
    adapters = adapters_for(catalog, tmp_path)
    with pytest.raises(InvalidReference):
        adapters.load(name)
    assert catalog.fetches == 0


def test_every_reference_form_resolves_to_one_materialized_directory(
    catalog: CountingCatalog, tmp_path: Path, peft_dir: Path
) -> None:
    adapters = adapters_for(catalog, tmp_path)
    digest = catalog.resolve("acme/support").digest
    names = [
        "acme/support",
        "acme/support@1",
        "acme/support@serving",
        f"acme/support@{digest}",
        f"acme/support@{digest.algorithm}:{digest.hex[:12]}",
    ]
    loaded = [adapters.load(n) for n in names]
    assert {m.path for m in loaded} == {loaded[0].path}
    assert catalog.fetches == 1  # one fetch per host, whatever the name
    # The directory is a PEFT adapter that imports back to the very pack the catalog holds.
    assert import_peft_dir(loaded[0].path, base_id="org/base-7b") == bytes(
        catalog.client.fetch(f"acme/support@{digest}")
    )
    assert (loaded[0].path / "adapter_config.json").read_bytes() == (
        peft_dir / "adapter_config.json"
    ).read_bytes()
    for m in loaded:
        adapters.release(m)


def test_a_wrong_base_is_refused_before_any_fetch(catalog: CountingCatalog, tmp_path: Path) -> None:
    adapters = adapters_for(catalog, tmp_path)
    with pytest.raises(IncompatibleAdapter, match="trained for base 'org/another-base'"):
        adapters.load("acme/other")
    assert catalog.fetches == 0
    assert list((tmp_path / "node" / "adapters").iterdir()) == []


def test_a_rank_above_the_server_limit_is_refused_before_any_fetch(
    catalog: CountingCatalog, tmp_path: Path
) -> None:
    adapters = CatalogAdapters(catalog, PeftDirCache(tmp_path / "node"), "org/base-7b", max_rank=2)
    with pytest.raises(IncompatibleAdapter, match="rank 4, above the engine's --max-lora-rank 2"):
        adapters.load("acme/support")
    assert catalog.fetches == 0


def test_unknown_references_are_not_found(catalog: CountingCatalog, tmp_path: Path) -> None:
    adapters = adapters_for(catalog, tmp_path)
    for name in ("acme/nope", "acme/support@9", "acme/support@canary", "zz/support"):
        with pytest.raises(NotFound):
            adapters.load(name)


def test_base_identity_normalizes_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (tmp_path / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    same = {base_identity(p) for p in ("models/base", "models/base/", str(base), "link")}
    assert same == {str(base.resolve())}
    assert base_identity("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    monkeypatch.delenv("LORACAT_BASE_ID", raising=False)
    assert served_base_identity("models/base") == str(base.resolve())
    # LORACAT_BASE_ID declares the catalog's id for a local copy of a hub model.
    assert served_base_identity("models/base", "org/base-7b") == "org/base-7b"
    monkeypatch.setenv("LORACAT_BASE_ID", "org/base-7b")
    assert served_base_identity("models/base") == "org/base-7b"


def test_a_local_copy_is_served_under_its_declared_base(
    catalog: CountingCatalog, tmp_path: Path
) -> None:
    local = tmp_path / "base-copy"
    local.mkdir()
    refused = adapters_for(catalog, tmp_path, base=served_base_identity(str(local), None))
    with pytest.raises(IncompatibleAdapter):
        refused.resolve("acme/support")
    declared = adapters_for(catalog, tmp_path, base=served_base_identity(str(local), "org/base-7b"))
    assert declared.resolve("acme/support")[1].number == 1


def test_mutable_names_get_one_lora_name_per_revision(catalog: CountingCatalog) -> None:
    revision = catalog.resolve("acme/support")
    assert lora_name_for("acme/support@serving", Ref.parse("acme/support@serving"), revision) == (
        "acme/support@serving#1"
    )
    assert lora_name_for("acme/support", Ref.parse("acme/support"), revision) == "acme/support#1"
    assert (
        lora_name_for("acme/support@1", Ref.parse("acme/support@1"), revision) == "acme/support@1"
    )


def test_settings_read_the_environment_and_vllm_flags(tmp_path: Path) -> None:
    settings = PluginSettings.from_environment(
        {
            "LORACAT_SERVER": "127.0.0.1:7070",
            "LORACAT_VLLM_CACHE_DIR": str(tmp_path),
            "LORACAT_VLLM_CACHE_BYTES": "1000",
        },
        ["--model", "/m", "--port=8123", "--max-loras", "4", "--max-lora-rank", "32", "--x"],
    )
    assert settings.server == "127.0.0.1:7070"
    assert settings.vllm_url == "http://127.0.0.1:8123"
    assert (settings.max_loras, settings.max_lora_rank, settings.max_cpu_loras) == (4, 32, 4)
    assert settings.cache_bytes == 1000 and settings.cache_dir == tmp_path
    assert settings.model == "/m"
    assert not settings.cache_fsync  # ephemeral by default, guarded by the boot id
    served = PluginSettings.from_environment({}, ["serve", "/models/base", "--enable-lora"])
    assert served.model == "/models/base"
    assert not PluginSettings.from_environment({"LORACAT_VLLM_CACHE_FSYNC": "0"}, []).cache_fsync
    assert PluginSettings.from_environment({"LORACAT_VLLM_CACHE_FSYNC": "1"}, []).cache_fsync
    with pytest.raises(InvalidArgument, match="LORACAT_VLLM_CACHE_BYTES"):
        PluginSettings.from_environment({"LORACAT_VLLM_CACHE_BYTES": "lots"}, [])
    with pytest.raises(InvalidArgument, match="must be >= 0"):
        PluginSettings.from_environment({"LORACAT_VLLM_CACHE_BYTES": "-1"}, [])


def test_read_pack_of_the_materialized_revision_matches(
    catalog: CountingCatalog, tmp_path: Path
) -> None:
    adapters = adapters_for(catalog, tmp_path)
    materialized = adapters.load("acme/support@serving")
    pack = read_pack(import_peft_dir(materialized.path, base_id="org/base-7b"))
    assert pack.manifest.rank == 4
    assert materialized.revision.number == 1


class ExportingCatalog(CountingCatalog):
    """The real client with ``ExportPeftDir`` too, counting the export calls."""

    def __init__(self, client: CatalogClient) -> None:
        super().__init__(client)
        self.export_calls = 0

    def export_peft_dir(self, ref: Any, dest: Path, **options: Any) -> tuple[Revision, int]:
        self.export_calls += 1
        return self.client.export_peft_dir(ref, dest, **options)


@contextmanager
def exporting_catalog(root: Path, export_root: Path | None) -> Iterator[ExportingCatalog]:
    catalog = open_catalog(root)
    server, port = create_server(catalog, "127.0.0.1:0", peft_export_root=export_root)
    try:
        with CatalogClient(f"127.0.0.1:{port}", timeout=20) as client:
            yield ExportingCatalog(client)
    finally:
        server.stop(None).wait()
        catalog.close()


def test_a_colocated_catalog_writes_the_directory_and_nothing_is_fetched(
    tmp_path: Path, peft_dir: Path
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    with exporting_catalog(tmp_path / "catalog", node) as catalog:
        catalog.client.push("acme/support", import_peft_dir(peft_dir, base_id="org/base-7b"))
        adapters = CatalogAdapters(catalog, PeftDirCache(node), "org/base-7b")
        loaded = adapters.load("acme/support@1")
        assert (catalog.fetches, catalog.export_calls, adapters.exports) == (0, 1, 1)
        assert "export" in loaded.timings and "fetch" not in loaded.timings
        assert sorted(p.name for p in loaded.path.iterdir()) == sorted(
            ["adapter_config.json", "adapter_model.safetensors", BOOT_MARKER, USED_STAMP]
        )
        assert import_peft_dir(loaded.path, base_id="org/base-7b") == bytes(
            catalog.client.fetch("acme/support@1")
        )
        assert adapters.cache.entries()[0].path == loaded.path


def test_a_catalog_that_cannot_export_is_fetched_from_and_asked_again_later(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with exporting_catalog(tmp_path / "catalog", None) as catalog:
        for rank in (2, 4):
            other = factories.make_peft_adapter(
                factories.build_model(factories.tiny_llama_config()),
                tmp_path / f"r{rank}",
                rank=rank,
                target_modules=("q_proj",),
            )
            catalog.client.push("acme/support", import_peft_dir(other, base_id="org/base-7b"))
        adapters = CatalogAdapters(catalog, PeftDirCache(tmp_path / "node"), "org/base-7b")
        first = adapters.load("acme/support@1")
        assert (catalog.fetches, catalog.export_calls, adapters.exports) == (1, 1, 0)
        assert "fetch" in first.timings
        assert not any(p.name == NONCE_FILE for p in first.path.iterdir())
        adapters.load("acme/support@2")  # within EXPORT_RETRY_S: not asked again
        assert (catalog.fetches, catalog.export_calls) == (2, 1)
        monkeypatch.setattr(adapters_module, "EXPORT_RETRY_S", 0.0)
        adapters.cache.release(first.revision.digest)
        (first.path / BOOT_MARKER).unlink()  # make it stale: written again
        adapters.load("acme/support@1")
        assert (catalog.fetches, catalog.export_calls) == (3, 2)
    off = CatalogAdapters(catalog, PeftDirCache(tmp_path / "n2"), "b", server_export=False)
    assert not off.server_export


class ResolveCountingCatalog(ExportingCatalog):
    """:class:`ExportingCatalog` counting resolves too; each export waits ``export_delay_s``
    first, so that concurrent first requests overlap it."""

    def __init__(self, client: CatalogClient, export_delay_s: float = 0.0) -> None:
        super().__init__(client)
        self.resolves = 0
        self.export_delay_s = export_delay_s

    def resolve(self, ref: Ref | str) -> Revision:
        self.resolves += 1
        return super().resolve(ref)

    def export_peft_dir(self, ref: Any, dest: Path, **options: Any) -> tuple[Revision, int]:
        time.sleep(self.export_delay_s)
        return super().export_peft_dir(ref, dest, **options)


def test_the_first_cold_request_is_one_export_and_no_resolve(
    tmp_path: Path, peft_dir: Path
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    with exporting_catalog(tmp_path / "catalog", node) as exporting:
        exporting.client.push(
            "acme/support", import_peft_dir(peft_dir, base_id="org/base-7b"), aliases=["serving"]
        )
        catalog = ResolveCountingCatalog(exporting.client)
        adapters = CatalogAdapters(catalog, PeftDirCache(node), "org/base-7b", max_rank=16)
        first = adapters.load("acme/support@serving")
        assert (catalog.resolves, catalog.export_calls, catalog.fetches) == (0, 1, 0)
        assert first.revision.number == 1 and set(first.timings) == {"export"}
        assert import_peft_dir(first.path, base_id="org/base-7b") == bytes(
            exporting.client.fetch("acme/support@1")
        )
        # Another vLLM process on the node: the name was asked for, so it resolves and finds
        # the directory by digest.
        other = CatalogAdapters(catalog, PeftDirCache(node), "org/base-7b", max_rank=16)
        again = other.load("acme/support@serving")
        assert again.path == first.path and again.revision == first.revision
        assert (catalog.resolves, catalog.export_calls) == (1, 1)
        # The alias moves: the name resolves to the new revision (what hot swap relies on).
        second = factories.make_peft_adapter(
            factories.build_model(factories.tiny_llama_config()), tmp_path / "b", rank=2
        )
        exporting.client.push("acme/support", import_peft_dir(second, base_id="org/base-7b"))
        exporting.client.set_alias("acme/support", "serving", 2)
        moved = adapters.load("acme/support@serving")
        assert moved.revision.number == 2 and moved.path != first.path
        assert (catalog.resolves, catalog.export_calls) == (2, 2)


def test_a_misfit_first_request_is_refused_by_the_export_and_leaves_nothing(
    tmp_path: Path, peft_dir: Path
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    with exporting_catalog(tmp_path / "catalog", node) as exporting:
        exporting.client.push("acme/other", import_peft_dir(peft_dir, base_id="org/another-base"))
        catalog = ResolveCountingCatalog(exporting.client)
        adapters = CatalogAdapters(catalog, PeftDirCache(node), "org/base-7b", max_rank=16)
        with pytest.raises(
            IncompatibleAdapter, match=r"trained for base 'org/another-base'.*LORACAT_BASE_ID"
        ):
            adapters.load("acme/other")
        small = CatalogAdapters(catalog, PeftDirCache(node), "", max_rank=2)
        with pytest.raises(
            IncompatibleAdapter, match="rank 4, above the engine's --max-lora-rank 2"
        ):
            small.load("acme/other@1")
        with pytest.raises(NotFound):
            adapters.load("acme/missing")
        assert (catalog.resolves, catalog.export_calls, catalog.fetches) == (0, 3, 0)
        assert list((node / "adapters").iterdir()) == [] and list((node / "tmp").iterdir()) == []
        # Refusals are answers about the revision, not about exporting: the export path stays on.
        assert adapters._may_export()


def test_concurrent_first_requests_through_the_catalog_export_once(
    tmp_path: Path, peft_dir: Path
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    with exporting_catalog(tmp_path / "catalog", node) as exporting:
        exporting.client.push(
            "acme/support", import_peft_dir(peft_dir, base_id="org/base-7b"), aliases=["serving"]
        )
        catalog = ResolveCountingCatalog(exporting.client, export_delay_s=0.3)
        # One CatalogAdapters (and node cache, with its own lock files) per would-be process.
        each = [CatalogAdapters(catalog, PeftDirCache(node), "org/base-7b") for _ in range(4)]
        barrier = threading.Barrier(len(each))

        def first_request(adapters: CatalogAdapters) -> Path:
            barrier.wait()
            return adapters.load("acme/support@serving").path

        with ThreadPoolExecutor(len(each)) as pool:
            paths = list(pool.map(first_request, each))
        assert len(set(paths)) == 1
        assert (catalog.export_calls, catalog.resolves, catalog.fetches) == (1, 3, 0)
        assert sum(a.cache.counters.misses for a in each) == 1
