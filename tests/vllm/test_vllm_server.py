"""loracat as vLLM's adapter source, end to end: the real vLLM CPU build (its own venv), the real
loracat server as a process, real PEFT adapters on a tiny Llama made here.

One vLLM server serves the whole module (a start costs ~25-50 s on two cores). It serves three
adapters from local paths (``--lora-modules``) beside the loracat resolver, so every loracat
answer is compared with vLLM serving the very same PEFT directory itself. The test that stops
and restarts the catalog runs last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog.pack import import_peft_dir
from tests.vllm.harness import (
    ALL_LINEARS,
    CatalogProcess,
    VllmServer,
    build_tiny_base,
    ensure_vllm_venv,
    make_adapter,
    tokens_and_logprobs,
)

pytestmark = pytest.mark.slow

ENGINE_ID = "vllm-under-test"


@dataclass
class Stack:
    catalog: CatalogProcess
    vllm: VllmServer
    base: Path
    cache_dir: Path
    peft: dict[str, Path]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ensure_vllm_venv()
    work = tmp_path_factory.mktemp("vllm")
    base, model = build_tiny_base(work / "base")
    specs = {
        "a": dict(rank=8, targets=("q_proj", "v_proj"), seed=1),
        "b": dict(rank=16, targets=ALL_LINEARS, seed=2),
        "c": dict(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=3),
        "r32": dict(rank=32, targets=("q_proj",), seed=4),
    }
    peft = {
        key: make_adapter(model, work / f"peft-{key}", base_name=str(base), **spec)  # type: ignore[arg-type]
        for key, spec in specs.items()
    }
    cache_dir = work / "node-cache"
    cache_dir.mkdir()
    # The catalog writes the PEFT directories into the node cache (ExportPeftDir), as on a
    # host that runs both; the fetch-and-write fallback is tested in test_adapters.py.
    catalog = CatalogProcess(
        work / "catalog", extra_args=["--peft-export-root", str(cache_dir)]
    ).start()
    with catalog.client() as client:
        for key in ("a", "b"):
            client.push(f"acme/{key}", import_peft_dir(peft[key]), aliases=["serving"])
        client.push("acme/hot", import_peft_dir(peft["a"]), aliases=["serving"])
        client.push("acme/hot", import_peft_dir(peft["c"]))
        client.push("acme/late", import_peft_dir(peft["c"]))
        client.push("acme/warm", import_peft_dir(peft["b"]))
        client.push("acme/big", import_peft_dir(peft["r32"]))
        client.push("acme/foreign", import_peft_dir(peft["a"], base_id="someone/else-7b"))
    vllm = VllmServer(
        base,
        work / "vllm.log",
        catalog=catalog.address,
        cache_dir=cache_dir,
        lora_modules={f"static-{k}": peft[k] for k in ("a", "b", "c")},
        env={"LORACAT_ENGINE_ID": ENGINE_ID},
    )
    try:
        vllm.start()
        yield Stack(catalog, vllm, base, cache_dir, peft)
    finally:
        vllm.stop()
        catalog.stop()


def greedy(stack: Stack, model: str, max_tokens: int = 8) -> tuple[list[str], list[float]]:
    status, body = stack.vllm.complete(model, max_tokens=max_tokens, logprobs=1)
    assert status == 200, body
    return tokens_and_logprobs(body)


def assert_same_output(stack: Stack, model: str, static: str) -> None:
    tokens, logprobs = greedy(stack, model)
    want_tokens, want_logprobs = greedy(stack, static)
    assert tokens == want_tokens
    assert logprobs == pytest.approx(want_logprobs, abs=1e-5)


def assert_refused(stack: Stack, model: str, status: int, fragment: str) -> None:
    got, body = stack.vllm.complete(model)
    assert got == status, body
    assert fragment in body["error"]["message"]
    assert stack.vllm.alive()


def test_serving_through_loracat_equals_vllm_serving_the_peft_directory(stack: Stack) -> None:
    base_out = greedy(stack, str(stack.base))[0]
    outs = {key: greedy(stack, f"static-{key}")[0] for key in ("a", "b")}
    # The adapters change the output, and differently: equality below is not the base's.
    assert outs["a"] != base_out and outs["b"] != base_out and outs["a"] != outs["b"]
    for key in ("a", "b"):
        assert_same_output(stack, f"acme/{key}@serving", f"static-{key}")
    # ... from directories the catalog wrote (its log line names an export, not a fetch)
    lines = stack.vllm.log_tail(10**7).splitlines()
    for key in ("a", "b"):
        wrote = [line for line in lines if f"loracat resolved acme/{key}@serving " in line]
        assert any("(export " in line for line in wrote), wrote


def test_every_reference_form_serves_its_revision(stack: Stack) -> None:
    with stack.catalog.client() as client:
        digest = client.resolve("acme/a@1").digest
    for name in ("acme/a", "acme/a@1", f"acme/a@{digest}", f"acme/a@sha256:{digest.hex[:12]}"):
        assert_same_output(stack, name, "static-a")


def test_bad_references_get_a_4xx_and_vllm_stays_up(stack: Stack) -> None:
    for name in ("../../etc", "acme/has space", "acme/" + "n" * 300):
        assert_refused(stack, name, 400, "invalid")
    assert_refused(stack, "acme/a@sha256:abc", 400, "need 12 to 64 lowercase hex digits")
    for name in ("acme/nope", "acme/a@9", "acme/a@canary", "nobody/a"):
        assert_refused(stack, name, 404, "loracat: ")
    assert_refused(stack, "acme/foreign", 400, "trained for base 'someone/else-7b'")
    assert_refused(stack, "acme/big", 400, "rank 32, above the engine's --max-lora-rank 16")
    # Refused before any fetch: nothing of theirs on disk, nothing half-written anywhere.
    with stack.catalog.client() as client:
        refused = {str(client.resolve(n).digest) for n in ("acme/foreign", "acme/big")}
    on_disk = {p.name.replace("-", ":", 1) for p in (stack.cache_dir / "adapters").iterdir()}
    assert not refused & on_disk
    assert list((stack.cache_dir / "tmp").iterdir()) == []
    # and good names still work
    assert_same_output(stack, "acme/b@serving", "static-b")


def test_alias_move_reaches_new_requests_while_a_request_in_flight_finishes(stack: Stack) -> None:
    assert_same_output(stack, "acme/hot@serving", "static-a")
    long_tokens = 240  # --max-model-len 256
    expected_old = greedy(stack, "static-a", max_tokens=long_tokens)[0]
    new_tokens = greedy(stack, "static-c")[0]
    streaming = threading.Event()
    in_flight: dict[str, list[str]] = {}

    def long_request() -> None:
        in_flight["tokens"] = stack.vllm.stream_tokens(
            "acme/hot@serving", max_tokens=long_tokens, started=streaming.set
        )

    runner = threading.Thread(target=long_request)
    runner.start()
    assert streaming.wait(60), "the long request never started"
    with stack.catalog.client() as client:
        moved_at = time.monotonic()
        client.set_alias("acme/hot", "serving", 2, expected=1)
    # The plugin swaps: revision 1's name leaves vLLM's table...
    deadline = moved_at + 30
    while "acme/hot@serving#1" in stack.vllm.models():
        assert time.monotonic() < deadline, "the plugin never swapped acme/hot@serving"
        time.sleep(0.01)
    # ...while the request that started on it is still running.
    assert stack.vllm.running_requests() >= 1
    while greedy(stack, "acme/hot@serving")[0] != new_tokens:
        assert time.monotonic() < deadline, "serving never reached revision 2"
        time.sleep(0.05)
    switched_after = time.monotonic() - moved_at
    runner.join(120)
    # The request that started before the move ran to its end on revision 1.
    assert in_flight["tokens"] == expected_old
    # An immutable reference never moves.
    assert_same_output(stack, "acme/hot@1", "static-a")
    assert_same_output(stack, "acme/hot@serving", "static-c")
    print(f"alias move reached new requests after {switched_after:.2f} s")


def test_a_hinted_adapter_is_loaded_before_its_first_request(stack: Stack) -> None:
    with stack.catalog.client() as client:
        client.set_alias("acme/warm", "serving", 1)  # a deployment wave: an attach hint
    deadline = time.monotonic() + 30
    while "acme/warm@1" not in stack.vllm.models():
        assert time.monotonic() < deadline, "the hinted adapter was never loaded"
        time.sleep(0.1)
    assert_same_output(stack, "acme/warm@1", "static-b")


def test_residency_reaches_the_catalog(stack: Stack) -> None:
    greedy(stack, "acme/a@serving")
    greedy(stack, "acme/b@serving")
    with stack.catalog.client() as client:
        want = {str(client.resolve(n).digest) for n in ("acme/a@serving", "acme/b@serving")}
        deadline = time.monotonic() + 15
        while True:
            stats = client.stats()
            tiers = {t["tier"]: t for t in stats["tiers"]}
            if stats["engines"] >= 1 and tiers["gpu"]["entries"] >= len(want):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
    assert tiers["host"]["entries"] >= len(want)
    assert tiers["host"]["bytes"] > 0


def test_catalog_down_then_back(stack: Stack) -> None:
    loaded = greedy(stack, "acme/a@serving")
    stack.catalog.stop()
    try:
        # What vLLM has loaded keeps serving; a new reference gets a clear, retryable error.
        assert greedy(stack, "acme/a@serving") == loaded
        status, body = stack.vllm.complete("acme/late")
        assert status == 503, body
        assert "catalog is unavailable" in body["error"]["message"]
        assert stack.vllm.alive()
        time.sleep(1.5)  # a recheck pass or two against the stopped catalog
        assert greedy(stack, "acme/a@serving") == loaded
    finally:
        stack.catalog.start()
    assert_same_output(stack, "acme/late", "static-c")
    assert list((stack.cache_dir / "tmp").iterdir()) == []
