"""A CPU emulator for the CUDA kernels in csrc/: build it, load it, call the kernels on CPU tensors.

The unmodified ``csrc/*.cu`` files are compiled as C++20 by g++ with ``cuda_shim.h`` force-included
(the CUDA execution model mapped to host fibers, see that file) and linked with ``emu_runtime.cpp``
into a shared library, cached under ``$FASTGPT_CACHE_DIR/cuda_emu/<hash of sources and flags>``.
:class:`Emulator` calls the kernels' own C entry points (``csrc/fastgpt_cuda.h``) through ctypes and
exposes the ops of the ``cuda`` backend (``fastgpt.cuda_ext.load()``) with the same signatures and
output conventions, on CPU tensors.

``build(mutations=...)`` compiles a variant with textual edits to the kernel sources (a planted bug),
so the tests can show that the emulator catches such bugs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from fastgpt.tools.cuda_emu.build import (  # noqa: F401  (the emulator's build interface, re-exported)
    CXXFLAGS,
    KERNEL_SOURCES,
    EmulatorError,
    Mutation,
    build,
    cache_dir,
    cuda_include_dir,
    unavailable_reason,
)

FG_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FG_APPROXIMATE = {"none": 0, "tanh": 1}
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}


# ---- the C structs of csrc/fastgpt_cuda.h ------------------------------------------------------------

_i64, _f64, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class _LayerNormFwdArgs(ctypes.Structure):
    _fields_ = [("rows", _i64), ("cols", _i64), ("dtype", _i64), ("param_dtype", _i64), ("eps", _f64),
                ("x", _ptr), ("residual", _ptr), ("weight", _ptr), ("bias", _ptr),
                ("y", _ptr), ("sum", _ptr), ("mean", _ptr), ("rstd", _ptr)]  # fmt: skip


class _LayerNormBwdArgs(ctypes.Structure):
    _fields_ = [("rows", _i64), ("cols", _i64), ("dtype", _i64), ("param_dtype", _i64), ("grad_dtype", _i64),
                ("dy", _ptr), ("x", _ptr), ("weight", _ptr), ("mean", _ptr), ("rstd", _ptr), ("dsum", _ptr),
                ("dx", _ptr), ("dweight", _ptr), ("dbias", _ptr), ("workspace", _ptr)]  # fmt: skip


class _GeluArgs(ctypes.Structure):
    _fields_ = [("rows", _i64), ("cols", _i64), ("dtype", _i64), ("bias_dtype", _i64), ("approximate", _i64),
                ("x", _ptr), ("bias", _ptr), ("dy", _ptr), ("out", _ptr), ("dbias", _ptr), ("workspace", _ptr)]  # fmt: skip


def _p(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _check_input(name: str, t: Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"cuda emulator: {name} must be a CPU tensor; got {t.device}")
    if t.dtype not in FG_DTYPES:
        raise TypeError(f"cuda emulator: {name} must be float32, float16 or bfloat16; got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"cuda emulator: {name} must be contiguous")


GUARD_BYTES = 256
POISON_IN = 0xFF  # around inputs: NaN in float32, float16 and bfloat16 (a read past the end poisons the result)
POISON_OUT = 0xFE  # outputs and their guards: -1.7e38 (bfloat16, float32) or NaN (float16), and never what
#                    a NaN computed from POISON_IN rounds to, so a stray write of one shows


class _Guarded:
    """The tensors of one call, each placed between poisoned guard bytes (a light memcheck).

    Inputs are copied into guarded buffers at the same offset modulo 16 bytes as the caller's (so
    a misaligned view stays misaligned and takes the same kernel path), and reading past their end
    reads NaN; outputs start poisoned, so an element the kernel never writes fails the parity
    check; :meth:`verify` raises if a guard byte or an input was overwritten.
    """

    def __init__(self):
        self.records: list[tuple[str, Tensor, int, int, Optional[Tensor], Optional[Tensor], int]] = []

    def _alloc(self, shape, dtype: torch.dtype, misalign: int, poison: int) -> Tuple[Tensor, Tensor, int, int]:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = int(torch.Size(shape).numel()) * itemsize
        buf = torch.full((2 * GUARD_BYTES + nbytes + 32,), poison, dtype=torch.uint8)
        start = GUARD_BYTES + (-(buf.data_ptr() + GUARD_BYTES)) % 16 + misalign
        view = buf[start : start + nbytes].view(dtype).view(shape)
        return view, buf, start, nbytes

    def input(self, name: str, t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        _check_input(name, t)
        view, buf, start, nbytes = self._alloc(t.shape, t.dtype, t.data_ptr() % 16, POISON_IN)
        view.copy_(t)
        self.records.append((name, buf, start, nbytes, view, t, POISON_IN))
        return view

    def output(self, name: str, shape, dtype: torch.dtype) -> Tensor:
        view, buf, start, nbytes = self._alloc(shape, dtype, 0, POISON_OUT)
        self.records.append((name, buf, start, nbytes, None, None, POISON_OUT))
        return view

    def verify(self, op: str) -> None:
        for name, buf, start, nbytes, view, original, poison in self.records:
            guards = torch.cat([buf[:start], buf[start + nbytes :]])
            if not bool((guards == poison).all()):
                raise EmulatorError(f"{op}: a kernel wrote outside {name} (guard bytes overwritten)")
            if original is not None and not torch.equal(view.view(torch.uint8), original.contiguous().view(torch.uint8)):
                raise EmulatorError(f"{op}: a kernel overwrote the input {name}")


def _dry_run_ops() -> Tuple[str, ...]:
    """The ops of the cuda backend (every op's ``cuda_ops`` in fastgpt.registry)."""
    from fastgpt import registry

    return registry.cuda_op_names()


class Emulator:
    """The kernels of csrc/ on CPU tensors, with the signatures of the ``cuda`` backend's ops.

    Every call runs on guarded copies of its tensors (see :class:`_Guarded`). Not thread-safe
    across calls of one op (launches are serialised inside the library).
    """

    def __init__(self, lib_path: Path):
        self.path = Path(lib_path)
        lib = ctypes.CDLL(str(self.path))  # RTLD_LOCAL: variants and the real extension never interpose
        for name, argtype in (
            ("fastgpt_layer_norm_fwd", _LayerNormFwdArgs),
            ("fastgpt_layer_norm_bwd", _LayerNormBwdArgs),
            ("fastgpt_gelu_fwd", _GeluArgs),
            ("fastgpt_gelu_bwd", _GeluArgs),
            ("fastgpt_bias_gelu_fwd", _GeluArgs),
            ("fastgpt_bias_gelu_bwd", _GeluArgs),
        ):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.POINTER(argtype), ctypes.c_void_p]
            fn.restype = ctypes.c_int
        for name, argtype in (
            ("fastgpt_layer_norm_bwd_workspace_size", _LayerNormBwdArgs),
            ("fastgpt_bias_gelu_bwd_workspace_size", _GeluArgs),
        ):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.POINTER(argtype)]
            fn.restype = ctypes.c_size_t
        lib.fastgpt_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64]
        lib.fastgpt_emu_plant_bug.argtypes = [ctypes.c_int]
        lib.fastgpt_emu_take_error.restype = ctypes.c_char_p
        lib.fastgpt_emu_take_launch_log.restype = ctypes.c_char_p
        lib.fastgpt_emu_begin_dry_run.argtypes = [ctypes.c_int, ctypes.c_int]
        self.lib = lib
        self.configure()

    # ---- emulated device -------------------------------------------------------------------------

    def configure(
        self, sms: int = 1, threads_per_sm: int = 1024, order: str = "forward", greedy: bool = False, seed: int = 0
    ) -> None:
        """The emulated device and schedule.

        ``sms`` and ``threads_per_sm`` size the grids of the grid-stride kernels (small values make
        every kernel loop). ``order`` ranks the threads of a block (and the blocks): "forward",
        "reverse" or "shuffle" (with ``seed``). Round robin (default) advances every runnable thread
        one step (to its next barrier or shuffle) per pass; ``greedy`` always resumes the first
        runnable thread by rank, so warps run as far ahead of each other as the barriers allow.
        """
        self.lib.fastgpt_emu_configure(sms, threads_per_sm, ORDERS[order], int(greedy), seed)

    def plant_bug(self, k: int) -> None:
        """Switch on planted bug k (0: none) of a build with mutated sources (see build(mutations=...))."""
        self.lib.fastgpt_emu_plant_bug(k)

    def take_launches(self) -> list[str]:
        """Kernel launches since the last call: 'kernel<...> grid=(...) block=(...)' each."""
        text = self.lib.fastgpt_emu_take_launch_log().decode()
        return [line for line in text.splitlines() if line]

    def dry_run_launches(
        self,
        op: str,
        rows: int,
        cols: int,
        dtype: torch.dtype,
        *,
        param_dtype: Optional[torch.dtype] = None,
        approximate: str = "none",
        misalign: bool = False,
        sms: int = 132,
        threads_per_sm: int = 2048,
    ) -> Tuple[list[str], int]:
        """The launches the kernels' C++ launchers make for one call, without running them.

        ``op`` names an op of the ``cuda`` backend (``layer_norm_fwd`` ... ``bias_gelu_bwd``) on x of
        (rows, cols) in ``dtype``, called as the torch bindings call it (layer norm with weight and
        bias, and both their gradients; bias + GELU with a (cols,) bias; ``param_dtype`` defaults to
        ``dtype``). The pointers are fake: 256-byte aligned like the CUDA caching allocator's, or,
        with ``misalign``, x and the gradient flowing in sit one element past that (a view). The
        device has ``sms`` SMs of ``threads_per_sm`` threads (default: an H100). Returns the launch
        log (as :meth:`take_launches`) and the workspace bytes the op would allocate.
        """
        ops = _dry_run_ops()
        if op not in ops:
            raise ValueError(f"dry_run_launches: op must be one of {', '.join(ops)}; got {op!r}")
        e = torch.empty((), dtype=dtype).element_size()
        fake = iter(range(1 << 40, 1 << 41, 1 << 34))  # distinct, 256-byte aligned, never dereferenced

        def ptr(shifted: bool = False) -> int:
            return next(fake) + (e if shifted and misalign else 0)

        fg, pd = FG_DTYPES[dtype], FG_DTYPES[param_dtype or dtype]
        if op.startswith(("layer_norm", "add_layer_norm")):
            residual = op.startswith("add_")
            if op.endswith("_fwd"):
                args = _LayerNormFwdArgs(rows, cols, fg, pd, 1e-5, ptr(True), ptr(True) if residual else None, ptr(), ptr(),
                                         ptr(), ptr() if residual else None, ptr(), ptr())  # fmt: skip
                entry, size_fn = "fastgpt_layer_norm_fwd", None
            else:
                args = _LayerNormBwdArgs(rows, cols, fg, pd, pd, ptr(True), ptr(), ptr(), ptr(), ptr(),
                                         ptr(True) if residual else None, ptr(), ptr(), ptr(), None)  # fmt: skip
                entry, size_fn = "fastgpt_layer_norm_bwd", "fastgpt_layer_norm_bwd_workspace_size"
        else:
            bias = op.startswith("bias_")
            bwd = op.endswith("_bwd")
            shape = (rows, cols) if bias else (1, rows * cols)  # gelu sees one flat row (as bindings.cpp passes it)
            args = _GeluArgs(*shape, fg, pd, FG_APPROXIMATE[approximate], ptr(True), ptr() if bias else None,
                             ptr(True) if bwd else None, ptr(), ptr() if bias and bwd else None, None)  # fmt: skip
            entry = f"fastgpt_{op}"
            size_fn = "fastgpt_bias_gelu_bwd_workspace_size" if bias and bwd else None
        self.take_launches()
        self.lib.fastgpt_emu_begin_dry_run(sms, threads_per_sm)
        try:  # the workspace size depends on the device too (partial rows per SM)
            workspace = int(getattr(self.lib, size_fn)(ctypes.byref(args))) if size_fn else 0
            if workspace:
                args.workspace = ptr()
            rc = getattr(self.lib, entry)(ctypes.byref(args), None)
        finally:
            self.lib.fastgpt_emu_end_dry_run()
        message = self.lib.fastgpt_emu_take_error().decode()
        if rc != 0 or message:
            raise EmulatorError(f"{entry} (dry run) returned cudaError {rc}: {message or 'invalid argument'}")
        return self.take_launches(), workspace

    def _call(self, name: str, args, guarded: _Guarded) -> None:
        rc = getattr(self.lib, name)(ctypes.byref(args), None)
        message = self.lib.fastgpt_emu_take_error().decode()
        if rc != 0 or message:
            raise EmulatorError(f"{name} returned cudaError {rc}: {message or 'invalid argument'}")
        guarded.verify(name)

    # ---- layer norm ------------------------------------------------------------------------------

    def _ln_fwd(self, x, residual, weight, bias, eps):
        g = _Guarded()
        m, n = x.shape
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (n,):
                raise ValueError(f"cuda emulator: {name} must have shape ({n},); got {tuple(p.shape)}")
        if weight is not None and bias is not None and bias.dtype != weight.dtype:
            bias = bias.to(weight.dtype)  # the kernels take one parameter dtype (bindings.cpp does the same)
        p = weight if weight is not None else bias
        pd = FG_DTYPES[p.dtype if p is not None else x.dtype]
        x, residual, weight, bias = g.input("x", x), g.input("residual", residual), g.input("weight", weight), g.input("bias", bias)
        y = g.output("y", x.shape, x.dtype)
        s = g.output("sum", x.shape, x.dtype) if residual is not None else None
        mean = g.output("mean", (m,), torch.float32)
        rstd = g.output("rstd", (m,), torch.float32)
        args = _LayerNormFwdArgs(m, n, FG_DTYPES[x.dtype], pd, float(eps), _p(x), _p(residual), _p(weight), _p(bias),
                                 _p(y), _p(s), _p(mean), _p(rstd))  # fmt: skip
        if m:
            self._call("fastgpt_layer_norm_fwd", args, g)
        return y, s, mean, rstd

    def _ln_bwd(self, dy, dsum, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
        g = _Guarded()
        # incoming gradients are made contiguous, as bindings.cpp does
        dy = g.input("dy", dy.contiguous())
        dsum = g.input("dsum", dsum.contiguous() if dsum is not None else None)
        x, weight = g.input("x", x), g.input("weight", weight)
        mean, rstd = g.input("mean", mean.float()), g.input("rstd", rstd.float())
        m, n = x.shape
        gdtype = weight.dtype if weight is not None else x.dtype
        dx = g.output("dx", x.shape, x.dtype)
        dw = g.output("dweight", (n,), gdtype) if need_weight_grad else x.new_empty((0,))
        db = g.output("dbias", (n,), gdtype) if need_bias_grad else x.new_empty((0,))
        args = _LayerNormBwdArgs(m, n, FG_DTYPES[x.dtype], FG_DTYPES[gdtype], FG_DTYPES[gdtype], _p(dy), _p(x), _p(weight),
                                 _p(mean), _p(rstd), _p(dsum), _p(dx), _p(dw), _p(db), None)  # fmt: skip
        if m == 0:
            dw.zero_()
            db.zero_()
            return dx, dw, db
        size = self.lib.fastgpt_layer_norm_bwd_workspace_size(ctypes.byref(args))
        workspace = g.output("workspace", (size,), torch.uint8)
        args.workspace = _p(workspace)
        self._call("fastgpt_layer_norm_bwd", args, g)
        return dx, dw, db

    def layer_norm_fwd(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        y, _, mean, rstd = self._ln_fwd(x, None, weight, bias, eps)
        return y, mean, rstd

    def layer_norm_bwd(self, dy, x, weight, mean, rstd, need_weight_grad: bool, need_bias_grad: bool):
        return self._ln_bwd(dy, None, x, weight, mean, rstd, need_weight_grad, need_bias_grad)

    def add_layer_norm_fwd(self, x, residual, weight, bias, eps: float):
        return self._ln_fwd(x, residual, weight, bias, eps)

    def add_layer_norm_bwd(self, dy, dsum, s, weight, mean, rstd, need_weight_grad: bool, need_bias_grad: bool):
        return self._ln_bwd(dy, dsum, s, weight, mean, rstd, need_weight_grad, need_bias_grad)

    # ---- GELU --------------------------------------------------------------------------------------

    @staticmethod
    def _gelu_args(x: Tensor, approximate: str, bias: Optional[Tensor] = None) -> _GeluArgs:
        cols = x.shape[-1] if bias is not None else max(x.numel(), 1)
        rows = x.numel() // cols if x.numel() else 0
        bd = FG_DTYPES[bias.dtype] if bias is not None else FG_DTYPES[x.dtype]
        return _GeluArgs(rows, cols, FG_DTYPES[x.dtype], bd, FG_APPROXIMATE[approximate], _p(x), _p(bias), None, None, None, None)

    def gelu_fwd(self, x: Tensor, approximate: str) -> Tensor:
        g = _Guarded()
        x = g.input("x", x)
        y = g.output("y", x.shape, x.dtype)
        args = self._gelu_args(x, approximate)
        args.out = _p(y)
        if x.numel():
            self._call("fastgpt_gelu_fwd", args, g)
        return y

    def gelu_bwd(self, dy: Tensor, x: Tensor, approximate: str) -> Tensor:
        g = _Guarded()
        dy, x = g.input("dy", dy.contiguous()), g.input("x", x)
        dx = g.output("dx", x.shape, x.dtype)
        args = self._gelu_args(x, approximate)
        args.dy, args.out = _p(dy), _p(dx)
        if x.numel():
            self._call("fastgpt_gelu_bwd", args, g)
        return dx

    def bias_gelu_fwd(self, x: Tensor, bias: Tensor, approximate: str) -> Tensor:
        g = _Guarded()
        x, bias = g.input("x", x), g.input("bias", bias)
        y = g.output("y", x.shape, x.dtype)
        args = self._gelu_args(x, approximate, bias)
        args.out = _p(y)
        if x.numel():
            self._call("fastgpt_bias_gelu_fwd", args, g)
        return y

    def bias_gelu_bwd(self, dy: Tensor, x: Tensor, bias: Tensor, approximate: str) -> Tuple[Tensor, Tensor]:
        g = _Guarded()
        dy, x, bias = g.input("dy", dy.contiguous()), g.input("x", x), g.input("bias", bias)
        dx = g.output("dx", x.shape, x.dtype)
        dbias = g.output("dbias", bias.shape, bias.dtype)
        args = self._gelu_args(x, approximate, bias)
        args.dy, args.out, args.dbias = _p(dy), _p(dx), _p(dbias)
        if x.numel() == 0:
            return dx, dbias.zero_()
        size = self.lib.fastgpt_bias_gelu_bwd_workspace_size(ctypes.byref(args))
        workspace = g.output("workspace", (size,), torch.uint8)
        args.workspace = _p(workspace)
        self._call("fastgpt_bias_gelu_bwd", args, g)
        return dx, dbias


def load(mutations: Iterable[Mutation] = ()) -> Emulator:
    """Build (cached) and load the emulator, optionally with mutated kernel sources."""
    return Emulator(build(tuple(mutations)))
