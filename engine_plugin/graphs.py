"""Decode under CUDA graphs: one capture per batch size, routing rewritten in place.

A decode step of a small model is bound by kernel launches: the 0.5B shape's base launches
~1,000 kernels a step and keeps an H200 busy ~2 ms of a ~20 ms eager step. Capturing the step
once in a CUDA graph and replaying it removes the launch cost for the base and the engine
alike, so the comparison that matters is graph against graph.

What makes the engine's step capturable is that its LoRA kernels route from device tensors
only (``lora_kernels``): each row's slot in ``StaticRouting.index``, each slot's scale in the
pool's ``scales``. Binding other adapters to the rows, attaching, detaching, evicting or hot
swapping only rewrites those tensors and the slots' weights in place, so a captured graph stays
valid; it is captured once per batch size (``rows``) and kept.

The KV cache is a transformers ``StaticCache`` per batch size (its tensors never move, as a
graph needs), the step's position a one-element device tensor. Prefill runs eagerly (its length
varies); decode steps replay. Without CUDA (or with ``capture=False``) the same code runs
eagerly, which is how its results are tested against the plain forward pass on CPU.

    decoder = GraphedDecoder(model, max_len=512, engine=engine)   # engine: None for a bare base
    with decoder.session(prompt_ids, ["acme/a", None, "acme/b@3"]) as session:
        logits = session.logits  # [rows, vocab]: after the last prompt token
        for _ in range(16):
            logits = session.step(logits.argmax(-1, keepdim=True))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine_plugin.layers import BatchContext, BatchPlan
from engine_plugin.model_cache import cache_kwargs

if TYPE_CHECKING:
    from engine_plugin.engine import ResidentEngine


class StaticRouting:
    """Per-row slots on the device for a fixed batch size, read by captured kernels.

    ``index`` keeps its storage for the routing's lifetime; ``bind`` rewrites its values.
    """

    def __init__(self, engine: ResidentEngine, rows: int) -> None:
        if engine.experts:
            raise ValueError("captured decode supports dense modules only (this base has experts)")
        self.engine = engine
        self.rows = rows
        self.index = torch.full(
            (rows,), engine.pool.zero_slot, dtype=torch.long, device=engine.device
        )
        self.plan = BatchPlan(
            rows=rows, row_slots=(), modules={}, fused_index=self.index, static=True
        )

    @contextlib.contextmanager
    def bind(self, adapters: Sequence[str | None]) -> Iterator[tuple[int, ...]]:
        """Lease the adapters' slots (attaching as needed), point the rows at them and make the
        plan current on this thread; yields the row slots."""
        with self.engine.leased_rows(adapters) as row_slots:
            self.index.copy_(torch.tensor(row_slots, dtype=torch.long), non_blocking=False)
            with self.active():
                yield row_slots

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        context: BatchContext = self.engine._context
        previous = context.plan
        context.plan = self.plan
        try:
            yield
        finally:
            context.plan = previous


class CapturedCall:
    """``fn()`` (reading only tensors that never move) recorded once as a CUDA graph.

    Calling it replays the graph and returns the same output tensor, rewritten. On CPU, or with
    ``capture=False``, it calls ``fn`` each time.
    """

    def __init__(
        self,
        fn: Callable[[], torch.Tensor],
        device: torch.device,
        *,
        capture: bool = True,
        warmup: int = 2,
        pool: Any = None,
    ) -> None:
        self.fn = fn
        self.graph: Any = None
        self.output: torch.Tensor | None = None
        if not (capture and device.type == "cuda"):
            return
        # Warm up on a side stream first, as capture requires: Triton compiles its kernels,
        # cuBLAS picks its algorithms and workspaces, lazily made buffers get made.
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.output = fn()
        self.graph = graph

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        assert self.output is not None
        return self.output


@dataclass
class _Bucket:
    """Everything a batch size's captured step reads and writes."""

    rows: int
    cache: Any
    ids: torch.Tensor
    position: torch.Tensor
    routing: StaticRouting | None
    step: CapturedCall | None = None


class GraphedDecoder:
    """Greedy-decoding steps of a causal LM (a bare base, or an engine's wrapped model) replayed
    from CUDA graphs captured once per batch size.

    Args:
        model: a transformers causal LM; with ``engine``, leave it None (the engine's model).
        max_len: the longest prompt plus generated tokens a session may hold.
        engine: a ``ResidentEngine`` whose adapters the rows use; None for the bare base.
        capture: False runs every step eagerly (the like-for-like eager baseline).

    Raises:
        ValueError: the engine's base has experts modules (not captured yet), or neither
            ``model`` nor ``engine`` is given.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        max_len: int,
        engine: ResidentEngine | None = None,
        capture: bool = True,
    ) -> None:
        if engine is not None:
            model = engine.model
            if engine.experts:
                raise ValueError("captured decode supports dense modules only")
        if model is None:
            raise ValueError("give a model or an engine")
        self.model = model
        self.engine = engine
        self.max_len = max_len
        self.capture = capture
        self.device = next(model.parameters()).device
        self._buckets: dict[int, _Bucket] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    @property
    def captures(self) -> int:
        """How many step graphs were captured (one per batch size used)."""
        return sum(1 for b in self._buckets.values() if b.step is not None and b.step.captured)

    def _bucket(self, rows: int) -> _Bucket:
        bucket = self._buckets.get(rows)
        if bucket is None:
            from transformers import StaticCache

            config: Any = getattr(self.model, "config", None)
            bucket = _Bucket(
                rows=rows,
                cache=StaticCache(config=config, max_cache_len=self.max_len),
                ids=torch.zeros((rows, 1), dtype=torch.long, device=self.device),
                position=torch.zeros(1, dtype=torch.long, device=self.device),
                routing=StaticRouting(self.engine, rows) if self.engine is not None else None,
            )
            self._buckets[rows] = bucket
        return bucket

    @contextlib.contextmanager
    def session(
        self, input_ids: torch.Tensor, adapters: Sequence[str | None] | None = None
    ) -> Iterator[DecodeSession]:
        """Prefill ``input_ids`` ``[rows, tokens]`` (eagerly) and hold the rows' adapters for
        the session's decode steps.

        Raises:
            ValueError: the prompt does not fit ``max_len``, or adapters are given without an
                engine (or are missing with one).
            Anything ``ResidentEngine.attach`` raises.
        """
        rows, tokens = int(input_ids.shape[0]), int(input_ids.shape[1])
        if tokens >= self.max_len:
            raise ValueError(f"a {tokens}-token prompt leaves no room in max_len {self.max_len}")
        if (adapters is None) != (self.engine is None):
            raise ValueError("adapters go with an engine, and an engine needs adapters per row")
        bucket = self._bucket(rows)
        routing = bucket.routing
        bound = (
            routing.bind(adapters)
            if routing is not None and adapters is not None
            else contextlib.nullcontext()
        )
        with bound, torch.inference_mode():
            _set_cache_length(bucket.cache, 0)
            positions = torch.arange(tokens, device=self.device)
            out = self.model(
                input_ids=input_ids.to(self.device),
                **cache_kwargs(self.model, bucket.cache),
                cache_position=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            bucket.position.fill_(tokens)
            yield DecodeSession(self, bucket, out.logits[:, -1], tokens)

    def _step_fn(self, bucket: _Bucket) -> Callable[[], torch.Tensor]:
        cache = cache_kwargs(self.model, bucket.cache)

        def step() -> torch.Tensor:
            out = self.model(
                input_ids=bucket.ids,
                **cache,
                cache_position=bucket.position,
                use_cache=True,
            )
            logits: torch.Tensor = out.logits[:, -1]
            return logits

        return step

    def _replay(self, bucket: _Bucket, length: int) -> torch.Tensor:
        if bucket.step is None:
            bucket.step = CapturedCall(
                self._step_fn(bucket), self.device, capture=self.capture, pool=self._pool
            )
            # The warm-up steps before a capture advanced the cache's own length.
            _set_cache_length(bucket.cache, length)
        return bucket.step()


def _set_cache_length(cache: Any, length: int) -> None:
    """Set how many positions a ``StaticCache`` holds. Newer transformers write a static layer
    at its own running length (a device tensor) rather than at ``cache_position``; keeping
    both in step makes the decoder work with either."""
    for layer in getattr(cache, "layers", ()):
        cumulative = getattr(layer, "cumulative_length", None)
        if isinstance(cumulative, torch.Tensor):
            cumulative.fill_(length)


class DecodeSession:
    """One batch's decoding: ``logits`` after the prompt, then one ``step`` per token."""

    def __init__(
        self, decoder: GraphedDecoder, bucket: _Bucket, logits: torch.Tensor, length: int
    ) -> None:
        self._decoder = decoder
        self._bucket = bucket
        self.logits = logits
        self.length = length

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append ``next_ids`` ``[rows, 1]`` and return the next logits ``[rows, vocab]``
        (a tensor the next step overwrites: copy what you keep).

        Raises:
            ValueError: the session is at ``max_len``.
        """
        if self.length >= self._decoder.max_len:
            raise ValueError(f"the session holds max_len={self._decoder.max_len} tokens")
        bucket = self._bucket
        bucket.ids.copy_(next_ids, non_blocking=True)
        self.logits = self._decoder._replay(bucket, self.length)
        self.length += 1
        bucket.position.add_(1)
        return self.logits

    def rewind(self, tokens: int) -> None:
        """Forget the last ``tokens`` positions (the next step overwrites them)."""
        if not 0 <= tokens <= self.length:
            raise ValueError(f"cannot rewind {tokens} of {self.length} tokens")
        self.length -= tokens
        self._bucket.position.sub_(tokens)
        _set_cache_length(self._bucket.cache, self.length)
