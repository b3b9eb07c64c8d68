"""Hostile clients against `loracat serve --auth`: the probes that found issue 12, run again.

Question: what does each probe get now (status code, and a figure where one applies: engine
records kept, server RSS, bytes taken in before a refusal)?

Run: .venv/bin/python bench/bench_hostile.py [--engine-ids 2020] [--big-reports 20]
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_results
from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc
from catalog.client import CatalogClient
from catalog.errors import CatalogError
from catalog.pack import read_pack
from catalog.pack.synthetic import random_pack
from catalog.service.auth import token_sha256
from tests.servers import serve_subprocess

TOKENS = {"mallory": "mallory-token", "writer": "writer-token"}
ROLES = {"mallory": ("engine", "mallory"), "writer": ("write", "*")}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def code_of(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except CatalogError as exc:
        return exc.grpc_code, str(exc)
    return "OK", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-ids", type=int, default=2020)
    parser.add_argument("--big-reports", type=int, default=20)
    parser.add_argument("--digests", type=int, default=100_000)
    parser.add_argument("--garbage-mib", type=int, default=300)
    args = parser.parse_args()
    rows: list[list[Any]] = []
    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loracat-hostile-") as work:
        auth = Path(work) / "auth.toml"
        auth.write_text(
            "\n".join(
                f'[[principal]]\nname = "{name}"\ntoken_sha256 = "{token_sha256(token)}"\n'
                f'tenants = ["{ROLES[name][1]}"]\nrole = "{ROLES[name][0]}"\n'
                for name, token in TOKENS.items()
            )
        )
        options = {"token": TOKENS["writer"]}
        with (
            serve_subprocess(
                Path(work) / "root", extra_args=["--auth", str(auth)], client_options=options
            ) as (proc, address),
            CatalogClient(address, token=TOKENS["mallory"]) as mallory,
            CatalogClient(address, token=TOKENS["writer"]) as writer,
        ):
            good = random_pack(
                [("self_attn.q_proj", 64, 64)], num_layers=2, rank=4, base_id="b", seed=1
            )
            writer.push("victim/model", good, aliases=["serving"])
            start_rss = rss_mib(proc.pid)

            # 1. engine ids without end
            answers = Counter(
                code_of(lambda i=i: mallory.register_engine(f"e-{i}", "b", 8, 16))[0]
                for i in range(args.engine_ids)
            )
            after_register = rss_mib(proc.pid)
            doc["engine_ids"] = dict(answers)
            rows.append(
                [f"register {args.engine_ids} engine ids", dict(answers),
                 f"{answers['OK']} records kept"]
            )  # fmt: skip

            # 2. huge residency reports, then the largest allowed from as many engines
            digest = "sha256:" + "ab" * 32
            many = [digest] * args.digests
            huge = Counter(
                code_of(lambda i=i: mallory.report_residency(f"e-{i}", many, []))[0]
                for i in range(args.big_reports)
            )
            after_huge = rss_mib(proc.pid)
            allowed = Counter(
                code_of(lambda i=i: mallory.report_residency(
                    f"e-{i}", [f"sha256:{i:04x}{j:060x}" for j in range(4096)], []))[0]
                for i in range(args.big_reports)
            )  # fmt: skip
            end_rss = rss_mib(proc.pid)
            doc["reports"] = {"huge": dict(huge), "max_allowed": dict(allowed)}
            doc["rss_mib"] = {
                "start": round(start_rss),
                "after_registrations": round(after_register),
                "after_refused_reports": round(after_huge),
                "after_capped_reports": round(end_rss),
            }
            rows[-1][2] += f"; RSS {start_rss:.0f} -> {after_register:.0f} MiB"
            rows.append(
                [f"{args.big_reports} reports of {args.digests:,} digests", dict(huge),
                 f"RSS -> {after_huge:.0f} MiB (each ~7 MB message is decoded, then refused)"]
            )  # fmt: skip
            rows.append(
                [f"{args.big_reports} reports of 4,096 digests (the cap)", dict(allowed),
                 f"RSS -> {end_rss:.0f} MiB"]
            )  # fmt: skip

            # 3. trailing newlines
            for alias in ("latest\n", "123\n", "serving\n"):
                code, _ = code_of(lambda a=alias: writer.set_alias("victim/model", a, 1))
                rows.append([f"alias {alias!r}", code, ""])
                doc[f"alias {alias!r}"] = code

            # 4. a 100 KB base_id
            code, message = code_of(lambda: writer.push("victim/x", good, base_id="b" * 100_000))
            rows.append(["push with a 100 KB base_id", code, f"{len(message)} chars of message"])
            doc["huge_base_id"] = {"code": code, "message_chars": len(message)}

            # 5. NaN weights
            parsed = read_pack(good)
            name = parsed.tensor_names()[0]
            offset = good.find(parsed.tensor(name).data.tobytes())
            del parsed
            poisoned = bytearray(good)
            poisoned[offset : offset + 4] = struct.pack("<f", float("nan"))
            code, message = code_of(lambda: writer.push("victim/nan", bytes(poisoned)))
            rows.append(["push with a NaN weight", code, message.split(":")[1][:60]])
            doc["nan"] = {"code": code, "message": message}

            # 6. 300 MiB of garbage
            sent = [0]

            def garbage() -> Iterator[pb.PushRequest]:
                header = pb.PushHeader(name="victim/junk", size_bytes=args.garbage_mib << 20)
                yield pb.PushRequest(header=header)
                chunk = struct.pack("<Q", 64) + b"{" * ((1 << 20) - 8)
                for _ in range(args.garbage_mib):
                    sent[0] += len(chunk)
                    yield pb.PushRequest(chunk=chunk)

            channel = grpc.insecure_channel(address)
            began = time.perf_counter()
            try:
                pb_grpc.CatalogStub(channel).Push(
                    garbage(),
                    timeout=120,
                    metadata=(("authorization", f"Bearer {TOKENS['writer']}"),),
                )
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            finally:
                channel.close()
            elapsed = time.perf_counter() - began
            rows.append(
                [f"push of {args.garbage_mib} MiB of garbage", code,
                 f"{sent[0] >> 20} MiB sent before the refusal ({elapsed:.2f} s)"]
            )  # fmt: skip
            doc["garbage"] = {"code": code, "sent_mib": sent[0] >> 20, "seconds": elapsed}

            # 7. Stats for a non-admin, 8. another tenant, existing or not
            store_url = writer.stats()["store_url"]
            rows.append(["Stats as a write principal", "OK", f"store_url {store_url!r}"])
            doc["stats_store_url"] = store_url
            for ref in ("victim/model@serving", "victim/nope@serving"):
                code, _ = code_of(lambda r=ref: mallory.fetch(r))
                rows.append([f"mallory fetches {ref}", code, ""])
                doc[f"fetch {ref}"] = code
            code, _ = code_of(lambda: CatalogClient(address).resolve("victim/model"))
            rows.append(["resolve without a token", code, ""])
            doc["no_token"] = code
    print_table(
        "hostile probes against `loracat serve --auth`", ["probe", "answer", "figure"], rows
    )
    write_results("hostile", doc)


if __name__ == "__main__":
    main()
