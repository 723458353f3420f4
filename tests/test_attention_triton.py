"""The Triton flash-attention kernels (kernels/flash_attention.py), proven against the float64 oracle.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so every test here
that forces ``use_backend("triton", strict=True)`` executes the real kernel code (masks, tile loops,
strides) on CPU tensors; with a GPU the same tests run on CUDA. The parity rule is docs/design.md, "Parity rule"
(:func:`fastgpt.testing.check_against_torch`): the kernel, forward and all three gradients, may be no
further from the float64 result than 2x (3x for gradients) what plain torch gets wrong in the same dtype;
16-bit cases of the covering matrix also meet the tight rule (:func:`fastgpt.testing.check_attention_tight`).

The shape matrix is a pairwise covering set (every pair of values of any two factors appears in
some case) plus every (Sq, Sk) pair under the causal mask; ``test_matrix_covers_*`` checks that.
"""

import itertools
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch

import fastgpt
from fastgpt import backends
from fastgpt.testing import attention_oracle, check_against_torch, check_attention_tight

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from fastgpt.kernels import flash_attention as fa  # noqa: E402
from fastgpt.kernels import flash_attention_configs as fa_configs  # noqa: E402

ALL_KERNELS = {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    sq: int
    sk: int
    d: int
    heads: Tuple[int, int]  # (Hq, Hk)
    causal: bool
    dtype: torch.dtype
    batch: int = 2
    dv: Optional[int] = None

    def __str__(self) -> str:
        hq, hk = self.heads
        dv = f"/dv{self.dv}" if self.dv is not None else ""
        return (f"b{self.batch}-q{self.sq}-k{self.sk}-d{self.d}{dv}-h{hq}/{hk}-"
                f"{'causal' if self.causal else 'full'}-{str(self.dtype).replace('torch.', '')}")


def make_qkv(case: Case, device, seed: int = 0):
    """Float32 leaves (check_against_torch rounds them to the case's dtype) that need gradients."""
    g = torch.Generator().manual_seed(seed)
    hq, hk = case.heads
    dv = case.dv if case.dv is not None else case.d
    shapes = [(case.batch, hq, case.sq, case.d), (case.batch, hk, case.sk, case.d), (case.batch, hk, case.sk, dv)]
    return [torch.randn(*s, generator=g).to(device).requires_grad_() for s in shapes]


@pytest.fixture
def launches(monkeypatch):
    """Every LaunchPlan the flash-attention module runs, in order (the kernels still run)."""
    seen: List = []
    real = fa.launch

    def spy(plan):
        seen.append(plan)
        return real(plan)

    monkeypatch.setattr(fa, "launch", spy)
    return seen


@pytest.fixture(autouse=True)
def _default_config_on_gpu(monkeypatch):
    """On a GPU, run each kernel's first (default) config: tuning every case would cost minutes.
    (The interpreter always runs one fixed config; test_gpu_autotuned_call covers the tuner.)"""
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")


def check_case(case: Case, device, entry: str = "attention", scale: Optional[float] = None, tight: bool = False):
    """check_against_torch for one case through one public entry point, on the strict triton backend.

    ``flash_attn_func`` gets (B, S, H, D) tensors, as its callers store them. The whole check runs
    inside the use_backend block: autograd calls the backward after ``fn`` returns, and the
    backward must dispatch to the kernel too.
    """
    q, k, v = make_qkv(case, device)
    scale = scale if scale is not None else 1.0 / math.sqrt(case.d)
    gqa = case.heads[0] != case.heads[1]
    oracle = lambda q, k, v: attention_oracle(q, k, v, case.causal, scale)  # noqa: E731

    if entry == "attention":
        kernel_fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=case.causal, scale=scale)  # noqa: E731
        torch_fn = oracle
    elif entry == "sdpa":
        kernel_fn = lambda q, k, v: fastgpt.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=case.causal, scale=scale, enable_gqa=gqa)
        torch_fn = oracle
    elif entry == "flash_attn_func":
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        kernel_fn = lambda q, k, v: fastgpt.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal)  # noqa: E731
        torch_fn = lambda q, k, v: oracle(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)  # noqa: E731
    else:
        raise ValueError(entry)
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(str(case), kernel_fn, torch_fn, [q, k, v], case.dtype)
        if tight and entry == "attention" and case.dtype in (torch.float16, torch.bfloat16):
            # and the tight rule: no worse than float32 math rounded only where a kernel must (the
            # interpreter rounds to bfloat16 toward zero, a GPU to nearest)
            check_attention_tight(str(case), kernel_fn, q, k, v, case.causal, scale, case.dtype,
                                  bf16_toward_zero=fa.interpreter_active())


# --------------------------------------------------------------------------------------------
# the covering matrix
# --------------------------------------------------------------------------------------------

FACTORS: Dict[str, tuple] = {
    "sq": (1, 17, 64, 113),
    "sk": (1, 17, 64, 113),
    "d": (16, 40, 64, 80, 96, 128, 256),
    "heads": ((2, 2), (4, 2), (4, 1)),
    "causal": (True, False),
    "dtype": (torch.float16, torch.float32, torch.bfloat16),
}


def covering_cases(required: List[dict]) -> List[Case]:
    """Rows that together contain every pair of values of any two factors (greedy all-pairs).

    ``required`` partial rows come first (completed greedily); deterministic, so the ids are stable.
    """
    names = list(FACTORS)

    def pairs_of(row: dict) -> set:
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2) if a in row and b in row}

    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in FACTORS[a] for y in FACTORS[b]}
    rows: List[dict] = []

    def complete(partial: dict) -> None:
        row = dict(partial)
        for name in names:
            if name not in row:
                row[name] = max(FACTORS[name], key=lambda value: len(pairs_of({**row, name: value}) & uncovered))
        rows.append(row)
        uncovered.difference_update(pairs_of(row))

    for partial in required:
        complete(partial)
    order = {(n, v): (i, j) for i, n in enumerate(names) for j, v in enumerate(FACTORS[n])}
    while uncovered:
        (a, x), (b, y) = min(uncovered, key=lambda p: (order[p[0]], order[p[1]]))
        complete({a: x, b: y})
    return [Case(**row) for row in rows]


# causal x (Sq, Sk): every length pair under the causal mask, Sq > Sk (rows that see no key) included
REQUIRED = [{"sq": sq, "sk": sk, "causal": True} for sq in FACTORS["sq"] for sk in FACTORS["sk"]]
# GQA x backward x Sq != Sk, and large head dims x awkward lengths, beyond what pairs guarantee
REQUIRED += [
    {"sq": 113, "sk": 17, "heads": (4, 1), "causal": False},
    {"sq": 17, "sk": 113, "heads": (4, 2), "causal": False},
    {"sq": 113, "sk": 113, "d": 256, "causal": False},
    {"sq": 17, "sk": 113, "d": 128, "dtype": torch.bfloat16},
]
CASES = covering_cases(REQUIRED)


def test_matrix_covers_every_pair_and_the_causal_length_grid():
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    assert {(c.sq, c.sk) for c in CASES if c.causal} == set(itertools.product(FACTORS["sq"], FACTORS["sk"]))
    assert all(c.batch == 2 for c in CASES)
    assert len(CASES) <= 48  # keeps the CPU run within its time budget


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_float64_oracle_forward_and_gradients(case, device, launches):
    check_case(case, device, tight=True)
    assert {p.name for p in launches} == ALL_KERNELS


# --------------------------------------------------------------------------------------------
# beyond the matrix: head dims below 16 (padded to 16), Dv != D, length 256, other tile shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        Case(sq=17, sk=33, d=8, heads=(2, 1), causal=True, dtype=torch.float32),
        Case(sq=9, sk=9, d=3, heads=(2, 2), causal=False, dtype=torch.float16, batch=1),
        Case(sq=40, sk=23, d=40, dv=24, heads=(4, 2), causal=True, dtype=torch.float16),
        Case(sq=20, sk=50, d=16, dv=72, heads=(2, 2), causal=False, dtype=torch.float32, batch=1),
        Case(sq=256, sk=256, d=64, heads=(4, 2), causal=True, dtype=torch.bfloat16, batch=1),
        Case(sq=200, sk=256, d=32, heads=(2, 1), causal=True, dtype=torch.float16, batch=1),
    ],
    ids=str,
)
def test_shapes_beyond_the_matrix(case, device, launches):
    check_case(case, device)
    assert {p.name for p in launches} == ALL_KERNELS


@pytest.mark.parametrize(
    "tiles",
    [
        {"fwd": fa.Config(16, 64, 4, 1), "bwd_dkdv": fa.Config(64, 16, 4, 1), "bwd_dq": fa.Config(16, 64, 4, 1)},
        {"fwd": fa.Config(64, 32, 4, 1), "bwd_dkdv": fa.Config(32, 32, 4, 1), "bwd_dq": fa.Config(64, 32, 4, 1)},
    ],
    ids=["q-tile-16-k-tile-64", "q-tile-64-k-tile-32"],
)
def test_causal_tile_bounds_hold_for_other_tile_shapes(tiles, device, monkeypatch, launches):
    """The interpreter normally runs one tile shape; the causal tile bounds (which key tiles a query
    tile skips, masks or takes whole) must hold for any BLOCK_M / BLOCK_N ratio."""
    if device.type == "cuda":
        pytest.skip("the interpreter's tile shapes; on a GPU test_gpu_every_config runs the real configs")
    monkeypatch.setattr(fa_configs, "INTERPRETER_CONFIGS", tiles)
    for case in (Case(sq=70, sk=150, d=16, heads=(2, 1), causal=True, dtype=torch.float32, batch=1),
                 Case(sq=150, sk=70, d=16, heads=(2, 1), causal=True, dtype=torch.float16, batch=1)):
        check_case(case, device)
    assert {p.configs[0] for p in launches if p.name in tiles} == set(tiles.values())


# --------------------------------------------------------------------------------------------
# entry points, layouts and strides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["sdpa", "flash_attn_func"])
def test_both_public_entry_points_run_the_kernels(entry, device, launches):
    case = Case(sq=33, sk=47, d=40, heads=(4, 2), causal=True, dtype=torch.float16)
    check_case(case, device, entry=entry)
    assert {p.name for p in launches} == ALL_KERNELS
    if entry == "flash_attn_func":
        # (B, S, H, D) in and out: the kernel read and wrote sequence-major strides, no transposing copy
        fwd = next(p for p in launches if p.name == "fwd")
        hq, d = case.heads[0], case.d
        assert fwd.args["sqs"] == hq * d and fwd.args["sqh"] == d
        assert fwd.args["sos"] == hq * d and fwd.args["soh"] == d


def test_fused_qkv_views_reach_the_kernel_without_copies(device, launches):
    """q, k, v as nanoGPT makes them: views into one (B, S, 3*H*D) projection, heads transposed."""
    b, s, h, d = 2, 37, 3, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, s, 3 * h * d, generator=g).to(device).requires_grad_()

    def split(t):
        parts = t.view(b, s, 3, h, d)
        return [parts[:, :, i].transpose(1, 2) for i in range(3)]

    def kernel_fn(t):
        q, k, v = split(t)
        return fastgpt.scaled_dot_product_attention(q, k, v, is_causal=True)

    def torch_fn(t):
        q, k, v = split(t)
        return attention_oracle(q, k, v, True, d**-0.5)

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("fused qkv", kernel_fn, torch_fn, [qkv], torch.float16)

    fwd = [p for p in launches if p.name == "fwd"]
    assert fwd, "the forward kernel did not run"
    base = fwd[-1].args["Q"]._base if fwd[-1].args["Q"]._base is not None else fwd[-1].args["Q"]
    for name, offset in (("Q", 0), ("K", h * d), ("V", 2 * h * d)):
        t = fwd[-1].args[name]
        assert not t.is_contiguous()
        assert t.stride() == (s * 3 * h * d, d, 3 * h * d, 1)
        assert t.data_ptr() == base.data_ptr() + offset * t.element_size()
    dkdv = next(p for p in launches if p.name == "bwd_dkdv")
    assert dkdv.args["Q"].stride() == (s * 3 * h * d, d, 3 * h * d, 1)


# --------------------------------------------------------------------------------------------
# log-sum-exp, rows that see no key, determinism
# --------------------------------------------------------------------------------------------


def lse_oracle(q, k, v, causal, scale):
    """(out, lse) in plain torch: lse of the scaled scores in float32 (float64 for float64 inputs),
    -inf for rows that see no key, with a zero (not nan) gradient there."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(cd), k.repeat_interleave(g, dim=1).to(cd)) * scale
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        has_key = mask.any(-1)
        s = torch.where(mask, s, torch.tensor(float("-inf"), dtype=cd, device=s.device))
        s = torch.where(has_key[:, None], s, torch.zeros((), dtype=cd, device=s.device))
        lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key, float("-inf"))
    else:
        lse = torch.logsumexp(s, dim=-1)
    return attention_oracle(q, k, v, causal, scale), lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_lse_and_its_gradient_match(dtype, device, launches):
    """return_lse=True: lse parity, and the gradient flowing into lse (dlse) reaches q and k."""
    case = Case(sq=50, sk=19, d=40, heads=(4, 2), causal=True, dtype=dtype)
    q, k, v = make_qkv(case, device, seed=5)
    scale = 0.3
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(
            f"lse {case}",
            lambda q, k, v: fastgpt.attention(q, k, v, causal=True, scale=scale, return_lse=True),
            lambda q, k, v: lse_oracle(q, k, v, True, scale),
            [q, k, v],
            dtype,
        )
    pre = next(p for p in launches if p.name == "bwd_preprocess")
    assert pre.constexprs["HAS_DLSE"] is True


@pytest.mark.parametrize("sq,sk", [(64, 17), (17, 1)])
def test_rows_that_see_no_key_give_zeros_and_no_nan(sq, sk, device):
    case = Case(sq=sq, sk=sk, d=64, heads=(4, 1), causal=True, dtype=torch.float16)
    q, k, v = (t.detach().half().requires_grad_() for t in make_qkv(case, device, seed=7))
    with fastgpt.use_backend("triton", strict=True):
        out, lse = fastgpt.attention(q, k, v, causal=True, return_lse=True)
        (out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    empty = sq - sk
    assert torch.all(out[:, :, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all()
    assert torch.all(q.grad[:, :, :empty] == 0)
    for t in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


def test_zero_stride_upstream_gradients(device, launches):
    """out.sum() and lse.sum() hand the backward expanded (stride 0) dout and dlse; the kernels
    read them through their strides."""
    case = Case(sq=21, sk=30, d=16, heads=(2, 1), causal=True, dtype=torch.float32, batch=1)
    grads = {}
    for backend in ("triton", "reference"):
        q, k, v = make_qkv(case, device, seed=13)
        with fastgpt.use_backend(backend, strict=True):
            out, lse = fastgpt.attention(q, k, v, causal=True, return_lse=True)
            (out.sum() + lse.sum()).backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    pre = next(p for p in launches if p.name == "bwd_preprocess")
    assert pre.args["sdob"] == pre.args["sdos"] == 0 and pre.args["sdlb"] == pre.args["sdls"] == 0
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backward_is_bitwise_deterministic(device):
    case = Case(sq=33, sk=50, d=40, heads=(4, 1), causal=True, dtype=torch.float16, batch=1)

    def run():
        q, k, v = (t.detach().half().requires_grad_() for t in make_qkv(case, device, seed=11))
        with fastgpt.use_backend("triton", strict=True):
            out = fastgpt.attention(q, k, v, causal=True)
            out.backward(torch.ones_like(out))
        return out, q.grad, k.grad, v.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# declining a call
# --------------------------------------------------------------------------------------------


def test_unsupported_reason_names_what_is_declined():
    q = torch.zeros(1, 2, 4, 16, dtype=torch.float64)
    assert "float64" in fa.unsupported_reason(q, q, q)
    assert fa.unsupported_reason(q.float(), q.float(), q.float()) is None
    big = torch.zeros(1, 1, 4, 512)
    assert "head dim" in fa.unsupported_reason(big, big, big)


def test_declined_call_falls_back_with_a_warning_or_raises_when_strict(device, monkeypatch, launches):
    monkeypatch.setattr(fa, "unsupported_reason", lambda q, k, v: "planted reason")
    q, k, v = (t.detach() for t in make_qkv(Case(5, 7, 16, (2, 2), False, torch.float32), device))
    with fastgpt.use_backend("triton", strict=True):
        with pytest.raises(backends.BackendUnavailableError, match="planted reason"):
            fastgpt.attention(q, k, v)
    with fastgpt.use_backend("triton"):
        with pytest.warns(backends.FallbackWarning, match="planted reason"):
            out = fastgpt.attention(q, k, v)
    assert not launches
    torch.testing.assert_close(out, attention_oracle(q, k, v, False, 16**-0.5))


# --------------------------------------------------------------------------------------------
# the checker catches planted bugs (a test that cannot fail is a defect)
# --------------------------------------------------------------------------------------------


def _planted(monkeypatch, fwd_bug=None, bwd_bug=None):
    if fwd_bug:
        real_fwd = fa.forward
        monkeypatch.setattr(fa, "forward", lambda q, k, v, out, lse, c, s: real_fwd(*fwd_bug(q, k, v), out, lse, c, s))
    if bwd_bug:
        real_bwd = fa.backward
        monkeypatch.setattr(fa, "backward", lambda *a, **kw: (real_bwd(*a, **kw), bwd_bug(*a))[0])


@pytest.mark.parametrize("bug", ["last key ignored", "one dk row off by 1e-2"])
def test_parity_check_catches_planted_bugs(bug, device, monkeypatch):
    case = Case(sq=33, sk=40, d=16, heads=(2, 1), causal=False, dtype=torch.float16, batch=1)
    if bug == "last key ignored":
        # what a kernel that drops the ragged last key tile would compute (forward only)
        _planted(monkeypatch, fwd_bug=lambda q, k, v: (q, k[:, :, :-1], v[:, :, :-1]))
    else:
        # a GQA-summing slip in one key row of dK, as a kernel bug in the dK/dV pass would give
        def bug_dk(dout, q, k, v, out, lse, dlse, dq, dk, dv, c, s):
            dk[:, :, 5] += 1e-2

        _planted(monkeypatch, bwd_bug=bug_dk)
    with pytest.raises(AssertionError, match="FAILS"):
        check_case(case, device)


# (Every kernel and tuning candidate compiling for sm_80 and sm_90, without spills in the default
# configs, with tensor-core MMA: tests/test_kernel_report.py, which shares its compiles with
# `fastgpt inspect` and `fastgpt bench`'s static report.)


# --------------------------------------------------------------------------------------------
# GPU only: long sequences, bf16, every config, the tuner
# --------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(sq=s, sk=s, d=d, heads=heads, causal=causal, dtype=dtype, batch=b)
    for (s, b) in ((1024, 2), (4096, 1))
    for d in (64, 128, 256)
    for causal in (True, False)
    for (heads, dtype) in (((4, 1), torch.bfloat16), ((2, 2), torch.float16))
] + [
    Case(sq=16384, sk=16384, d=64, heads=(2, 1), causal=True, dtype=torch.bfloat16, batch=1),
    Case(sq=16384, sk=16384, d=128, heads=(2, 2), causal=False, dtype=torch.bfloat16, batch=1),
    Case(sq=1000, sk=3000, d=96, heads=(4, 2), causal=True, dtype=torch.bfloat16, batch=2),
    Case(sq=3000, sk=1000, d=80, heads=(4, 1), causal=True, dtype=torch.float16, batch=2),
    Case(sq=1, sk=8191, d=128, heads=(8, 1), causal=True, dtype=torch.bfloat16, batch=4),
    Case(sq=2048, sk=2048, d=64, heads=(2, 2), causal=True, dtype=torch.float32, batch=1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_long_sequences(case, device):
    check_case(case, device)


def test_short_queries_take_the_decode_tiles(device, launches):
    """Sq <= DECODE_MAX_SQ (a decoding step) runs the forward kernel with its 16-row query tiles."""
    check_case(Case(sq=3, sk=70, d=64, heads=(4, 2), causal=True, dtype=torch.float16), device)
    check_case(Case(sq=fa.DECODE_MAX_SQ + 1, sk=70, d=64, heads=(4, 2), causal=True, dtype=torch.float16), device)
    forwards = [plan for plan in launches if plan.name == "fwd"]
    bucket = fa.head_dim_bucket(64, 64)
    assert forwards[0].configs == fa.configs_for("fwd_decode", bucket, torch.float16)
    assert forwards[-1].configs == fa.configs_for("fwd", bucket, torch.float16)
    assert all(c.block_m == 16 for c in fa.DECODE_CONFIGS[bucket]), "decode tiles are 16 query rows"


@pytest.mark.gpu
@pytest.mark.parametrize("bucket", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("kernel", ["fwd", "fwd_decode", "bwd_dkdv", "bwd_dq"])
def test_gpu_every_config(kernel, bucket, device, monkeypatch):
    """Each tuning candidate is its own code path: run every one on an awkward shape."""
    from triton.runtime.errors import OutOfResources

    d = {16: 16, 32: 24, 64: 40, 128: 96, 256: 256}[bucket]
    sq = 7 if kernel == "fwd_decode" else 333
    real = fa.configs_for
    for dtype in (torch.bfloat16, torch.float32):
        ran, skipped = 0, []
        for config in real(kernel, bucket, dtype, interpreter=False):
            monkeypatch.setattr(fa, "configs_for", lambda name, *a, _c=config, **kw: (_c,) if name == kernel else real(name, *a, **kw))
            try:
                check_case(Case(sq=sq, sk=517, d=d, heads=(4, 2), causal=True, dtype=dtype), device)
                ran += 1
            except OutOfResources as exc:
                skipped.append(f"{config}: {exc}")  # larger than this GPU's shared memory: the tuner skips it too
            finally:
                monkeypatch.setattr(fa, "configs_for", real)
        # the first (default) config is what runs untuned: it must fit, and so at least one must run
        assert ran and not (skipped and skipped[0].startswith(str(real(kernel, bucket, dtype, interpreter=False)[0]))), (
            f"{kernel} bucket {bucket} {dtype}: {ran} configs ran; out of resources: {skipped}")


@pytest.mark.gpu
def test_gpu_autotuned_call(device, monkeypatch):
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "1")
    check_case(Case(sq=2048, sk=2048, d=64, heads=(4, 2), causal=True, dtype=torch.bfloat16), device)
