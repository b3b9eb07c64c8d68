"""`loracat demo`: the whole system on one machine, end to end.

A catalog on the embedded default (local-directory durable store + LMDB index) served over real
gRPC on loopback; N adapters generated for a small resident base and pushed through the client;
an engine that attaches them in waves into a fixed number of slots, serves mixed-adapter
batches, hot-swaps a revision behind the `serving` alias, and reports its residency back to the
catalog; per-tier statistics at the end.
"""

from __future__ import annotations

import random
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from catalog.client import CatalogClient
from catalog.pack.synthetic import random_pack
from catalog.service.auth import Authenticator, Guard, token_sha256
from catalog.service.server import create_server, open_catalog
from engine_plugin.engine import ResidentEngine
from engine_plugin.hints import HintFollower

BASE_ID = "loracat-demo/qwen2-tiny"
TARGET_CHOICES = (
    ("self_attn.q_proj", "self_attn.v_proj"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"),
)


def build_base(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config.name_or_path = BASE_ID
    torch.manual_seed(seed)
    model: torch.nn.Module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    return model.eval()


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``module path inside a decoder layer -> (in_features, out_features)``."""
    layer: torch.nn.Module = model.model.layers[0]  # type: ignore[index, union-attr, assignment]
    return {
        name: (module.in_features, module.out_features)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def say(text: str = "") -> None:
    print(text, flush=True)


def table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    say("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        say("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def demo_tokens(root: Path) -> dict[str, str]:
    """Fresh tokens for the demo's two principals; their hashes go to ``root/auth.toml``."""
    tokens = {name: secrets.token_urlsafe(24) for name in ("trainer", "gpu-node")}
    roles = {"trainer": "write", "gpu-node": "engine"}
    (root / "auth.toml").write_text(
        "\n".join(
            f'[[principal]]\nname = "{name}"\ntoken_sha256 = "{token_sha256(token)}"\n'
            f'tenants = ["tenant*"]\nrole = "{roles[name]}"\n'
            for name, token in tokens.items()
        )
    )
    return tokens


def run_demo(
    *,
    root: Path | None = None,
    adapters: int = 48,
    num_slots: int = 8,
    waves: int = 4,
    batches_per_wave: int = 6,
    seed: int = 0,
    auth: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns the final statistics (also printed). With ``auth`` the catalog
    requires tokens: the trainer pushes with a write principal's, the engine serves with an
    engine principal's (``catalog.service.auth``)."""
    rng = random.Random(seed)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    keep = root is not None
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="loracat-demo-"))
    catalog = open_catalog(root)
    credentials = demo_tokens(root) if auth else {}
    guard = Guard(Authenticator(root / "auth.toml")) if auth else None
    server, port = create_server(catalog, "127.0.0.1:0", guard=guard)
    address = f"127.0.0.1:{port}"
    say(f"catalog: serving on {address}, durable store {catalog.store.url}, index {root / 'index'}")
    if auth:
        say(f"auth:    principals in {root / 'auth.toml'}: trainer (write), gpu-node (engine)")
    try:
        model = build_base(seed)
        shapes = linear_shapes(model)
        layers = len(model.model.layers)  # type: ignore[union-attr, arg-type]
        params = sum(p.numel() for p in model.parameters())
        say(f"base:    {BASE_ID}, {layers} layers, {params / 1e6:.1f}M parameters (random init)")

        client = CatalogClient(address, token=credentials.get("trainer"))
        engine_client = CatalogClient(address, token=credentials["gpu-node"]) if auth else client
        names = [f"tenant{i % 6:02d}/policy-{i:03d}" for i in range(adapters)]
        t0 = time.perf_counter()
        pushed_bytes = 0
        for i, name in enumerate(names):
            targets = TARGET_CHOICES[i % len(TARGET_CHOICES)]
            pack = random_pack(
                [(m, *shapes[m]) for m in targets],
                num_layers=layers,
                rank=rng.choice([4, 8, 16]),
                base_id=BASE_ID,
                seed=seed * 100_000 + i,
            )
            client.push(name, pack, aliases=["serving"])
            pushed_bytes += len(pack)
        push_s = time.perf_counter() - t0
        say(
            f"push:    {adapters} adapters, {pushed_bytes / 2**20:.1f} MiB in {push_s:.2f}s "
            f"({adapters / push_s:.0f} pushes/s over gRPC)"
        )

        engine = ResidentEngine(
            model, catalog=engine_client, num_slots=num_slots, max_rank=16, base_id=BASE_ID
        )
        # The engine follows the catalog's hints: moving `serving` is a deployment wave.
        follower = HintFollower(engine, engine_client)
        wave_size = max(1, num_slots - 2)
        say(
            f"engine:  {num_slots} slots x rank 16 on {engine.device}; "
            f"waves of {wave_size} adapters\n"
        )
        rows = []
        for wave in range(waves):
            members = [f"{n}@serving" for n in rng.sample(names, wave_size)]
            if wave + 1 < waves:
                engine.prefetch([f"{n}@serving" for n in rng.sample(names, wave_size)])
            before = dict(engine.stats())
            t0 = time.perf_counter()
            tokens = 0
            for _ in range(batches_per_wave):
                batch = [rng.choice([*members, None]) for _ in range(8)]
                input_ids = torch.randint(0, 2048, (len(batch), 32))
                logits = engine.forward(input_ids, adapters=batch).logits
                tokens += logits.shape[0] * logits.shape[1]
            elapsed = time.perf_counter() - t0
            after = engine.stats()
            rows.append(
                [
                    wave + 1,
                    after["hits"] - before["hits"],
                    after["misses"] - before["misses"],
                    after["evictions"] - before["evictions"],
                    f"{tokens / elapsed:,.0f}",
                ]
            )
        say("waves (mixed batches of 8 rows x 32 tokens, each row its own adapter or the base):")
        table(["wave", "slot hits", "attaches (misses)", "evictions", "tokens/s"], rows)

        # Hot swap: a trainer exports a new revision; serving moves; the engine follows.
        target = names[0]
        old = engine.attach(f"{target}@serving")
        targets = TARGET_CHOICES[0]
        pack = random_pack(
            [(m, *shapes[m]) for m in targets],
            num_layers=layers,
            rank=8,
            base_id=BASE_ID,
            seed=999_999,
        )
        new = client.push(target, pack).revision
        client.set_alias(target, "serving", new.number, expected=old.number)
        by_hint = follower.wait_for(1, 10.0)
        attached = engine.attach(f"{target}@serving")  # a no-op when the hint already did it
        ids = torch.randint(0, 2048, (2, 16))
        out = engine.forward(ids, adapters=[f"{target}@{old.number}", f"{target}@serving"]).logits
        differs = not torch.allclose(out[0], out[1])
        say(
            f"\nhot swap: {target} serving {old.number} -> {attached.number} "
            f"({'attached on the catalog hint' if by_hint else 'attached on demand'}); rows on "
            f"the old and new revision in one batch differ: {differs}"
        )
        rollback = client.rollback(target, "serving")
        say(f"rollback: {target}@serving {rollback.previous} -> {rollback.revision}")

        engine.flush_reports()
        stats = engine.stats()
        catalog_stats = client.stats()
        durable_objects = sum(1 for _ in catalog.store.list(""))
        nvme: dict[str, Any] = next((t for t in catalog_stats["tiers"] if t["tier"] == "nvme"), {})
        say("\ntiers:")
        table(
            ["tier", "entries", "bytes", "hits", "misses", "evictions"],
            [
                [
                    "durable (file://)",
                    durable_objects,
                    f"{pushed_bytes / 2**20:.1f} MiB packs",
                    "-",
                    "-",
                    "-",
                ],
                [
                    "nvme (pack cache)",
                    nvme.get("entries", 0),
                    f"{nvme.get('bytes', 0) / 2**20:.1f} MiB",
                    nvme.get("hits", 0),
                    nvme.get("misses", 0),
                    nvme.get("evictions", 0),
                ],
                [
                    "nvme (LMDB index)",
                    catalog_stats["revisions"],
                    f"{catalog_stats['index_bytes'] / 2**20:.1f} MiB",
                    "-",
                    "-",
                    "-",
                ],
                [
                    "host (engine)",
                    stats["host"]["entries"],
                    f"{stats['host']['bytes'] / 2**20:.1f} MiB",
                    stats["host"]["hits"],
                    stats["host"]["misses"],
                    stats["host"]["evictions"],
                ],
                [
                    "gpu slots",
                    sum(1 for r in stats["resident"] if not r["retired"]),
                    f"{stats['slot_bytes'] / 2**20:.1f} MiB",
                    stats["hits"],
                    stats["misses"],
                    stats["evictions"],
                ],
            ],
        )
        reported = {t["tier"]: t["entries"] for t in catalog_stats["tiers"]}
        say(
            f"\ncatalog view: {catalog_stats['adapters']} adapters, "
            f"{catalog_stats['revisions']} revisions, {catalog_stats['engines']} engine(s) "
            f"reporting {reported.get('gpu', 0)} packs in GPU slots and "
            f"{reported.get('host', 0)} in host memory"
        )
        follower.close()
        engine.close()
        client.close()
        engine_client.close()
        return {"engine": stats, "catalog": catalog_stats}
    finally:
        server.stop(grace=None).wait()
        catalog.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
