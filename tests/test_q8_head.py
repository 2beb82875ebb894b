"""The q8 LM head kernel (GGUF Q8_0 codes; gemm_avx512.cpp / gemm_avx2.cpp `q8_gemm`): both builds
quantize the head's input rows to int8 per group of 32 and take exact integer dot products, so they
share one numerics: a float64 reference of the int8-rounded rows times the exact weights, up to fp32
accumulation; a row's logits never depend on the rows beside it; EXITSPEC_Q8_HEAD=fp32 keeps the
former fp32 head on the AVX-512 build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import KERNEL_ISAS, exercise
from exitspec.kernels import build
from exitspec.models.int4 import GROUP, recover_q8
from test_kernels import int8_groups


@pytest.fixture(params=KERNEL_ISAS or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no exitspec kernels for this CPU: {build.chosen_isa()[1]}"))])
def ops(request):
    """The kernel module of each instruction set this CPU runs (best first)."""
    exercise(request.param)
    return build.load_isa(request.param)


def q8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 (n, k), fp16-exact scales (n, k / 32), the weights they make), GGUF Q8_0's rule."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n, k // GROUP, GROUP, generator=g)
    d = (blocks.abs().amax(-1) / 127).half().float()
    q = torch.round(blocks / d[..., None]).clamp(-127, 127)
    return q.to(torch.int8).view(n, k), d, (q * d[..., None]).view(n, k)


def head_inputs(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    """Rows shaped like a final norm's output: mostly small, a few outliers (Gemma's hidden states
    have some channels 10-100x the rest), one tiny group and one all-zero group."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 60.0
    x[1, k - 5] = -250.0
    x[2, :GROUP] = 0.0
    x[3, GROUP:2 * GROUP] *= 1e-30
    return x


@pytest.mark.parametrize("n,k", [(4096 + 16, 576), (1024, 640), (48, 64)])
def test_q8_head_is_its_int8_reference_and_row_invariant(ops, n, k):
    q, d, w = q8_weight(n, k)
    assert torch.equal(recover_q8(w)[0], q)
    weight = ops.Q8Weight(q, d)
    x = head_inputs(12, k)
    y = ops.q8_linear(x, weight)
    ref = int8_groups(x) @ w.double().T
    # per output: the exact products of the int8 rows with the exact weights, up to fp32 rounding of
    # the per-group scale products and of the accumulation over k / 32 groups
    bound = 4e-7 * (k // GROUP) * (int8_groups(x).abs() @ w.double().abs().T)
    assert ((y.double() - ref).abs() <= bound).all(), float(((y.double() - ref).abs() / bound).max())
    # the int8 rounding itself stays small against the product of the fp32 rows
    exact = x.double() @ w.double().T
    assert float((y.double() - exact).abs().max()) < 2e-2 * float(exact.abs().max())
    one = torch.cat([ops.q8_linear(x[i:i + 1].contiguous(), weight) for i in range(12)])
    for rows in range(1, 13):  # verification of k rows reproduces 1-row decoding bit for bit
        assert torch.equal(ops.q8_linear(x[:rows].contiguous(), weight), one[:rows]), rows
    assert torch.equal(ops.q8_linear(x[:8].contiguous(), weight)[5], one[5])


def test_q8_head_keeps_tiny_groups_finite_and_nan_in_its_row(ops):
    q, d, w = q8_weight(64, 128)
    weight = ops.Q8Weight(q, d)
    x = torch.randn(3, 128)
    x[0, :32] = 1e-38  # 127 / max|x| overflows: the group counts as zeros
    x[1, 40] = float("nan")
    y = ops.q8_linear(x, weight)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2]).all()
    exact = x[0].double() @ w.double().T
    assert float((y[0].double() - exact).abs().max()) < 2e-2 * float(exact.abs().max())
    assert torch.equal(y[2:], ops.q8_linear(x[2:].contiguous(), weight))


@pytest.mark.skipif(len(KERNEL_ISAS) < 2, reason=f"this CPU runs only {KERNEL_ISAS or 'no'} exitspec kernel build(s)")
def test_both_builds_give_the_head_the_same_logits():
    """The same int8 codes, exact integer group sums and fp32 scaling in the same order: the AVX-512
    and AVX2 heads agree bit for bit on finite inputs (a model's logits do not depend on the build)."""
    q, d, _ = q8_weight(1024, 640, seed=3)
    x = head_inputs(9, 640, seed=4)
    ys = []
    for isa in KERNEL_ISAS:
        exercise(isa)
        mod = build.load_isa(isa)
        ys.append(mod.q8_linear(x, mod.Q8Weight(q, d)))
    assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.skipif("avx512bf16" not in KERNEL_ISAS, reason="this CPU does not run the avx512bf16 kernel build")
def test_fp32_head_stays_selectable():
    """EXITSPEC_Q8_HEAD=fp32 (read when the kernels load): the former head, fp32 inputs times the exact
    weights, still row-invariant. A fresh process, since the choice is made once."""
    script = """
import torch
from exitspec.kernels import build
from test_q8_head import head_inputs, q8_weight
ops = build.load_isa("avx512bf16")
assert "q8 LM head in fp32" in ops.NUMERICS, ops.NUMERICS
q, d, w = q8_weight(1024 + 16, 576)
weight = ops.Q8Weight(q, d)
x = head_inputs(11, 576)
y = ops.q8_linear(x, weight)
ref = x.double() @ w.double().T
assert float((y.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
one = torch.cat([ops.q8_linear(x[i:i + 1].contiguous(), weight) for i in range(11)])
assert all(torch.equal(ops.q8_linear(x[:r].contiguous(), weight), one[:r]) for r in range(1, 12))
print("fp32 head ok")
"""
    env = {**os.environ, "EXITSPEC_Q8_HEAD": "fp32",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-3:] == ["fp32", "head", "ok"]
    exercise("avx512bf16")
    assert "int8 per group of 32" in build.load_isa("avx512bf16").NUMERICS  # this process: the default
