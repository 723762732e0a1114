"""diffrt.rng against the installed torch: same seed, same numbers, same generator state.

Tolerances: the torch-CPU generator must be bit-identical (its float32/float16 kernels are emulated
operation by operation); torch-CUDA is checked here through Philox known-answer vectors, a literal
re-implementation of torch's grid-stride kernel, and (GPU machines only) against torch itself.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffrt.errors import InputError
from diffrt.rng import Generator, philox4x32_10, randn, randn_batch

SEEDS = [0, 1, 42, 2**32 - 1, 2**40 + 5, 2**64 - 1, -7]
SHAPES = [(), (1,), (2,), (15,), (16,), (17,), (31,), (3, 5, 7), (1, 4, 64, 64), (2, 4, 128, 128)]
DTYPES = [(np.float32, torch.float32), (np.float16, torch.float16), (np.float64, torch.float64)]


def same_bits(ours: np.ndarray, theirs: torch.Tensor) -> bool:
    """Bit-identical for float32/float16; float64 blocks go through NumPy's log/sin/cos, which
    are libm here (bit-identical too) but may be SIMD builds elsewhere, so allow 2 ulp there."""
    ref = theirs.numpy()
    if ours.shape != ref.shape or ours.dtype != ref.dtype:
        return False
    if ours.dtype == np.float64:
        return bool(np.all(np.abs(ours - ref) <= 2 * np.spacing(np.abs(ref))))
    return ours.reshape(-1).view(np.uint8).tobytes() == ref.reshape(-1).view(np.uint8).tobytes()


# ---- torch CPU generator -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_randn_is_bit_identical_to_torch_and_leaves_the_same_state(seed, shape):
    ours, theirs = Generator("cpu").manual_seed(seed), torch.Generator("cpu").manual_seed(seed)
    assert same_bits(randn(shape, generator=ours), torch.randn(shape, generator=theirs))
    assert ours.get_state().tobytes() == theirs.get_state().numpy().tobytes()


@pytest.mark.parametrize("seed", [3, 2**33 + 11])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d[0].__name__) if isinstance(d, tuple) else str(d))
def test_successive_draws_mixing_small_and_large_shapes_continue_the_torch_stream(seed, dtype):
    # odd small draws leave a cached Box-Muller value that the next small draw must consume
    shapes = [(3,), (1,), (17,), (5,), (1, 4, 8, 8), (15,), (), (16,), (2, 3), (33,), (1,), (700,)]
    ours, theirs = Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for shape in shapes:
        assert same_bits(randn(shape, ours, dtype[0]), torch.randn(shape, generator=theirs, dtype=dtype[1])), shape
    assert ours.get_state().tobytes() == theirs.get_state().numpy().tobytes()


@pytest.mark.parametrize("shape", [(5,), (16,), (17,), (100,), (1, 4, 32, 32), (3, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["float16", "float64"])
def test_float16_and_float64_requests_follow_torch_kernels_for_those_dtypes(shape, dtype):
    # float16 is drawn by torch in float32 (whole blocks only) and rounded; float64 uses 53-bit uniforms
    ours, theirs = Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    for _ in range(2):
        assert same_bits(randn(shape, ours, dtype[0]), torch.randn(shape, generator=theirs, dtype=dtype[1]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**63), 2**64 - 1),
       shape=st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
       dtype=st.sampled_from(DTYPES))
def test_any_seed_and_shape_matches_torch(seed, shape, dtype):
    ours, theirs = Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert same_bits(randn(shape, ours, dtype[0]), torch.randn(shape, generator=theirs, dtype=dtype[1]))
    assert ours.initial_seed() == theirs.initial_seed()


def test_seeds_are_truncated_to_32_bits_for_mt19937_but_reported_in_full_like_torch():
    low, high = Generator().manual_seed(5), Generator().manual_seed(2**32 + 5)
    assert np.array_equal(randn((20,), low), randn((20,), high))
    assert high.initial_seed() == torch.Generator().manual_seed(2**32 + 5).initial_seed() == 2**32 + 5
    assert Generator().manual_seed(-1).initial_seed() == 2**64 - 1


def test_fresh_generator_starts_from_torch_default_seed():
    assert Generator().initial_seed() == torch.Generator().initial_seed()
    assert same_bits(randn((4, 5), Generator()), torch.randn((4, 5), generator=torch.Generator()))


def test_state_round_trips_between_diffrt_and_torch():
    ours, theirs = Generator().manual_seed(9), torch.Generator().manual_seed(9)
    randn((3,), ours), torch.randn((3,), generator=theirs)  # leaves a cached normal in both
    snapshot = ours.get_state()
    first = randn((2, 9), ours)
    assert np.array_equal(randn((2, 9), ours.set_state(snapshot).clone()), first)
    theirs_copy = torch.Generator()
    theirs_copy.set_state(torch.from_numpy(snapshot.copy()))
    assert same_bits(first, torch.randn((2, 9), generator=theirs_copy))
    mirrored = Generator().set_state(theirs.get_state())  # a torch ByteTensor is accepted as is
    assert same_bits(randn((40,), mirrored), torch.randn((40,), generator=theirs))


def test_clone_is_independent_and_continues_identically():
    gen = Generator().manual_seed(77)
    randn((1,), gen)
    twin = gen.clone()
    a, b = randn((3, 7), gen), randn((3, 7), twin)
    assert np.array_equal(a, b) and twin is not gen
    assert not np.array_equal(randn((3, 7), gen), a)


def test_seed_picks_a_fresh_seed_and_reseeds():
    gen = Generator()
    s1, s2 = gen.seed(), gen.seed()
    assert s1 != s2 and gen.initial_seed() == s2 and 0 <= s2 < 2**64
    assert np.array_equal(randn((8,), gen), randn((8,), Generator().manual_seed(s2)))


# ---- other generator inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_empty_shapes_return_empty_arrays_without_advancing_the_generator(device):
    gen = Generator(device).manual_seed(4)
    before = gen.get_state().tobytes()
    assert randn((2, 0, 3), gen).shape == (2, 0, 3)
    assert gen.get_state().tobytes() == before


def test_dtype_accepts_numpy_names_torch_dtypes_and_none_as_float32():
    for dtype, expected in ((None, np.float32), ("float16", np.float16), (torch.float64, np.float64)):
        assert randn((2,), Generator(), dtype=dtype).dtype == expected


def test_numpy_generator_draws_float32_standard_normals():
    out = randn((2, 3, 4), np.random.default_rng(5))
    assert out.dtype == np.float32
    assert np.array_equal(out, np.random.default_rng(5).standard_normal((2, 3, 4), dtype=np.float32))
    half = randn((2, 3), np.random.default_rng(5), dtype=np.float16)
    assert half.dtype == np.float16
    assert np.array_equal(half, np.random.default_rng(5).standard_normal((2, 3), dtype=np.float32).astype(np.float16))


def test_none_draws_fresh_nondeterministic_noise():
    a, b = randn((64,)), randn((64,))
    assert a.shape == (64,) and a.dtype == np.float32 and not np.array_equal(a, b)


def test_generator_list_seeds_each_batch_row_like_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    seeds, shape = [3, 1, 4], (3, 4, 8, 8)
    ours = randn(shape, [Generator().manual_seed(s) for s in seeds])
    theirs = randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert same_bits(ours, theirs)
    assert np.array_equal(randn_batch(shape, [Generator().manual_seed(s) for s in seeds]), ours)
    # Diffusers treats a one-element list as that generator for the whole batch
    single = randn((2, 4, 8, 8), [Generator().manual_seed(8)])
    assert same_bits(single, randn_tensor((2, 4, 8, 8), generator=[torch.Generator().manual_seed(8)]))


def test_generator_list_may_mix_kinds():
    rows = randn((2, 5), [Generator().manual_seed(1), np.random.default_rng(1)])
    assert np.array_equal(rows[0], randn((5,), Generator().manual_seed(1)))
    assert np.array_equal(rows[1], np.random.default_rng(1).standard_normal((5,), dtype=np.float32))


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "rocm", 3, None])
def test_unknown_device_is_rejected_with_the_allowed_values(device):
    with pytest.raises(InputError, match=r"`device` must be 'cpu' or 'cuda'"):
        Generator(device)


@pytest.mark.parametrize("seed", [1.5, "3", True, None, 2**64, -(2**63) - 1])
def test_bad_seed_is_rejected_with_the_allowed_range(seed):
    with pytest.raises(InputError, match=r"`seed` must be an int in \[-2\*\*63, 2\*\*64 - 1\]"):
        Generator().manual_seed(seed)


def test_bad_dtype_shape_generator_and_list_length_are_rejected_before_drawing():
    gen = Generator().manual_seed(0)
    before = gen.get_state()
    for dtype in (np.int32, torch.bfloat16, "int8"):
        with pytest.raises(InputError, match="`dtype` must be one of float32, float16, float64"):
            randn((2,), gen, dtype=dtype)
    with pytest.raises(InputError, match="`shape` must be an int or a sequence of non-negative ints"):
        randn((2, -1), gen)
    with pytest.raises(InputError, match="`generator` must be a diffrt.rng.Generator"):
        randn((2,), torch.Generator())
    with pytest.raises(InputError, match=r"`generator` must be a list with one generator per batch row \(3\)"):
        randn((3, 2), [gen, gen])
    with pytest.raises(InputError, match="`generator` must be a diffrt.rng.Generator.*; got 'int'"):
        randn((2, 2), [gen, 7])
    assert gen.get_state().tobytes() == before.tobytes()


def test_bad_state_and_grid_parameters_are_rejected():
    with pytest.raises(InputError, match="`state` must be 5056 uint8 bytes for a cpu generator"):
        Generator().set_state(np.zeros(16, np.uint8))
    bad_offset = np.array([1, 6], dtype=np.int64).view(np.uint8)
    with pytest.raises(InputError, match="`state` must be a CUDA state whose philox offset"):
        Generator("cuda").set_state(bad_offset)
    with pytest.raises(InputError, match="`multiprocessor_count` must be a positive int"):
        Generator("cuda", multiprocessor_count=0)
    with pytest.raises(InputError, match="`max_threads_per_multiprocessor` must be an int >= 256"):
        Generator("cuda", max_threads_per_multiprocessor=128)


def test_importing_rng_does_not_import_torch():
    code = "import sys, diffrt.rng; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- torch CUDA generator (Philox), checkable without a GPU ------------------------------------------

_M = 0xFFFFFFFF
KAT = [  # Random123 kat_vectors: counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((_M,) * 4, (_M, _M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_reference(ctr: list[int], key: list[int]) -> list[int]:
    """Scalar Philox4x32-10 straight from the paper, independent of the vectorised version."""
    (c0, c1, c2, c3), (k0, k1) = ctr, key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & _M, (k1 + 0xBB67AE85) & _M
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _M, (p0 >> 32) ^ c3 ^ k1, p0 & _M
    return [c0, c1, c2, c3]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert [int(v) for v in out[:, 0]] == list(expected) == philox_reference(list(counter), list(key))


def test_cuda_randn_matches_published_torch_cuda_values():
    # torch.randn((3, 4), generator=torch.Generator("cuda").manual_seed(0), device="cuda"), as
    # published in AUTOMATIC1111's modules/rng_philox.py docstring; GPU sincos differs by ~1e-7
    expected = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
    np.testing.assert_allclose(randn((3, 4), Generator("cuda").manual_seed(0)), expected, atol=2e-6)


def kernel_reference(seed: int, offset: int, n: int, stride: int, double: bool) -> np.ndarray:
    """torch's distribution_elementwise_grid_stride_kernel run literally, thread by thread."""
    unroll, out = (2 if double else 4), np.zeros(n)
    rounded = ((n - 1) // (stride * unroll) + 1) * stride * unroll
    for thread in range(stride):
        ctr = offset // 4  # curand_init(seed, subsequence=thread, offset): STATE stays 0
        for linear in range(thread, rounded, stride * unroll):
            w = philox_reference([ctr & _M, ctr >> 32, thread, 0], [seed & _M, seed >> 32])
            ctr += 1
            vals = box_muller_double(w) if double else box_muller(w[0], w[1]) + box_muller(w[2], w[3])
            for ii, val in enumerate(vals):
                if linear + stride * ii < n:
                    out[linear + stride * ii] = val
    return out


def box_muller(x: int, y: int) -> list[float]:
    """curand's _curand_box_muller: float32 u in (0, 1], v in (0, 2*pi]; sin first, then cos."""
    f32, two_pi_inv32 = np.float32, float(np.float32(6.2831855)) * 2.0**-32
    u = float(f32(float(f32(x)) * 2.0**-32 + 2.0**-33))
    v = float(f32(float(f32(y)) * two_pi_inv32 + two_pi_inv32 / 2))
    s = math.sqrt(-2.0 * math.log(u))
    return [math.sin(v) * s, math.cos(v) * s]


def box_muller_double(w: list[int]) -> list[float]:
    u = (w[0] ^ (w[1] << 21)) * 2.0**-53 + 2.0**-54
    v = (w[2] ^ (w[3] << 21)) * 2.0**-52 + 2.0**-53
    s = math.sqrt(-2.0 * math.log(u))
    return [math.sin(math.pi * v) * s, math.cos(math.pi * v) * s]


@pytest.mark.parametrize("n,dtype", [(2500, np.float32), (700, np.float64), (200, np.float32)])
def test_cuda_grid_stride_mapping_and_offsets_follow_torch_kernel(n, dtype):
    # one 256-thread block: 2500 floats need 3 passes of the grid, so all four float4 lanes are used
    gen = Generator("cuda", multiprocessor_count=1, max_threads_per_multiprocessor=256).manual_seed(2**40 + 3)
    randn((5,), gen)  # advances the philox offset by 4, as torch's philox_cuda_state does
    assert gen.get_state().view(np.int64)[1] == 4
    ours = randn((n,), gen, dtype=dtype)
    ref = kernel_reference(2**40 + 3, 4, n, 256, dtype == np.float64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12 if dtype == np.float64 else 2e-6)
    rounds = (n - 1) // (256 * (2 if dtype == np.float64 else 4)) + 1
    assert gen.get_state().view(np.int64).tolist() == [2**40 + 3, 4 + 4 * rounds]


def test_cuda_mapping_depends_on_sm_count_only_beyond_one_grid_pass():
    def draw(n, sms):
        return randn((n,), Generator("cuda", multiprocessor_count=sms).manual_seed(1))

    assert np.array_equal(draw(65536, 132), draw(65536, 114))  # SDXL latent: one pass either way
    assert not np.array_equal(draw(300_000, 132), draw(300_000, 114))


def test_cuda_normals_have_standard_normal_statistics_and_consistent_dtypes():
    gen = Generator("cuda").manual_seed(123)
    x = randn((2, 4, 128, 128), gen).astype(np.float64).reshape(-1)  # > one H100 grid pass
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n) and abs(x.std() - 1) < 5 / math.sqrt(2 * n)
    cdf = np.array([0.5 * (1 + math.erf(t / math.sqrt(2))) for t in (-2, -1, 0, 1, 2)])
    observed = np.array([(x <= t).mean() for t in (-2, -1, 0, 1, 2)])
    np.testing.assert_allclose(observed, cdf, atol=4e-3)
    again = randn((2, 4, 128, 128), Generator("cuda").manual_seed(123))
    half = randn((2, 4, 128, 128), Generator("cuda").manual_seed(123), dtype=np.float16)
    assert np.array_equal(half, again.astype(np.float16))  # torch casts the float curand values
    wide = randn((100_000,), Generator("cuda").manual_seed(5), dtype=np.float64)
    assert wide.dtype == np.float64 and abs(wide.mean()) < 0.02 and abs(wide.std() - 1) < 0.02


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 128, 128), (2, 4, 192, 192)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "float64"])
def test_cuda_randn_matches_torch_on_the_gpu(shape, dtype):
    props = torch.cuda.get_device_properties(0)
    ours = Generator("cuda", multiprocessor_count=props.multi_processor_count,
                     max_threads_per_multiprocessor=props.max_threads_per_multi_processor).manual_seed(42)
    theirs = torch.Generator("cuda").manual_seed(42)
    for _ in range(2):  # the second draw checks the offset bookkeeping
        ref = torch.randn(shape, generator=theirs, device="cuda", dtype=dtype[1]).cpu().numpy()
        got = randn(shape, ours, dtype=dtype[0])
        # the GPU's __sincosf is an approximation (~1e-6 on |x| < 7); float64 uses exact sincospi
        atol = {np.float32: 2e-5, np.float16: 8e-3, np.float64: 1e-12}[dtype[0]]
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=0, atol=atol)
    assert ours.get_state().tobytes() == theirs.get_state().numpy().tobytes()
