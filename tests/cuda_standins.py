"""Recording stand-ins for torch.cuda's stream and graph API, so that the CUDA-graph code paths run on a CPU.

    fake = FakeCuda(monkeypatch)            # torch.cuda.Stream/stream/current_stream/graph/CUDAGraph/synchronize
    fake.watch(model, "forward")            # record the stream each call of model.forward runs on
    ...                                     # run the graphed step or decoder on the CPU
    fake.captures[0]["stream"], fake.captures[0]["capture_error_mode"], fake.events

They record what a capture must get right and a CPU cannot otherwise show (issue 25): which stream the warm-up ran
on, which stream and error mode each capture used, which stream waited for which, and when. The body of a
`torch.cuda.graph(...)` block runs eagerly on the CPU (that is the capture). A stand-in graph's `replay()` does what
`on_replay(graph)` says, the test's stand-in for the work a real graph would redo on its fixed buffers; by default
nothing (the capture's own pass left its results in them). `on_capture_end(graph)` runs as a capture ends, while
the tensors the capture allocated are still bound (a test pins their storages there: the graph's buffers).
The issue itself asks for these stand-ins; nothing the project integrates (Horovod, DALI, MLflow) is replaced.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch


class Stream:
    def __init__(self, fake: FakeCuda, name: str):
        self.fake, self.name = fake, name
        self.waited_for: list[Stream] = []

    def wait_stream(self, other: Stream) -> None:
        self.waited_for.append(other)
        self.fake.events.append(("wait", self, other))

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class Graph:
    def __init__(self, fake: FakeCuda):
        self.fake = fake
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.fake.events.append(("replay", self.fake.current, self))
        if self.fake.on_replay is not None:
            self.fake.on_replay(self)


class FakeCuda:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.default = Stream(self, "default")
        self.current = self.default
        self.events: list[tuple] = []     # ("call", name, stream) ("wait", waiter, waited) ("capture_begin", stream)
        self.captures: list[dict[str, Any]] = []  # per torch.cuda.graph(...): its arguments, where its events start
        self.on_replay: Callable[[Graph], None] | None = None
        self.on_capture_end: Callable[[Graph], None] | None = None
        self.fail_capture: Exception | None = None   # raised as a capture begins (a capture that fails)
        self._streams = 0
        monkeypatch.setattr(torch.cuda, "Stream", self._new_stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "stream", self._stream)
        monkeypatch.setattr(torch.cuda, "graph", self._graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *args, **kwargs: Graph(self))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.events.append(("synchronize",)))

    def _new_stream(self, *args: Any, **kwargs: Any) -> Stream:
        self._streams += 1
        return Stream(self, f"side-{self._streams}")

    @contextlib.contextmanager
    def _stream(self, stream: Stream | None) -> Iterator[None]:
        if stream is None:  # torch.cuda.stream(None) is a no-op
            yield
            return
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def _graph(self, cuda_graph: Graph, pool: Any = None, stream: Stream | None = None,
               capture_error_mode: str = "global") -> Iterator[None]:
        # torch.cuda.graph without stream= captures on a stream of its own (its class's default capture stream).
        on = stream if stream is not None else Stream(self, "torch.cuda.graph's own")
        self.captures.append({"stream": stream, "on": on, "capture_error_mode": capture_error_mode,
                              "graph": cuda_graph, "first_event": len(self.events)})
        with self._stream(on):
            self.events.append(("capture_begin", on))
            if self.fail_capture is not None:
                raise self.fail_capture
            yield
            self.events.append(("capture_end", on))
            if self.on_capture_end is not None:
                self.on_capture_end(cuda_graph)

    def watch(self, obj: Any, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Record ("call", method, the current stream) at every call of obj.method."""
        original = getattr(obj, method)

        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.events.append(("call", method, self.current))
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, method, recorded)

    def calls_on(self, start: int = 0, end: int | None = None) -> list[Stream]:
        """The streams of the watched calls among events[start:end]."""
        return [e[2] for e in self.events[start:end] if e[0] == "call"]


def pin(t: torch.Tensor) -> torch.Tensor:
    """A tensor object of its own on `t`'s memory: what a CUDA graph writes to, whatever later happens to `t` (a
    p.grad.set_ moves that tensor object onto other memory; the graph keeps writing the old one)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                              t.stride())
