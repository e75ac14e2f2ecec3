"""Where every tensor lives in the packed byte stream that travels on the wire.

Why one byte stream cut into fixed-size buckets (rather than per-dtype buckets of whole tensors):

- Every tensor is viewed as raw bytes (``uint8``), so one stream carries all dtypes (float32,
  bf16, int64, bool, ...), and a broadcast is a plain byte copy: received tensors are bitwise
  copies, with no dtype-specific path in gloo or NCCL.
- Tensors sit at 64-byte-aligned offsets of one logical stream of ``total_bytes``; the stream is cut
  into buckets of ``bucket_bytes`` regardless of tensor boundaries. A receiver can therefore
  broadcast straight into slices of ONE flat staging buffer (zero copies, the staged tensors are
  views of it), and a receiver whose layout differs can still sink the buckets knowing only
  ``total_bytes`` and ``bucket_bytes``, so it refuses without breaking the collective for the
  others.
- The layout is a pure function of the ordered (name, shape, dtype) list, so sender and receiver
  compute the same offsets independently, and one short hash of that list (``Layout.hash``) is
  enough to check agreement before any big transfer.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

ALIGN = 64
"""Byte alignment of every tensor in the stream: enough for any dtype view and a cache line."""

LAYOUT_FORMAT = 1
"""Bumped whenever the offset rule changes; part of the hash so old and new peers never agree."""

NamedTensors = Sequence[tuple[str, torch.Tensor]]
TensorSource = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | torch.nn.Module


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class Layout:
    """The ordered tensors of a model and their byte ranges in the packed stream."""

    specs: tuple[TensorSpec, ...]
    total_bytes: int
    hash: str
    _offsets: list[int] = field(default_factory=list, repr=False, compare=False)

    @property
    def num_tensors(self) -> int:
        return len(self.specs)

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def hash_int(self) -> int:
        """The hash as a non-negative int64 (60 bits), for the int64 header tensor."""
        return int(self.hash[:15], 16)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def describe(self) -> str:
        return f"layout {self.hash} ({self.num_tensors} tensors, {self.total_bytes} bytes)"

    def overlapping(self, start: int, end: int) -> Iterator[TensorSpec]:
        """Specs whose byte range intersects [start, end), in stream order."""
        i = max(bisect.bisect_right(self._offsets, start) - 1, 0)
        for spec in self.specs[i:]:
            if spec.offset >= end:
                break
            if spec.end > start:
                yield spec


def named_tensors_of(source: TensorSource) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) list both sides agree on.

    A module contributes ``named_parameters()`` (tied weights once, under their first name, like
    ``save_pretrained``); buffers are not sent: for causal LMs they are derived (rotary caches)
    and not trained. Pass an explicit list or a mapping (e.g. a ``state_dict``) to send
    something else, such as copies cast to the dtype the generators serve.
    """
    if isinstance(source, torch.nn.Module):
        items = [(n, p.detach()) for n, p in source.named_parameters()]
    elif isinstance(source, Mapping):
        items = [(str(n), t) for n, t in source.items()]
    else:
        items = [(str(n), t) for n, t in source]
    seen: set[str] = set()
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
    return items


def layout_of(named_tensors: TensorSource) -> Layout:
    """Offsets and hash of an ordered list of named tensors (or a module's parameters)."""
    items = named_tensors_of(named_tensors)
    specs: list[TensorSpec] = []
    digest = hashlib.sha256(f"conspo-weight-layout/{LAYOUT_FORMAT}/{ALIGN}\n".encode())
    offset = 0
    for name, tensor in items:
        shape = tuple(int(d) for d in tensor.shape)
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(TensorSpec(len(specs), name, shape, tensor.dtype, offset, nbytes))
        digest.update(f"{name}\t{dtype_name(tensor.dtype)}\t{shape}\n".encode())
        offset = _align(offset + nbytes)
    return Layout(tuple(specs), offset, digest.hexdigest()[:16], [s.offset for s in specs])


def chunk_bounds(total_bytes: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of the buckets of a stream."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    return [(a, min(a + bucket_bytes, total_bytes)) for a in range(0, total_bytes, bucket_bytes)]


def effective_bucket_bytes(total_bytes: int, bucket_bytes: int) -> int:
    """Bucket size actually used: aligned, and no larger than the stream itself."""
    aligned = max(bucket_bytes // ALIGN * ALIGN, ALIGN)
    return max(min(aligned, total_bytes), ALIGN) if total_bytes else ALIGN


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (copies only when it is not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


def _storage_uses(tensor: torch.Tensor) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return int(use_count(tensor.untyped_storage()._cdata))


class BufferPool:
    """Reusable flat uint8 CPU buffers for buckets and staging.

    Why: touching fresh memory is what costs, not copying it: in the 2-core VM this project is
    developed on, the first write to a freshly allocated 2 GB buffer took about 5 s (page faults)
    against 0.7 s for a second write. A buffer is handed out again only when no tensor (view)
    other than the pool's own holds its storage, so staged weights that a generator still holds
    are never overwritten. CUDA buffers are not pooled: the caching allocator already reuses them.
    """

    def __init__(self, max_buffers: int = 2) -> None:
        self.max_buffers = max_buffers
        self._buffers: list[tuple[torch.Tensor, int]] = []

    def get(self, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        if device.type != "cpu" or self.max_buffers <= 0:
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        # Callers get a view, never the pooled tensor itself, so that every holder (of that
        # view or of tensors viewing it) shows up in the storage's use count.
        free = [(b, base) for b, base in self._buffers if _storage_uses(b) == base]
        for buf, _ in free:
            if buf.numel() == nbytes:
                return buf[:]
        if len(self._buffers) >= self.max_buffers and free:
            self._buffers.remove(free[0])  # a free buffer of another size makes room
        buf = torch.empty(nbytes, dtype=torch.uint8)
        base = _storage_uses(buf)
        if base is not None and len(self._buffers) < self.max_buffers:
            self._buffers.append((buf, base))
        return buf[:]

    def clear(self) -> None:
        self._buffers.clear()


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for flat uint8 tensors; a plain memcpy when both are on the CPU.

    torch's CPU copy kernel splits even a 256 KB byte copy across its OpenMP threads; on a busy
    machine (every core taken by other processes) that was measured at 5 ms per 256 KB against
    0.1 ms for ``numpy.copyto``, which is single-threaded and releases the GIL.
    """
    if dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (under ``no_grad``), through ``copy_bytes`` when both are contiguous
    CPU tensors of the same dtype and shape."""
    with torch.no_grad():
        same = dst.dtype == src.dtype and dst.shape == src.shape
        if same and dst.is_contiguous() and src.is_contiguous() and dst.numel():
            copy_bytes(byte_view(dst), byte_view(src))
        else:
            dst.copy_(src)


def pack_into(
    sources: Sequence[torch.Tensor], layout: Layout, start: int, end: int, out: torch.Tensor
) -> torch.Tensor:
    """Copy bytes [start, end) of the stream into ``out[: end - start]`` (any devices)."""
    buf = out[: end - start]
    for spec in layout.overlapping(start, end):
        src = sources[spec.index]
        a, b = max(spec.offset, start), min(spec.end, end)
        copy_bytes(buf[a - start : b - start], src[a - spec.offset : b - spec.offset])
    return buf


def check_matches(named: NamedTensors, layout: Layout) -> list[torch.Tensor]:
    """Byte views of ``named`` after checking that they have exactly ``layout``'s specs."""
    if len(named) != layout.num_tensors:
        raise ValueError(f"{len(named)} tensors for a layout of {layout.num_tensors}")
    views = []
    for (name, tensor), spec in zip(named, layout.specs, strict=True):
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r} does not match the layout entry {spec}")
        views.append(byte_view(tensor))
    return views


def bucketize(
    named_tensors: TensorSource,
    bucket_bytes: int,
    *,
    layout: Layout | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """The packed buckets of a model, one fresh uint8 tensor each (for tests and simple users;
    the broadcast path packs into two reused buffers instead)."""
    named = named_tensors_of(named_tensors)
    layout = layout or layout_of(named)
    views = check_matches(named, layout)
    size = effective_bucket_bytes(layout.total_bytes, bucket_bytes)
    for a, b in chunk_bounds(layout.total_bytes, size):
        out = torch.zeros(b - a, dtype=torch.uint8, device=device)
        yield pack_into(views, layout, a, b, out)


def unbucketize(flat: torch.Tensor, layout: Layout) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor inside one flat uint8 buffer of ``layout.total_bytes`` (no copies)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() < layout.total_bytes:
        raise ValueError(f"need a flat uint8 buffer of {layout.total_bytes} bytes")
    out = []
    for spec in layout.specs:
        raw = flat[spec.offset : spec.end]
        out.append((spec.name, raw.view(spec.dtype).view(spec.shape)))
    return out


def join_buckets(buckets: Iterable[torch.Tensor], layout: Layout) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``bucketize``: concatenate the buckets and view the tensors."""
    flat = torch.cat([b.reshape(-1).to("cpu") for b in buckets])
    if flat.numel() != layout.total_bytes:
        raise ValueError(f"buckets hold {flat.numel()} bytes, the layout {layout.total_bytes}")
    return unbucketize(flat, layout)
