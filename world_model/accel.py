"""The CUDA path, guarded: bf16 weights, a captured window forward, pinned frame transfers.

Everything here degrades to the plain CPU path, so callers never branch:

* :func:`prepare_for_device` moves codec + model to the device in the dtype
  that is fast there: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slower than
  fp32 on CPUs without AMX, e.g. this 2-core EPYC). On CPU it also switches the
  model's linear layers to oneDNN-packed weights (``WorldDiT.pack_linears``:
  ~4% off a streamed step at 1 thread, inference only, equal within float rounding).
* :class:`WindowStep` stands in for a ``WorldDiT`` (same ``forward`` /
  ``forward_kv`` / ``cfg`` / ``tokens_per_frame``; hand it to ``make_sampler``).
  Once the KV cache is full, every streamed forward has the same shapes and
  reads the cache through views of the same preallocated buffers
  (``kv_cache.KVCache``), so it can be replayed as a CUDA graph: inputs are
  copied into static buffers, the graph is captured after ``warmup_calls``
  calls of one signature, then replayed. Modes:

  ``eager``       the model itself (CPU default);
  ``static``      the static-buffer plumbing without capture (runs anywhere: it
                  is what the CPU tests check against the plain path);
  ``cuda_graph``  static + ``torch.cuda.CUDAGraph`` capture (CUDA default);
  ``compile``     ``torch.compile(mode="reduce-overhead")`` (inductor CUDA graphs).

  A capture that fails (e.g. an op that syncs the host) leaves that signature
  eager; ``WindowStep.fallbacks`` says why.
* :class:`FrameStager` decodes a latent and brings the uint8 frame to the host
  through a ring of pinned buffers with a non-blocking copy (CUDA); on CPU it
  is exactly ``codec.tensor_to_frames(codec.decode(z))``.
* flash-attn: ``attention.attend`` already uses it when installed, for CUDA
  bf16/fp16 calls without a mask (see :func:`describe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .attention import flash_available
from .dit import FrameKV, PastKV, WorldDiT

MODES = ("auto", "eager", "static", "cuda_graph", "compile")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (when the GPU supports it), fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def prepare_for_device(model: WorldDiT, codec: nn.Module, device: torch.device | str,
                       dtype: Optional[torch.dtype] = None) -> tuple[WorldDiT, nn.Module, torch.dtype]:
    """Move both networks to ``device`` in ``dtype`` (None: :func:`default_dtype`), eval mode."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("accel: device=cuda but CUDA is not available (use device=cpu)")
    dtype = dtype or default_dtype(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True      # fp32 leftovers (timestep MLP input) use TF32
        torch.backends.cudnn.benchmark = True             # fixed codec shapes: pick the fastest conv
    model.to(device=device, dtype=dtype).eval()
    codec.to(device=device, dtype=dtype).eval()
    pack = getattr(model, "pack_linears", None)
    if pack is not None:
        pack(device.type == "cpu" and dtype == torch.float32)
    return model, codec, dtype


def describe(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the accelerated path can use on ``device`` (for benchmark output)."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {"device": str(device), "cuda": cuda,
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "dtype": str(default_dtype(device)).replace("torch.", ""),
            "flash_attn": flash_available(),
            "flash_note": "used for unmasked bf16/fp16 CUDA calls; folded (masked) windows use SDPA"}


@dataclass
class _Slot:
    """Static buffers (and maybe a graph) for one call signature."""
    x: Tensor
    t: Tensor
    u: Tensor
    mask: Optional[Tensor]
    past: Optional[PastKV]
    prev: Optional[tuple[Tensor, Tensor]] = None    # frame stacking: predecessors and their levels
    calls: int = 0
    graph: Any = None
    out: Optional[tuple[Tensor, FrameKV]] = None


@dataclass
class _Stats:
    eager: int = 0
    static: int = 0
    replays: int = 0
    captures: int = 0
    fallbacks: list[str] = field(default_factory=list)


class WindowStep(nn.Module):
    """A WorldDiT stand-in whose fixed-shape streamed forwards run from static buffers / CUDA graphs."""

    def __init__(self, model: WorldDiT, mode: str = "auto", warmup_calls: int = 3, max_graphs: int = 8) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"accel mode must be one of {MODES}, got {mode!r}")
        self.model = model
        cuda = next(model.parameters()).is_cuda
        if mode == "auto":
            mode = "cuda_graph" if cuda else "eager"
        if mode == "cuda_graph" and not cuda:
            mode = "static"                       # graphs need CUDA; keep the same plumbing
        self.mode = mode
        self.warmup_calls = max(1, warmup_calls)
        self.max_graphs = max_graphs
        self.stats = _Stats()
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._pool: Any = None
        self._compiled: Any = None
        if mode == "compile":
            self._compiled = torch.compile(model.forward_kv, mode="reduce-overhead" if cuda else "default",
                                           dynamic=False)

    # -------------------------------------------------------------- WorldDiT surface
    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def tokens_per_frame(self) -> int:
        return self.model.tokens_per_frame

    def flops_per_forward(self, query_frames: int, past_frames: int) -> int:
        return self.model.flops_per_forward(query_frames, past_frames)

    @property
    def fallbacks(self) -> list[str]:
        return self.stats.fallbacks

    def forward(self, x: Tensor, t: Tensor, controls: Tensor, past: Optional[PastKV] = None,
                mask: Optional[Tensor] = None, time_pos: Optional[Tensor] = None,
                prev: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        return self.forward_kv(x, t, controls, past, mask, time_pos, prev)[0]

    def forward_kv(self, x: Tensor, t: Tensor, controls: Tensor, past: Optional[PastKV] = None,
                   mask: Optional[Tensor] = None, time_pos: Optional[Tensor] = None,
                   prev: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, FrameKV]:
        """Velocity and per-layer K/V like ``WorldDiT.forward_kv``.

        With graphs, the returned K/V are the graph's static outputs: valid until the
        next call of the same signature (the samplers copy them into the cache at once).
        """
        if not self.model.cfg.prev_frame:
            prev = None                           # ignored by the model: keep the signature keys simple
        if self.mode == "eager" or time_pos is not None or torch.is_grad_enabled():
            self.stats.eager += 1                 # reference paths (explicit positions), training
            return self.model.forward_kv(x, t, controls, past, mask, time_pos, prev)
        if self.mode == "compile":
            v, kv = self._compiled(x, t, controls, past, mask, None, prev)
            return v.clone(), FrameKV([(k.clone(), vv.clone()) for k, vv in kv.kv], kv.num_frames)
        slot = self._slot(x, t, controls, past, mask, prev)
        slot.x.copy_(x)
        slot.t.copy_(t)
        slot.u.copy_(controls)
        if slot.mask is not None and mask is not None:
            slot.mask.copy_(mask)
        if slot.prev is not None and prev is not None:
            slot.prev[0].copy_(prev[0])
            slot.prev[1].copy_(prev[1])
        slot.calls += 1
        if self.mode == "cuda_graph" and slot.graph is None and slot.calls > self.warmup_calls:
            self._capture(slot)
        if slot.graph is not None and slot.out is not None:
            slot.graph.replay()
            self.stats.replays += 1
            v, kv = slot.out
            return v.clone(), kv
        self.stats.static += 1
        return self.model.forward_kv(slot.x, slot.t, slot.u, slot.past, slot.mask, None, slot.prev)

    # -------------------------------------------------------------- static buffers / graphs
    def _slot(self, x: Tensor, t: Tensor, u: Tensor, past: Optional[PastKV], mask: Optional[Tensor],
              prev: Optional[tuple[Tensor, Tensor]] = None) -> _Slot:
        # The cache hands out views of fixed buffers: same P -> same addresses, so a
        # captured graph reads the live cache in place (no copy of the past).
        P = past.num_frames if past is not None else 0
        ptrs = tuple((k.data_ptr(), v.data_ptr()) for k, v in past.kv) if past is not None and P else ()
        key = (tuple(x.shape), x.dtype, P, ptrs, None if mask is None else tuple(mask.shape), prev is not None)
        slot = self._slots.get(key)
        if slot is None:
            slot = _Slot(torch.empty_like(x), torch.empty_like(t), torch.empty_like(u),
                         None if mask is None else torch.empty_like(mask), past if P else None,
                         None if prev is None else (torch.empty_like(prev[0]), torch.empty_like(prev[1])))
            self._slots[key] = slot
        return slot

    def _capture(self, slot: _Slot) -> None:
        if sum(s.graph is not None for s in self._slots.values()) >= self.max_graphs:
            slot.graph = None
            return
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            args = (slot.x, slot.t, slot.u, slot.past, slot.mask, None, slot.prev)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):             # warm-up on a side stream (cuBLAS workspaces)
                for _ in range(2):
                    self.model.forward_kv(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                slot.out = self.model.forward_kv(*args)
            slot.graph = graph
            self.stats.captures += 1
        except Exception as e:                        # e.g. a host sync inside the forward
            slot.graph, slot.out = None, None
            slot.calls = -10 ** 9                     # never retry this signature
            self.stats.fallbacks.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


class FrameStager:
    """Latent (C, h, w) -> decoded uint8 frame (H, W, 3) on the host.

    CUDA: decode and quantise on the GPU, then one non-blocking copy into the next
    of ``ring`` pinned host buffers, copied out (the producer may queue any number
    of frames, so a returned array never aliases a buffer). CPU: the plain path.
    ``force_ring`` exercises the ring path on CPU (tests).
    """

    def __init__(self, codec: nn.Module, ring: int = 4, force_ring: bool = False) -> None:
        self.codec = codec
        self.device = next(codec.parameters()).device
        self.use_ring = self.device.type == "cuda" or force_ring
        self.ring = max(2, ring)
        self._bufs: list[Tensor] = []
        self._i = 0
        self._event: Any = torch.cuda.Event() if self.device.type == "cuda" else None

    @torch.no_grad()
    def __call__(self, z: Tensor) -> np.ndarray:
        x = self.codec.decode(z[None].to(next(self.codec.parameters()).dtype))   # (1, 3, H, W) in [-1, 1]
        if not self.use_ring:
            return self.codec.tensor_to_frames(x)[0]
        # same arithmetic as codec.tensor_to_frames, on the device
        u8 = ((x[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)  # (3, H, W)
        hwc = u8.permute(1, 2, 0).contiguous()                                         # (H, W, 3)
        if not self._bufs:
            pin = self.device.type == "cuda"
            self._bufs = [torch.empty(hwc.shape, dtype=torch.uint8, pin_memory=pin) for _ in range(self.ring)]
        buf = self._bufs[self._i]
        self._i = (self._i + 1) % self.ring
        buf.copy_(hwc, non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()
            self._event.synchronize()                 # waits for this copy only, not the whole device
        return buf.numpy().copy()                     # 12 KB: frames may sit in a queue of any length
