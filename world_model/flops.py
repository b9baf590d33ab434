"""FLOP accounting for benchmarks: what a streamed frame costs, and what the machine can do.

``WorldDiT.flops_per_forward(query_frames, past_frames)`` counts the matmul
FLOPs of ONE forward from the model config. What a *frame* costs depends on the
sampler: how many forwards it makes, with how many query frames (a rolling
window of W frames, plus the folded clean frame when ``fold_rerun``) against
how many cached frames. Rather than re-deriving each sampler's schedule,
:class:`ForwardTracer` wraps the model's two public entry points (``forward``
and ``forward_kv``) on the instance, records every call's query and past frame
counts and its wall time, and classifies it:

* ``window``: a denoising forward (the window, possibly with the folded clean frame);
* ``rerun``:  a separate cache write of one clean frame (``forward_kv`` without
  a mask: what ``fold_rerun=False`` costs per emitted frame).

FLOPs of a call = ``flops_per_forward(F, P)`` for its actual F and P, so the
folded clean frame and the growing cache are counted as they happen.

:func:`matmul_peak_gflops` measures the fp32 matmul peak at the current thread
count (best of a few timed ``torch.mm``), the denominator of model FLOPs
utilisation (MFU). :func:`counted_flops` counts any callable's FLOPs with
PyTorch's ``FlopCounterMode`` (CPU SDPA included), for the codec and for tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


@dataclass
class ForwardCall:
    kind: str            # "window" | "rerun"
    query_frames: int    # F: frames in the call's input
    past_frames: int     # P: cached frames attended to
    seconds: float       # wall time of the call (synchronised on CUDA)
    flops: int           # flops_per_forward(F, P)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardTracer:
    """Records every forward of ``model`` while installed (``with ForwardTracer(m) as tr:``).

    ``take()`` returns and clears the calls recorded since the last ``take``.
    Nested calls (an entry point calling the other) are recorded once.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[ForwardCall] = []
        self._depth = 0
        try:
            self._device = next(model.parameters()).device
        except StopIteration:
            self._device = torch.device("cpu")
        self._flops: Callable[[int, int], int] = getattr(model, "flops_per_forward")

    def _wrap(self, fn: Callable[..., Any], entry: str) -> Callable[..., Any]:
        def traced(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(x, *args, **kwargs)
            past = kwargs.get("past", args[2] if len(args) > 2 else None)
            mask = kwargs.get("mask", args[3] if len(args) > 3 else None)
            P = past.num_frames if past is not None else 0
            Fq = int(x.shape[1])                                       # x (B, F, C, h, w)
            kind = "rerun" if entry == "forward_kv" and mask is None else "window"
            _sync(self._device)
            t0 = time.perf_counter()
            self._depth += 1
            try:
                out = fn(x, *args, **kwargs)
            finally:
                self._depth -= 1
            _sync(self._device)
            self.calls.append(ForwardCall(kind, Fq, P, time.perf_counter() - t0, int(self._flops(Fq, P))))
            return out
        return traced

    def __enter__(self) -> "ForwardTracer":
        # Instance attributes shadow the class methods: nn.Module.__call__ looks up self.forward.
        self.model.forward = self._wrap(type(self.model).forward.__get__(self.model), "forward")
        self.model.forward_kv = self._wrap(type(self.model).forward_kv.__get__(self.model), "forward_kv")
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("forward", "forward_kv"):
            self.model.__dict__.pop(name, None)

    def take(self) -> list[ForwardCall]:
        out, self.calls = self.calls, []
        return out


@dataclass
class FrameCost:
    """Per-emitted-frame means over a list of recorded calls."""
    forwards: float
    window_s: float
    rerun_s: float
    flops: float
    query_frames: list[tuple[int, int]]  # distinct (F, P) shapes seen, sorted

    @classmethod
    def of(cls, calls: list[ForwardCall], frames: int) -> "FrameCost":
        n = max(frames, 1)
        return cls(forwards=len(calls) / n,
                   window_s=sum(c.seconds for c in calls if c.kind == "window") / n,
                   rerun_s=sum(c.seconds for c in calls if c.kind == "rerun") / n,
                   flops=sum(c.flops for c in calls) / n,
                   query_frames=sorted({(c.query_frames, c.past_frames) for c in calls}))


# ------------------------------------------------------------------ measured peak
def _best_seconds(fn: Callable[[], Any], reps: int, rounds: int, device: torch.device) -> float:
    """Best over ``rounds`` of the mean time of ``reps`` calls."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def matmul_peak_gflops(m: int, k: int, n: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, min_seconds: float = 0.05,
                       rounds: int = 5) -> float:
    """Best measured GFLOP/s of ``(m, k) @ (k, n)`` at the current torch thread count."""
    device = torch.device(device)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)           # preallocated: time the GEMM only
    flops = 2.0 * m * k * n
    one = _best_seconds(lambda: torch.mm(a, b, out=c), 1, 1, device)
    reps = max(1, int(min_seconds / max(one, 1e-7)))
    return flops / _best_seconds(lambda: torch.mm(a, b, out=c), reps, rounds, device) / 1e9


# ------------------------------------------------------------------ counted FLOPs
def _sdpa_formula(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    # CPU SDPA dispatches to an op FlopCounterMode has no formula for (counted as 0).
    ops: dict[Any, Callable[..., int]] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        ops[op] = _sdpa_formula
    return ops


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs PyTorch's FlopCounterMode counts while running ``fn()`` (matmuls, convs, attention)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as fc:
        fn()
    return int(fc.get_total_flops())

