"""Real vLLM servers, a real catalog process and a tiny Llama base, for the vLLM tests and bench.

Nothing is downloaded: the base is a random-initialised Llama built from a config, with a
byte-level BPE tokenizer trained here on a synthetic corpus; adapters are saved by ``peft``.
vLLM runs from ``.venv-vllm`` (made by ``scripts/vllm_venv.sh``, which ``ensure_vllm_venv``
calls) as its OpenAI server (an API server process and an engine-core process;
``--distributed-executor-backend uni``, one OpenMP thread), with its KV cache capped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from catalog.client import CatalogClient
from tests.servers import free_port, loracat_command

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"

#: vLLM's CPU attention takes head sizes 32, 64, 80, ...: hidden 128 over 4 heads is 32.
BASE_SHAPE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "the quick brown fox jumps over the lazy dog and"


def ensure_vllm_venv() -> Path:
    """Run ``scripts/vllm_venv.sh`` (a no-op once its stamp is current); the venv's python."""
    subprocess.run([str(ROOT / "scripts" / "vllm_venv.sh")], check=True, cwd=ROOT)
    return VLLM_PYTHON


def build_tiny_base(directory: Path, seed: int = 0, **shape: int | bool) -> tuple[Path, Any]:
    """Save a tiny random Llama (``BASE_SHAPE``, then ``shape``) and a tokenizer for it in
    ``directory``; returns the path and the model (for making adapters)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    text = "the quick brown fox jumps over lazy dog and cat sat on mat a of to in is it"
    words = text.split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=BASE_SHAPE["vocab_size"], min_frequency=1, special_tokens=["<s>", "</s>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(str(directory))
    config = LlamaConfig(**{**BASE_SHAPE, **shape}, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(str(directory))
    return directory, model


def make_adapter(
    base_model: Any,
    directory: Path,
    *,
    rank: int,
    targets: Sequence[str],
    seed: int,
    base_name: str,
    scale: float = 12.0,
) -> Path:
    """A real PEFT adapter (non-zero ``lora_B``) whose config names ``base_name``.

    Its LoRA weights are scaled up (``factories.make_peft_adapter`` draws them at 0.05 sigma)
    so that it changes this tiny base's greedy tokens: an equality of outputs then shows the
    adapter was applied, not only that both sides ran the base.
    """
    from safetensors.torch import load_file, save_file

    from tests.factories import make_peft_adapter

    make_peft_adapter(
        base_model, directory, rank=rank, alpha=2 * rank, target_modules=targets, seed=seed
    )
    weights = directory / "adapter_model.safetensors"
    tensors = {k: v * scale for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2))
    return directory


# ------------------------------------------------------------------------------- the catalog


def restartable_port() -> int:
    """A free port below the kernel's ephemeral range. A server restarted on a port from that
    range can find it taken by its own clients: a client reconnecting to a closed loopback port
    may be given that very port as its source and connect to itself."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class CatalogProcess:
    """``loracat serve`` in a child process on a fixed port, so it can be stopped and started
    again at the same address (a catalog restart as vLLM sees it)."""

    def __init__(
        self,
        root: Path,
        *,
        store_url: str | None = None,
        env: Mapping[str, str] = {},
        extra_args: Sequence[str] = (),
    ):
        self.root = root
        self.store_url = store_url
        self.env = dict(env)
        self.extra_args = list(extra_args)
        self.port = restartable_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> CatalogProcess:
        args = [*loracat_command(), "serve", "--root", str(self.root), "--port", str(self.port)]
        if self.store_url:
            args += ["--store", self.store_url]
        args += self.extra_args
        log = open(self.root.parent / f"catalog-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()
        with CatalogClient(self.address) as client:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"loracat serve exited with {self.proc.returncode}")
                try:
                    client.wait_ready(timeout=0.5)
                    client.stats()
                    return self
                except Exception:
                    if time.monotonic() > deadline:
                        raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> CatalogClient:
        return CatalogClient(self.address)


# ---------------------------------------------------------------------------------- vLLM


class VllmServer:
    """vLLM's OpenAI server from ``.venv-vllm`` with the loracat plugin, in a child process."""

    def __init__(
        self,
        base_dir: Path,
        log_path: Path,
        *,
        catalog: str | None,
        cache_dir: Path,
        plugins: str = "loracat",
        lora_modules: Mapping[str, Path] = {},
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        env: Mapping[str, str] = {},
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_dir = base_dir
        self.log_path = log_path
        args = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(base_dir),
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank),
            "--max-loras",
            str(max_loras),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "256",
            "--kv-cache-memory-bytes",
            str(64 << 20),
            "--distributed-executor-backend",
            "uni",
            "--seed",
            "0",
        ]
        if max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(max_cpu_loras)]
        if lora_modules:
            args += ["--lora-modules", *(f"{n}={p}" for n, p in lora_modules.items())]
        self.args = args
        self.env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_PLUGINS": plugins,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "LORACAT_VLLM_CACHE_DIR": str(cache_dir),
            # One thread: on a shared 2-core machine a second OpenMP thread spin-waits at every
            # barrier while other processes hold the cores (vLLM warns about it too), which
            # turns a 20 ms request into 500 ms.
            "OMP_NUM_THREADS": "1",
            **({"LORACAT_SERVER": catalog} if catalog else {}),
            **env,
        }
        # The test runner's venv must not leak into vLLM's interpreter.
        self.env.pop("VIRTUAL_ENV", None)
        self.env.pop("PYTHONPATH", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> VllmServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it now
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def post(self, route: str, payload: dict[str, Any], timeout: float = 60.0) -> tuple[int, Any]:
        """``(status, parsed body)`` of a POST; 4xx and 5xx are returned, not raised."""
        request = urllib.request.Request(
            self.url + route,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def complete(
        self, model: str, *, prompt: str = PROMPT, max_tokens: int = 8, logprobs: int = 0
    ) -> tuple[int, Any]:
        payload: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if logprobs:
            payload["logprobs"] = logprobs
        return self.post("/v1/completions", payload)

    def stream_tokens(
        self, model: str, *, max_tokens: int, started: Callable[[], None] = lambda: None
    ) -> list[str]:
        """A streamed greedy completion's tokens; ``started`` is called at the first chunk."""
        payload = {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 1,
            "stream": True,
        }
        request = urllib.request.Request(
            self.url + "/v1/completions",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        tokens: list[str] = []
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if not tokens:
                    started()
                tokens.extend(chunk["choices"][0]["logprobs"]["tokens"])
        return tokens

    def running_requests(self) -> float:
        """vLLM's ``vllm:num_requests_running`` gauge."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("vllm:num_requests_running"):
                    return float(line.rsplit(" ", 1)[1])
        raise LookupError("vllm:num_requests_running not in /metrics")

    def models(self) -> list[str]:
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as response:
            return [m["id"] for m in json.loads(response.read())["data"]]


def tokens_and_logprobs(body: dict[str, Any]) -> tuple[list[str], list[float]]:
    """The generated tokens and their log-probabilities from a completions response."""
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    return list(logprobs["tokens"]), [float(x) for x in logprobs["token_logprobs"]]
