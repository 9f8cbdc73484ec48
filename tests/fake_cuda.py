"""A CUDA machine on the CPU, as strict as torch: torch.cuda's own Python code runs unchanged over a stand-in driver,
and a tensor "on" ``cuda:N`` is a CPU tensor behind a wrapper whose ``.device`` really is ``cuda:N``.

Only what lies below torch's Python layer is replaced: the ``torch._C._cuda_*`` calls (device count, current
device, streams, synchronize, the cache), the stream and event base classes, the device properties and
``cudaMemGetInfo``, and torch's CUDA allocation (``empty`` on the CUDA dispatch key). Every public function the
library calls — ``set_device``, ``Stream``, ``current_stream``, ``stream``, ``synchronize``, ``mem_get_info`` … —
is torch's own, so it checks its arguments with torch's helpers and fails exactly where torch fails (an index-less
``set_device``, a CPU device for ``current_stream``). Tensor operations check devices as CUDA kernels do: a CPU
tensor (other than a 0-dim scalar) beside a CUDA one is an error, ``.numpy()`` of a CUDA tensor is an error.

What the stand-in records, for tests to count: host→device copies (pinned or not, blocking or not, and index
lists uploaded behind an indexing call), device→host copies, host syncs (``.item()``, ``synchronize``), streams
made (device, priority), events recorded (which stream), kernels queued per stream, ``empty_cache`` calls.

One difference from a real machine, on purpose: ``param.data = other`` between a CPU and a CUDA tensor raises
here (CUDA allows it); the library moves modules with ``.to`` and ``load_state_dict(assign=True)`` instead.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.utils._pytree import tree_flatten, tree_map

GiB = 2**30
CUDA_TYPE = 1  # c10::DeviceType::CUDA, what a stream's ``device_type`` says
_PRIORITY_LEVELS = 4  # torch keeps stream pools for priorities 0, -1, -2, -3 and maps others to the nearest

_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


@dataclass
class Copy:
    """One copy between the host and a device."""

    thread: str
    shape: tuple[int, ...]
    nbytes: int
    pinned: bool
    non_blocking: bool
    hidden: bool = False  # an index list uploaded by an indexing call (a blocking copy the caller never wrote)


@dataclass
class FakeStreamInfo:
    device: int
    priority: int
    thread: str


@dataclass
class Record:
    """Everything the stand-in saw."""

    uploads: list[Copy] = field(default_factory=list)
    downloads: list[Copy] = field(default_factory=list)
    host_syncs: Counter = field(default_factory=Counter)  # thread name → .item(), synchronize(), event waits
    set_devices: list[tuple[str, int]] = field(default_factory=list)
    events: list[tuple[int, int]] = field(default_factory=list)  # (device, stream id) of each record()
    kernels: Counter = field(default_factory=Counter)  # (thread name, device, stream id) → operations queued
    empty_cache: int = 0


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor (``inner``) presented as living on a CUDA device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=device, requires_grad=False)
        t.inner = inner
        return t

    def __repr__(self) -> str:
        return f"FakeCudaTensor({tuple(self.shape)}, {self.dtype}, {self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA or getattr(func, "__name__", "") == "__get__":  # .device, .shape, .dtype …
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        return FakeCuda.active.call(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return FakeCuda.active.dispatch(func, args, kwargs or {})


_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.stride, torch.Tensor.numel, torch.Tensor.element_size,
             torch.Tensor.is_contiguous, torch.Tensor.storage_offset, torch.Tensor.is_floating_point,
             torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__hash__, torch.Tensor.get_device,
             torch.Tensor.__len__, torch.Tensor.is_complex, torch.Tensor.nelement, torch.Tensor.ndimension}


class FakeCuda:
    """``count`` CUDA devices of one kind on the CPU; :meth:`install` puts them in place for a test."""

    active: FakeCuda | None = None

    def __init__(self, count: int = 1, *, name: str = "NVIDIA H100 80GB HBM3", capability: tuple[int, int] = (9, 0),
                 total_memory: int = 80 * GiB, free_memory: int | None = None, sms: int = 132):
        self.count, self.name, self.capability, self.sms = count, name, capability, sms
        self.total_memory = total_memory
        self.free_memory = total_memory - GiB if free_memory is None else free_memory
        self.seen = Record()
        self.streams: dict[int, FakeStreamInfo] = {}
        self._ids = itertools.count(1)  # stream id 0 is each device's default stream
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._pinned: dict[int, weakref.ref] = {}  # storage address → the pinned tensor that owns it

    # ------------------------------------------------------------------------------------------- per thread
    def _device(self) -> int:
        return getattr(self._tls, "device", 0)

    def _current_streams(self) -> dict[int, int]:
        if not hasattr(self._tls, "streams"):
            self._tls.streams = {}
        return self._tls.streams

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal (device {index} of {self.count})")
        return index

    # ------------------------------------------------------------------------------------------------ driver
    def _set_device(self, index: int) -> None:
        self._tls.device = self._check_index(int(index))
        with self._lock:
            self.seen.set_devices.append((threading.current_thread().name, int(index)))

    def _exchange_device(self, index: int) -> int:
        if index < 0:
            return -1
        previous = self._device()
        if index != previous:
            self._tls.device = self._check_index(index)
        return previous

    def _current_stream(self, index: int) -> tuple[int, int, int]:
        index = self._check_index(index)
        return self._current_streams().get(index, 0), index, CUDA_TYPE

    def _default_stream(self, index: int) -> tuple[int, int, int]:
        return 0, self._check_index(index), CUDA_TYPE

    def _set_stream(self, stream_id: int = 0, device_index: int = 0, device_type: int = 0) -> None:
        if device_type != CUDA_TYPE or (stream_id != 0 and self.streams[stream_id].device != device_index):
            raise RuntimeError(f"not a CUDA stream: id {stream_id}, device {device_index}, type {device_type}")
        self._tls.device = self._check_index(device_index)  # torch's setStream makes the stream's device current
        self._current_streams()[device_index] = stream_id

    def _synchronize(self) -> None:
        self._host_sync()

    def _host_sync(self) -> None:
        with self._lock:
            self.seen.host_syncs[threading.current_thread().name] += 1

    def _empty_cache(self) -> None:
        self.seen.empty_cache += 1

    def _properties(self, index: int) -> SimpleNamespace:
        self._check_index(index)
        major, minor = self.capability
        return SimpleNamespace(name=self.name, major=major, minor=minor, total_memory=self.total_memory,
                               multi_processor_count=self.sms, is_integrated=False, is_multi_gpu_board=False)

    def _mem_get_info(self, index: int) -> tuple[int, int]:
        self._check_index(index)
        return self.free_memory, self.total_memory

    # ----------------------------------------------------------------------------------------------- streams
    def _new_stream(self, cls, priority: int = 0, stream_id: int = 0, device_index: int = 0, device_type: int = 0,
                    stream_ptr: int = 0):
        stream = object.__new__(cls)
        if stream_id or device_index or device_type:  # an existing stream, unpacked from its three numbers
            if device_type != CUDA_TYPE or (stream_id and stream_id not in self.streams):
                raise RuntimeError(f"unknown CUDA stream {stream_id} on device {device_index}")
            stream.stream_id, stream.device_index = stream_id, self._check_index(device_index)
        else:  # a new one from the pool of the current device, at the nearest priority torch keeps
            level = min(max(-int(priority), 0), _PRIORITY_LEVELS - 1)
            with self._lock:
                stream.stream_id = next(self._ids)
                self.streams[stream.stream_id] = FakeStreamInfo(self._device(), -level,
                                                                threading.current_thread().name)
            stream.device_index = self._device()
        stream.device_type = CUDA_TYPE
        return stream

    def priority_of(self, stream) -> int:
        """The priority of a stream (the default stream's is 0, the lowest)."""
        return 0 if stream.stream_id == 0 else self.streams[stream.stream_id].priority

    # ------------------------------------------------------------------------------------------------ events
    def _record_event(self, event, stream=None) -> None:
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"record() expects a torch.cuda.Stream, got {type(stream).__name__}")
        if getattr(event, "_device", None) is not None and event._device != stream.device_index:
            raise RuntimeError(f"Event device {event._device} does not match recording stream's device "
                               f"{stream.device_index}.")
        event._device, event._recorded = stream.device_index, True
        with self._lock:
            self.seen.events.append((stream.device_index, stream.stream_id))

    def _wait_event(self, event, stream=None) -> None:
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"wait() expects a torch.cuda.Stream, got {type(stream).__name__}")

    def _elapsed(self, start, end) -> float:
        if not (start._timing and end._timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if not (getattr(start, "_recorded", False) and getattr(end, "_recorded", False)):
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return 0.0

    def _record_stream(self, tensor: torch.Tensor, stream) -> None:
        if not isinstance(tensor, FakeCudaTensor):
            raise RuntimeError("Could not run 'aten::record_stream' with arguments from the 'CPU' backend.")
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"record_stream() expects a torch.cuda.Stream, got {type(stream).__name__}")

    # ----------------------------------------------------------------------------------------------- memory
    def _pin(self, tensor: torch.Tensor, device=None) -> torch.Tensor:
        pinned = tensor.clone()
        address = pinned.untyped_storage().data_ptr()
        self._pinned[address] = weakref.ref(pinned)
        weakref.finalize(pinned, self._pinned.pop, address, None)
        return pinned

    def _is_pinned(self, tensor: torch.Tensor, device=None) -> bool:
        if tensor.numel() == 0:
            return False
        owner = self._pinned.get(tensor.untyped_storage().data_ptr())
        return owner is not None and owner() is not None

    def _empty(self, size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
        index = self._check_index(device.index if device.index is not None else self._device())
        inner = torch.empty(size, dtype=dtype, memory_format=memory_format or torch.contiguous_format)
        return FakeCudaTensor(inner, torch.device("cuda", index))

    def _empty_strided(self, size, stride, dtype=None, layout=None, device=None, pin_memory=None):
        index = self._check_index(device.index if device.index is not None else self._device())
        return FakeCudaTensor(torch.empty_strided(size, stride, dtype=dtype), torch.device("cuda", index))

    # --------------------------------------------------------------------------------------------- operations
    def _copy(self, thread: str, src: torch.Tensor, non_blocking: bool, *, to_device: bool,
              hidden: bool = False) -> None:
        copy = Copy(thread, tuple(src.shape), src.numel() * src.element_size(),
                    pinned=to_device and self._is_pinned(src), non_blocking=bool(non_blocking), hidden=hidden)
        with self._lock:
            (self.seen.uploads if to_device else self.seen.downloads).append(copy)
        if hidden or not to_device and not non_blocking:
            self._host_sync()

    def call(self, func, args, kwargs):
        """A torch function or Tensor method with a CUDA wrapper among its arguments, run on the CPU tensors behind
        them (below torch's Python bindings, some of which would guard the device first), devices checked."""
        thread = threading.current_thread().name
        flat, _ = tree_flatten((args, kwargs))
        devices = {t.device for t in flat if isinstance(t, FakeCudaTensor)}
        host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.dim()]
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._to(thread, func, args, kwargs)
        if func is torch.Tensor.numpy:
            raise TypeError(f"can't convert {args[0].device} device type tensor to numpy. Use Tensor.cpu() to copy "
                            "the tensor to host memory first.")
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
                    torch.Tensor.__float__, torch.Tensor.__index__):
            self._copy(thread, args[0], False, to_device=False)  # the host waits for the value
            return func(*tree_map(_unwrap, args), **kwargs)
        if func is torch.Tensor.pin_memory:
            raise RuntimeError(f"cannot pin '{args[0].device}' memory: only CPU memory can be pinned")
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch._has_compatible_shallow_copy_type:
            return False  # a CUDA wrapper and a CPU tensor (or Parameter) never share a TensorImpl type
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = _host_indices(args[1])
            for t in tree_flatten(index)[0]:
                if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor):
                    self._copy(thread, t, False, to_device=True, hidden=True)
                elif isinstance(t, FakeCudaTensor) and t.dtype == torch.bool:
                    self._host_sync()  # a mask's count of True values comes back to the host first
            args = (args[0], index, *args[2:])
            host = [t for t in host if t is not args[1]]
            if func is torch.Tensor.__setitem__ and isinstance(args[2], torch.Tensor) and args[2].dim() \
                    and not isinstance(args[2], FakeCudaTensor):
                self._copy(thread, args[2], False, to_device=True)
                host = [t for t in host if t is not args[2]]
            host = [t for t in host if not any(t is i for i in tree_flatten(index)[0])]
        if func in (torch.Tensor.copy_,):
            dst, src = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self._copy(thread, dst if isinstance(src, FakeCudaTensor) else src, non_blocking,
                       to_device=isinstance(dst, FakeCudaTensor))
            if not isinstance(dst, FakeCudaTensor):
                self._host_sync() if not non_blocking else None
                return dst.copy_(src.inner, non_blocking=non_blocking)
            host = []
        self._check_devices(func, devices, host)
        device = next(iter(devices))
        self._kernel(thread, device)
        wrappers = {id(t.inner): t for t in flat if isinstance(t, FakeCudaTensor)}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(lambda x: _wrap(x, device, wrappers), out)

    def _to(self, thread, func, args, kwargs):
        """``Tensor.to`` / ``.cuda()`` / ``.cpu()`` of a CUDA wrapper."""
        x = args[0]
        if func is torch.Tensor.cpu:
            device, dtype, non_blocking, memory_format = torch.device("cpu"), None, False, None
        elif func is torch.Tensor.cuda:
            index = torch.cuda._utils._get_device_index(args[1] if len(args) > 1 else kwargs.get("device"), True)
            device, dtype, non_blocking, memory_format = torch.device("cuda", index), None, \
                kwargs.get("non_blocking", False), None
        else:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
        rest = {k: v for k, v in (("dtype", dtype), ("memory_format", memory_format)) if v is not None}
        if device is not None and device.type == "cpu":
            self._copy(thread, x, non_blocking, to_device=False)
            return x.inner.to(**rest) if rest else x.inner.clone()
        if device is not None and device.type != "cuda":
            raise RuntimeError(f"the stand-in knows no {device.type} device")
        if device is not None and device.index is not None and device.index != x.device.index:
            raise NotImplementedError("copies between two fake CUDA devices")
        self._kernel(thread, x.device)
        out = x.inner.to(**rest) if rest else x.inner
        return x if out is x.inner else FakeCudaTensor(out, x.device)

    def _check_devices(self, func, devices, host) -> None:
        if len(devices) > 1 or (devices and host):
            found = sorted({str(d) for d in devices} | ({"cpu"} if host else set()))
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{found[0]} and {found[1]}! ({getattr(func, '__name__', func)})")

    def _kernel(self, thread: str, device: torch.device) -> None:
        with self._lock:
            self.seen.kernels[(thread, device.index, self._current_streams().get(device.index, 0))] += 1

    def dispatch(self, func, args, kwargs):
        """Run ``func`` on the CPU tensors behind the wrappers, checking devices as a CUDA kernel would."""
        thread = threading.current_thread().name
        if func is torch.ops.aten._has_compatible_shallow_copy_type.default:
            return False  # a CUDA wrapper and a CPU tensor (or Parameter) never share a TensorImpl type
        if func.overloadpacket is torch.ops.aten.to:  # composite: decomposes into _to_copy / alias below
            return func.decompose(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        devices = {t.device for t in flat if isinstance(t, FakeCudaTensor)}
        host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.dim()]
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if isinstance(dst, FakeCudaTensor) and not isinstance(src, FakeCudaTensor):
                self._copy(thread, src, non_blocking, to_device=True)
            elif isinstance(src, FakeCudaTensor) and not isinstance(dst, FakeCudaTensor):
                self._copy(thread, src, non_blocking, to_device=False)
        elif func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            target = torch.device(kwargs["device"])
            x = args[0]
            if target.type == "cpu":
                self._copy(thread, x, kwargs.get("non_blocking", False), to_device=False)
                rest = {k: v for k, v in kwargs.items() if k not in ("device", "pin_memory", "non_blocking")}
                return torch.ops.aten._to_copy.default(x.inner, **rest)
            if target.index is not None and target != x.device:
                raise NotImplementedError("copies between two fake CUDA devices")
        elif func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self._host_sync()  # .item(), bool(), int() of a device value: the host waits for the GPU
        elif func in _INDEXING and host:
            for t in host:  # a CPU index tensor: torch copies it up, blocking, before indexing
                if t.dtype in (torch.int64, torch.int32, torch.bool):
                    self._copy(thread, t, False, to_device=True, hidden=True)
            host = [t for t in host if t.dtype not in (torch.int64, torch.int32, torch.bool)]
        elif func is torch.ops.aten.is_pinned.default:
            return False
        elif func is torch.ops.aten._pin_memory.default:
            raise RuntimeError(f"cannot pin '{args[0].device}' memory: only CPU memory can be pinned")
        self._check_devices(func, devices, host if func not in _CROSS_DEVICE else [])
        device = next(iter(devices))
        self._kernel(thread, device)
        wrappers = {id(t.inner): t for t in flat if isinstance(t, FakeCudaTensor)}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten.copy_.default:
            return args[0]
        return tree_map(lambda x: _wrap(x, device, wrappers), out)

    # --------------------------------------------------------------------------------------------- install
    def install(self, monkeypatch) -> FakeCuda:
        """Put the stand-in in place for the rest of the test (``monkeypatch`` undoes all of it)."""
        cuda, C = torch.cuda, torch._C
        for name, fn in {"_cuda_getDeviceCount": lambda: self.count, "_cuda_init": lambda: None,
                         "_cuda_getDevice": self._device, "_cuda_setDevice": self._set_device,
                         "_cuda_getCurrentStream": self._current_stream,
                         "_cuda_getDefaultStream": self._default_stream, "_cuda_setStream": self._set_stream,
                         "_cuda_synchronize": self._synchronize, "_cuda_emptyCache": self._empty_cache}.items():
            monkeypatch.setattr(C, name, fn, raising=False)
        monkeypatch.setattr(cuda, "_initialized", False)  # torch's own lazy init runs, over this driver
        monkeypatch.setattr(cuda, "_cached_device_count", None)
        monkeypatch.setattr(cuda, "_cudart", SimpleNamespace(cudaMemGetInfo=self._mem_get_info))
        monkeypatch.setattr(cuda, "_get_device_properties", self._properties, raising=False)
        monkeypatch.setattr(cuda, "_exchange_device", self._exchange_device)
        monkeypatch.setattr(cuda, "_maybe_exchange_device", self._exchange_device)
        monkeypatch.setattr(cuda, "default_generators", tuple(torch.Generator() for _ in range(self.count)))
        monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
        monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: -1, raising=False)

        fake = self
        stream_base, event_base = C._CudaStreamBase, C._CudaEventBase
        monkeypatch.setattr(stream_base, "__new__", lambda cls, **kw: fake._new_stream(cls, **kw))
        monkeypatch.setattr(stream_base, "__init__", lambda self, *a, **kw: None)
        monkeypatch.setattr(stream_base, "device", property(lambda s: torch.device("cuda", s.device_index)),
                            raising=False)
        monkeypatch.setattr(stream_base, "cuda_stream", property(lambda s: 0x1000 + s.stream_id), raising=False)
        monkeypatch.setattr(stream_base, "priority", property(lambda s: fake.priority_of(s)), raising=False)
        monkeypatch.setattr(stream_base, "query", lambda s: True, raising=False)
        monkeypatch.setattr(stream_base, "synchronize", lambda s: fake._host_sync(), raising=False)
        monkeypatch.setattr(stream_base, "__eq__", lambda s, o: (s.stream_id, s.device_index)
                            == (o.stream_id, o.device_index), raising=False)

        def new_event(cls, enable_timing=False, blocking=False, interprocess=False, **kw):
            event = object.__new__(cls)
            event._timing, event._device, event._recorded = bool(enable_timing), None, False
            return event

        monkeypatch.setattr(event_base, "__new__", new_event)
        monkeypatch.setattr(event_base, "__init__", lambda self, *a, **kw: None)
        monkeypatch.setattr(event_base, "record", lambda e, stream=None: fake._record_event(e, stream), raising=False)
        monkeypatch.setattr(event_base, "wait", lambda e, stream=None: fake._wait_event(e, stream), raising=False)
        monkeypatch.setattr(event_base, "query", lambda e: True, raising=False)
        monkeypatch.setattr(event_base, "synchronize", lambda e: fake._host_sync(), raising=False)
        monkeypatch.setattr(event_base, "elapsed_time", lambda e, end: fake._elapsed(e, end), raising=False)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: fake._record_stream(t, s))

        for name in ("to", "cuda"):  # an index-less "cuda" means the current device, which a CPU build cannot ask
            monkeypatch.setattr(torch.Tensor, name, _current_device_for(getattr(torch.Tensor, name), self))
        for name in ("tensor", "as_tensor"):  # their bindings copy up with the Python dispatch key masked
            monkeypatch.setattr(torch, name, _made_on_host(getattr(torch, name)))

        lib = torch.library.Library("aten", "IMPL")  # CUDA allocations, and pinned host memory, made here
        lib.impl("empty.memory_format", self._empty, "CUDA")
        lib.impl("empty_strided", self._empty_strided, "CUDA")
        lib.impl("_pin_memory", self._pin, "CPU")
        lib.impl("is_pinned", self._is_pinned, "CPU")
        monkeypatch.setattr(FakeCuda, "active", self)
        self._library = lib
        return self

    def uninstall(self) -> None:
        """Take the dispatcher registrations back (the test's monkeypatch undoes the rest)."""
        self._library._destroy()

    def uploads_by(self, thread_prefix: str) -> list[Copy]:
        """The host→device copies made by threads whose name starts with ``thread_prefix``."""
        return [c for c in self.seen.uploads if c.thread.startswith(thread_prefix)]


def _current_device_for(method, fake: FakeCuda):
    """``Tensor.to``/``.cuda`` with an index-less CUDA device (or none, for ``.cuda()``) given the thread's current
    device, as torch's device guard does on a CUDA build."""
    def resolve(arg):
        if isinstance(arg, (str, torch.device)) and not isinstance(arg, torch.dtype):
            try:
                device = torch.device(arg)
            except (RuntimeError, TypeError):
                return arg
            if device.type == "cuda" and device.index is None:
                return torch.device("cuda", fake._device())
        return arg

    def wrapped(self, *args, **kwargs):
        if method.__name__ == "cuda":  # .cuda(device) is .to(cuda:device); a CPU build answers it without a GPU
            device = args[0] if args else kwargs.pop("device", None)
            index = fake._device() if device is None else torch.cuda._utils._get_device_index(device, True)
            return torch.Tensor.to(self, torch.device("cuda", index), **kwargs)
        return method(self, *[resolve(a) for a in args], **{k: resolve(v) for k, v in kwargs.items()})

    return wrapped


def _made_on_host(make):
    """``torch.tensor``-like ``make`` that builds on the CPU and copies up when given a CUDA device."""
    def wrapped(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            return make(data, *args, **kwargs).to(device)
        return make(data, *args, device=device, **kwargs)

    return wrapped


def _host_indices(index):
    """Python lists among the indices as the CPU index tensors torch makes of them: torch then copies them up to
    the device, blocking, which the stand-in records (a CPU build cannot make them on the device itself)."""
    if isinstance(index, tuple):
        return tuple(_host_indices(i) for i in index)
    if isinstance(index, list) or type(index).__module__ == "numpy":
        return torch.as_tensor(index)
    return index


def _wrap(x, device: torch.device, wrappers: dict[int, FakeCudaTensor]):
    """A result on the device: an in-place call's own wrapper, or the CPU result behind a new one."""
    if not isinstance(x, torch.Tensor) or isinstance(x, FakeCudaTensor):
        return x
    own = wrappers.get(id(x))
    return own if own is not None else FakeCudaTensor(x, device)


def _unwrap(x):
    return x.inner if isinstance(x, FakeCudaTensor) else x
