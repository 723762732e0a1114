"""Torch-compatible random normals in NumPy, without torch.

A seed must give the same latents here as in a Diffusers run, so :func:`randn` reproduces
``torch.randn(shape, generator=g, dtype=...)`` for two kinds of torch generator:

* ``Generator("cpu")`` — torch's mt19937 stream and its two CPU normal kernels (ATen
  ``native/cpu/DistributionTemplates.h``, x86-64 build with AVX2 as shipped on PyPI):
  fewer than 16 elements go through the scalar ``normal_distribution<double>`` (53-bit
  uniforms, Box-Muller with ``log1p``, the second value cached *in the generator*); 16 or more
  use ``normal_fill``: 24-bit float uniforms, Box-Muller in blocks of 16 (8 cos, 8 sin), with
  the last 16 values redrawn when ``numel % 16 != 0``. float32 and float16 blocks are
  evaluated with ``avx_mathfun.h``'s Cephes polynomials, emulated here operation by operation
  (including the FMAs the compiler fuses), so the results are bit-identical.
* ``Generator("cuda")`` — torch's Philox4x32-10 (curand) generator with its offset scheme and
  grid-stride kernel. Integer streams are exact; the GPU's ``__sincosf``/``logf`` differ from
  NumPy's by about 1e-6, so values agree to that tolerance.

A ``numpy.random.Generator`` or ``None`` (fresh OS entropy) is accepted too, and a list of
generators draws one batch row each, as Diffusers' ``randn_tensor`` does. A generator is not
thread-safe; give each concurrent run its own (``clone()``).
"""
from __future__ import annotations

import functools
import math
import operator
import os
import sys
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from diffrt.errors import invalid

__all__ = ["Generator", "GeneratorLike", "philox4x32_10", "randn", "randn_batch"]

DEFAULT_SEED = 67280421310721  # torch's default_rng_seed_val: a fresh torch.Generator starts here
_U32 = 0xFFFFFFFF
_F32, _F64 = np.float32, np.float64
_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))

# ---- torch CPU: mt19937 (via NumPy's bit generator) ------------------------------------------------


@functools.lru_cache(maxsize=16)
def _mt_key(seed: int) -> np.ndarray:
    """mt19937 init_genrand: torch seeds its engine with the low 32 bits of the 64-bit seed."""
    key = [seed & _U32]
    for j in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & _U32)
    out = np.array(key, dtype=np.uint32)
    out.flags.writeable = False  # cached and shared; NumPy copies it into the bit generator
    return out


# torch's CPUGeneratorImplState (legacy THGeneratorState + float cache), as get_state() returns it.
_CPU_STATE = np.dtype([
    ("seed", "<u8"), ("left", "<i4"), ("seeded", "<i4"), ("next", "<u8"), ("state", "<u8", (624,)),
    ("normal_x", "<f8"), ("normal_y", "<f8"), ("normal_rho", "<f8"), ("normal_is_valid", "<i4"),
    ("next_float", "<f4"), ("next_float_valid", "u1"), ("pad", "V7"),
])
_CUDA_STATE = np.dtype([("seed", "<u8"), ("offset", "<i8")])

# ---- torch CPU: avx_mathfun.h log256_ps / sincos256_ps in float32 ----------------------------------
_LOG_P = [_F32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                             1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                             3.3333331174e-1)]
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)
_SQRTHF, _FOPI = _F32(0.707106781186547524), _F32(1.27323954473516)
_DP = [_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8)]
_SIN_P = [_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1)]
_COS_P = [_F32(2.443315711809948e-005), _F32(-1.388731625493765e-003), _F32(4.166664568298827e-002)]
_TWO_PI_F32 = _F32(2.0 * math.pi)
_ONE, _HALF, _ZERO = _F32(1.0), _F32(0.5), _F32(0.0)


def _fma(a: np.ndarray, b: Any, c: Any) -> np.ndarray:
    """float32 a*b+c rounded once, like vfmadd: a float32 product is exact in float64.

    torch's AVX2 kernel is built with FP contraction on, so the compiler fuses mul+add pairs;
    plain float32 ops differ from torch in about 1 of 5000 values."""
    t = a.astype(_F64)
    t *= b
    t += c
    return t.astype(_F32)


def _horner(x: np.ndarray, coefs: list[np.float32]) -> np.ndarray:
    """Polynomial in x, highest power first, one fused multiply-add per coefficient."""
    x64, t = x.astype(_F64), np.empty(x.shape, dtype=_F64)
    y = np.full(x.shape, coefs[0], dtype=_F32)
    for c in coefs[1:]:
        np.multiply(y, x64, out=t)
        t += c
        y[...] = t
    return y


def _avx_log(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 127).astype(_F32) + _ONE
    m = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(_F32)  # mantissa in [0.5, 1)
    small = m < _SQRTHF
    m = (m - _ONE) + np.where(small, m, _ZERO)
    e -= small
    z = m * m
    y = _fma(_horner(m, _LOG_P) * m, z, e * _LOG_Q1)
    y -= z * _HALF
    return _fma(e, _LOG_Q2, m + y)


def _avx_sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for x >= 0 (Box-Muller angles are never negative)."""
    j = (x * _FOPI).astype(np.int32)
    j += 1
    j &= ~1
    y = j.astype(_F32)
    for dp in _DP:  # extended-precision range reduction x - j*pi/4
        x = _fma(y, dp, x)
    z = x * x
    c = _fma(_horner(z, _COS_P) * z, z, -(z * _HALF))
    c += _ONE
    s = _fma(_horner(z, _SIN_P) * z, x, x)
    second = (j & 2) != 0  # octants where sin and cos swap polynomials
    sin = np.where(second, c, s)
    np.copyto(c, s, where=second)
    sin.view(np.uint32)[...] ^= ((j & 4) << 29).view(np.uint32)  # sign flips, as in the AVX code
    c.view(np.uint32)[...] ^= ((~(j - 2) & 4) << 29).view(np.uint32)
    return sin, c


def _box_muller16(u: np.ndarray) -> np.ndarray:
    """normal_fill_16 over whole blocks: u[j] and u[j+8] give out[j] (cos) and out[j+8] (sin)."""
    blocks = u.reshape(-1, 2, 8)
    u1, u2 = 1 - blocks[:, 0], blocks[:, 1]
    if u.dtype == _F64:
        radius, theta = np.sqrt(-2.0 * np.log(u1)), 2.0 * math.pi * u2
        cos, sin = np.cos(theta), np.sin(theta)
    else:
        radius = np.sqrt(_F32(-2.0) * _avx_log(u1))
        sin, cos = _avx_sincos(_TWO_PI_F32 * u2)
    out = np.concatenate([radius * cos, radius * sin], axis=1).reshape(-1)
    return out + out.dtype.type(0)  # the kernel's fmadd(n, std, mean) turns -0.0 into +0.0


# ---- torch CUDA: Philox4x32-10 ----------------------------------------------------------------------
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_CURAND_2PI_INV32 = float(_F32(6.2831855)) * 2.0**-32  # CURAND_2POW32_INV_2PI, a float32 constant
_HI = 1 if sys.byteorder == "little" else 0  # which uint32 of a uint64 holds the high bits
H100_MULTIPROCESSORS = 132  # H100 SXM5 and H200; H100 PCIe has 114, A100 108, RTX 4090 128


def philox4x32_10(counter: np.ndarray | Sequence[np.ndarray], key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 (Salmon et al. 2011, as in curand) on a (4, N) uint32 counter array, or four rows that
    broadcast against each other."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in counter)  # broadcastable rows
    k0, k1 = int(key[0]) & _U32, int(key[1]) & _U32
    size = np.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    # two product buffers used in turn: the low halves of one round's products are read
    # (as uint32 views, no copies) while the next round writes the other buffer
    buffers = [(np.empty(size, np.uint64), np.empty(size, np.uint64)) for _ in range(2)]
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
        p0, p1 = buffers[rnd % 2]
        np.multiply(c0, np.uint64(_PHILOX_M[0]), out=p0, dtype=np.uint64)
        np.multiply(c2, np.uint64(_PHILOX_M[1]), out=p1, dtype=np.uint64)
        lohi0, lohi1 = p0.view(np.uint32).reshape(-1, 2), p1.view(np.uint32).reshape(-1, 2)
        new0 = lohi1[:, _HI] ^ c1
        new0 ^= np.uint32(k0)
        new2 = lohi0[:, _HI] ^ c3
        new2 ^= np.uint32(k1)
        c0, c1, c2, c3 = new0, lohi1[:, 1 - _HI], new2, lohi0[:, 1 - _HI]
    return np.stack([c0, c1, c2, c3])


def _cuda_launch(n: int, unroll: int, gen: Generator) -> tuple[int, int]:
    """(grid-stride, rounds) of torch's distribution_nullary_kernel: 256-thread blocks, the grid
    capped at what the GPU keeps resident, so the mapping depends on the SM count."""
    blocks = min(-(-n // 256), gen.multiprocessor_count * (gen.max_threads_per_multiprocessor // 256))
    stride = 256 * blocks
    return stride, (n - 1) // (stride * unroll) + 1


def _cuda_randn(gen: Generator, n: int, dtype: np.dtype) -> np.ndarray:
    unroll = 2 if dtype == _F64 else 4  # curand_normal2_double / curand_normal4 per thread and round
    stride, rounds = _cuda_launch(n, unroll, gen)
    offset = gen._take_offset(4 * rounds)
    thread = np.arange(n, dtype=np.int64)  # element li = (rnd * unroll + comp) * stride + thread
    rnd = comp = np.zeros(1, dtype=np.int64)
    if n > stride:  # beyond one pass of the grid, threads loop and use more of each float4
        rnd, thread = np.divmod(thread, stride * unroll)
        comp, thread = np.divmod(thread, stride)
    ctr = (rnd + offset // 4).astype(np.uint64)  # curand_init(seed, thread, offset): offset/4 counters
    counter = [ctr & np.uint64(_U32), ctr >> np.uint64(32), thread, np.zeros(1, np.uint32)]
    w = philox4x32_10(counter, (gen._seed & _U32, gen._seed >> 32))
    if dtype == _F64:  # _curand_box_muller_double: 53-bit u and v from word pairs, sincospi
        zx = w[0].astype(np.uint64) ^ (w[1].astype(np.uint64) << np.uint64(21))
        zy = w[2].astype(np.uint64) ^ (w[3].astype(np.uint64) << np.uint64(21))
        radius = np.sqrt(-2.0 * np.log(zx * 2.0**-53 + 2.0**-54))
        return _sin_or_cos(math.pi * (zy * 2.0**-52 + 2.0**-53), comp == 0) * radius
    # _curand_box_muller on words (0, 1) for components 0, 1 and (2, 3) for 2, 3: sin, then cos
    x, y = (w[0], w[1]) if n <= stride else (np.where(comp < 2, w[0], w[2]), np.where(comp < 2, w[1], w[3]))
    u = (x.astype(_F32).astype(_F64) * 2.0**-32 + 2.0**-33).astype(_F32)  # one fma on the GPU
    v = (y.astype(_F32).astype(_F64) * _CURAND_2PI_INV32 + _CURAND_2PI_INV32 / 2).astype(_F32)
    radius = np.sqrt(_F32(-2.0) * np.log(u.astype(_F64)).astype(_F32))
    trig = _sin_or_cos(v.astype(_F64), comp % 2 == 0).astype(_F32)
    return (trig * radius).astype(dtype, copy=False)


def _sin_or_cos(angle: np.ndarray, use_sin: np.ndarray) -> np.ndarray:
    if use_sin.size == 1:  # one pass of the grid: every element is its thread's first value
        return np.sin(angle) if use_sin[0] else np.cos(angle)
    out = np.cos(angle)
    out[use_sin] = np.sin(angle[use_sin])
    return out


# ---- torch CPU kernels --------------------------------------------------------------------------------


def _uniforms(gen: Generator, count: int, dtype: type[np.float32] | type[np.float64]) -> np.ndarray:
    """uniform_real_distribution: float keeps the low 24 bits of one draw, double the low 53 bits
    of random64() = (first draw << 32) | second draw."""
    if dtype == _F64:
        w = gen._words(2 * count).astype(np.uint64).reshape(-1, 2)
        bits = ((w[:, 0] << np.uint64(32)) | w[:, 1]) & np.uint64((1 << 53) - 1)
        return bits.astype(_F64) * 2.0**-53
    return (gen._words(count) & np.uint32(0xFFFFFF)).astype(_F32) * _F32(2.0**-24)


def _cpu_fill(gen: Generator, n: int, dtype: np.dtype) -> np.ndarray:
    """normal_fill for n >= 16. float16 is computed in float32 and rounded, and (torch 2.13)
    draws uniforms for whole blocks only; float32/float64 draw all n before redrawing the tail."""
    work = _F64 if dtype == _F64 else _F32
    whole = n - n % 16
    u = _uniforms(gen, whole if dtype == np.float16 else n, work)
    out = np.empty(n, dtype=work)
    out[:whole] = _box_muller16(u[:whole])
    if n % 16:
        out[n - 16:] = _box_muller16(_uniforms(gen, 16, work))
    return out.astype(dtype, copy=False)


def _cpu_scalar(gen: Generator, n: int) -> np.ndarray:
    """at::normal_distribution<double> per element, using and refilling the generator's cache."""
    out: list[float] = []
    if gen._next_double is not None and n:
        out.append(gen._next_double)
        gen._next_double = None
    pairs = (n - len(out) + 1) // 2
    w = [int(v) for v in gen._words(4 * pairs)]
    for i in range(pairs):
        hi1, lo1, hi2, lo2 = w[4 * i: 4 * i + 4]
        u1 = (((hi1 << 32) | lo1) & ((1 << 53) - 1)) * 2.0**-53
        u2 = (((hi2 << 32) | lo2) & ((1 << 53) - 1)) * 2.0**-53
        radius, theta = math.sqrt(-2.0 * math.log1p(-u2)), 2.0 * math.pi * u1
        out.append(radius * math.cos(theta))
        if len(out) < n:
            out.append(radius * math.sin(theta))
        else:
            gen._next_double = radius * math.sin(theta)
    return np.array(out, dtype=_F64)


def _cpu_randn(gen: Generator, n: int, dtype: np.dtype) -> np.ndarray:
    if n >= 16:  # torch's kernels also require a contiguous tensor, which randn always makes
        return _cpu_fill(gen, n, dtype)
    # static_cast<scalar_t>(double): c10::Half converts through float, so round twice
    return _cpu_scalar(gen, n).astype(_F64 if dtype == _F64 else _F32).astype(dtype)


# ---- public API ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_seed(seed: Any) -> int:
    if not _is_int(seed) or not -(2**63) <= int(seed) < 2**64:
        raise invalid("seed", "an int in [-2**63, 2**64 - 1]", seed)
    return int(seed) % 2**64  # torch reinterprets negative seeds as uint64


class Generator:
    """A torch-compatible generator: ``Generator("cpu").manual_seed(s)`` yields the numbers of
    ``torch.Generator("cpu").manual_seed(s)``; ``Generator("cuda")`` those of a CUDA generator.

    The CUDA kernel's element-to-thread mapping depends on the GPU once a draw has more than
    ``256 * multiprocessor_count * max_threads_per_multiprocessor / 256`` elements (270,336 on an
    H100): pass the target GPU's ``cudaDeviceProp`` values for parity on larger draws.
    """

    def __init__(self, device: str = "cpu", *, multiprocessor_count: int = H100_MULTIPROCESSORS,
                 max_threads_per_multiprocessor: int = 2048) -> None:
        name = getattr(device, "type", device)  # accept a torch.device without importing torch
        if not isinstance(name, str) or name.split(":")[0] not in ("cpu", "cuda"):
            raise invalid("device", "'cpu' or 'cuda'", device)
        if not _is_int(multiprocessor_count) or multiprocessor_count < 1:
            raise invalid("multiprocessor_count", "a positive int", multiprocessor_count)
        if not _is_int(max_threads_per_multiprocessor) or max_threads_per_multiprocessor < 256:
            raise invalid("max_threads_per_multiprocessor", "an int >= 256", max_threads_per_multiprocessor)
        self._device = name.split(":")[0]
        self.multiprocessor_count = multiprocessor_count
        self.max_threads_per_multiprocessor = max_threads_per_multiprocessor
        self._mt = np.random.MT19937(0)
        self.manual_seed(DEFAULT_SEED)

    @property
    def device(self) -> str:
        return self._device

    def manual_seed(self, seed: int) -> Generator:
        """Seed like torch (any int in [-2**63, 2**64 - 1]); returns self for chaining."""
        self._seed = _check_seed(seed)
        self._offset = 0  # CUDA: philox offset per thread
        self._next_double: float | None = None  # CPU: cached second Box-Muller value
        self._next_float: float | None = None  # CPU: kept only to round-trip torch states
        self._fresh = True  # CPU: torch reports next=0 until the first draw
        if self._device == "cpu":
            self._mt.state = {"bit_generator": "MT19937", "state": {"key": _mt_key(self._seed), "pos": 624}}
        return self

    def seed(self) -> int:
        """Reseed from OS entropy and return the new seed (like torch.Generator.seed)."""
        seed = int.from_bytes(os.urandom(8), "little")
        self.manual_seed(seed)
        return seed

    def initial_seed(self) -> int:
        return self._seed

    def clone(self) -> Generator:
        other = Generator(self._device, multiprocessor_count=self.multiprocessor_count,
                          max_threads_per_multiprocessor=self.max_threads_per_multiprocessor)
        other.set_state(self.get_state())
        return other

    def get_state(self) -> np.ndarray:
        """The state as uint8 bytes in torch's layout (CPU: 5056 bytes, CUDA: seed and offset)."""
        if self._device == "cuda":
            return np.array([(self._seed, self._offset)], dtype=_CUDA_STATE).view(np.uint8)
        st = np.zeros((), dtype=_CPU_STATE)
        mt = self._mt.state["state"]
        st["seed"], st["seeded"], st["state"] = self._seed, 1, mt["key"]
        st["left"], st["next"] = 625 - mt["pos"], 0 if self._fresh else mt["pos"]
        if self._next_double is not None:
            st["normal_is_valid"], st["normal_y"] = 1, self._next_double
        if self._next_float is not None:
            st["next_float_valid"], st["next_float"] = 1, self._next_float
        return st.reshape(1).view(np.uint8).copy()

    def set_state(self, state: Any) -> Generator:
        """Restore from get_state() of this class or of the same kind of torch generator."""
        raw = np.ascontiguousarray(np.asarray(state, dtype=np.uint8)).reshape(-1)
        layout = _CUDA_STATE if self._device == "cuda" else _CPU_STATE
        if raw.size != layout.itemsize:
            raise invalid("state", f"{layout.itemsize} uint8 bytes for a {self._device} generator",
                          f"{raw.size} bytes")
        st = raw.view(layout)[0]
        if self._device == "cuda":
            if int(st["offset"]) < 0 or int(st["offset"]) % 4:
                raise invalid("state", "a CUDA state whose philox offset is a non-negative multiple of 4",
                              int(st["offset"]))
            self._seed, self._offset = int(st["seed"]), int(st["offset"])
            return self
        if not 1 <= int(st["left"]) <= 624 or (st["state"] > _U32).any():
            raise invalid("state", "a torch CPU generator state (left in [1, 624], 32-bit words)",
                          f"left={int(st['left'])}")
        self._seed, self._fresh = int(st["seed"]), int(st["next"]) == 0
        pos = 625 - int(st["left"])
        self._mt.state = {"bit_generator": "MT19937",
                          "state": {"key": st["state"].astype(np.uint32), "pos": pos}}
        self._next_double = float(st["normal_y"]) if st["normal_is_valid"] else None
        self._next_float = float(st["next_float"]) if st["next_float_valid"] else None
        return self

    def _words(self, count: int) -> np.ndarray:
        """The next `count` tempered mt19937 outputs, exactly as torch's engine yields them."""
        if count:
            self._fresh = False
        return self._mt.random_raw(count).astype(np.uint32)

    def _take_offset(self, increment: int) -> int:
        offset, self._offset = self._offset, self._offset + -(-increment // 4) * 4
        return offset

    def __repr__(self) -> str:
        return f"Generator(device={self._device!r}, initial_seed={self._seed})"


GeneratorLike = Union[Generator, np.random.Generator, None]


def _check_shape(shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        dims = tuple(operator.index(d) for d in dims)
    except TypeError:
        raise invalid("shape", "an int or a sequence of non-negative ints", shape) from None
    if any(d < 0 for d in dims):
        raise invalid("shape", "an int or a sequence of non-negative ints", shape)
    return dims


def _check_dtype(dtype: Any) -> np.dtype:
    """float32 (also for None, torch's default), float16 or float64; torch dtypes by name."""
    if dtype is None:
        return np.dtype(_F32)
    try:
        name = dtype if isinstance(dtype, (type, np.dtype)) else str(dtype).removeprefix("torch.")
        dt = np.dtype(name)
    except TypeError:
        dt = None
    if dt is None or not any(dt == ok for ok in _DTYPES):  # `None == dtype` is True in NumPy
        raise invalid("dtype", "one of float32, float16, float64", dtype)
    return dt


def _check_generator(generator: object) -> GeneratorLike:
    """``generator`` itself if ``randn`` takes it (None included), else an error naming what it got."""
    if generator is None or isinstance(generator, (Generator, np.random.Generator)):
        return generator
    raise invalid("generator", "a diffrt.rng.Generator, a numpy.random.Generator, a list of them, or None",
                  type(generator).__name__)


def _draw(shape: tuple[int, ...], generator: GeneratorLike, dtype: np.dtype) -> np.ndarray:
    if generator is None:
        generator = np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        work = _F64 if dtype == _F64 else _F32
        return generator.standard_normal(shape, dtype=work).astype(dtype, copy=False)
    n = math.prod(shape)
    if n == 0:  # torch returns before touching the generator
        return np.empty(shape, dtype=dtype)
    flat = _cuda_randn(generator, n, dtype) if generator.device == "cuda" else _cpu_randn(generator, n, dtype)
    return flat.reshape(shape)


def randn_batch(shape: Sequence[int], generators: Sequence[GeneratorLike],
                dtype: Any = np.float32) -> np.ndarray:
    """One generator per batch row: row i is randn(shape[1:]) from generators[i], as Diffusers'
    ``randn_tensor`` does with a generator list."""
    dims, dt = _check_shape(shape), _check_dtype(dtype)
    if not dims or len(generators) != dims[0]:
        raise invalid("generator", f"a list with one generator per batch row ({dims[0] if dims else 'no batch axis'})",
                      f"{len(generators)} generators")
    for generator in generators:
        _check_generator(generator)
    rows = [_draw((1,) + dims[1:], g, dt) for g in generators]
    return np.concatenate(rows, axis=0) if rows else np.empty(dims, dtype=dt)


def randn(shape: int | Sequence[int], generator: GeneratorLike | Sequence[GeneratorLike] = None,
          dtype: Any = np.float32) -> np.ndarray:
    """Standard normal samples of `shape` and `dtype` (float32, float16 or float64).

    With a :class:`Generator` the values equal torch.randn's for the same seed and device; a list
    of generators draws one batch row each (a one-element list acts as its generator, as in
    Diffusers)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            return randn_batch(_check_shape(shape), generator, dtype)
        generator = generator[0]
    dims, dt = _check_shape(shape), _check_dtype(dtype)
    return _draw(dims, _check_generator(generator), dt)
