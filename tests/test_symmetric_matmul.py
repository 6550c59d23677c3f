"""The symmetric products of Newton-Schulz: the torch path everywhere, the Triton kernel
through Triton's CPU interpreter (skipped where Triton is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normopt.optim import symmetric_matmul
from normopt.optim.symmetric_matmul import gram_matrix, gram_poly
from tests.processes import child_env

WORKER = Path(__file__).parent / "workers" / "symmetric_kernel_worker.py"
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_off_cuda_the_torch_expressions_run_bit_for_bit():
    """CPU (and CUDA without Triton): the products are the plain torch expressions, so NS
    computes what it always computed."""
    X = torch.randn(3, 20, 45, generator=torch.Generator().manual_seed(0))
    A = X @ X.mT
    assert not symmetric_matmul.use_triton(X)
    assert torch.equal(gram_matrix(X), A)
    assert torch.equal(gram_poly(A, -4.775, 2.0315), -4.775 * A + 2.0315 * (A @ A))


def test_kernel_matches_torch_in_the_triton_interpreter():
    """The kernel (lower-triangle tiles, mirrored) against float64 torch, relative to the
    largest entry: float32 within 1e-5 (float32 accumulation over K <= 72 terms, summed in
    another order: K x 6e-8 ~ 4e-6), float16 within 2e-3 (the float16 output rounds to
    2^-11 = 4.9e-4 relative, and the polynomial's float16 operand A rounds too); the
    result is symmetric to the same bounds. Tiny shapes: the interpreter runs tiles in
    numpy, ~1 s for all of them."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, str(WORKER)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env({"TRITON_INTERPRET": "1"}),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 18
    for key, error in errors.items():
        assert error <= (1e-5 if "float32" in key else 2e-3), (key, error)
