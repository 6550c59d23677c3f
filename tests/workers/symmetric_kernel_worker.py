"""Run under TRITON_INTERPRET=1 (Triton's CPU interpreter): the symmetric-product kernel
against the torch expressions on tiny matrices; prints one JSON line of max errors, each
relative to the largest entry of the torch result.

    TRITON_INTERPRET=1 python tests/workers/symmetric_kernel_worker.py
"""

from __future__ import annotations

import json

import torch

from normopt.optim.symmetric_kernel import symmetric_product


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.double() - reference.double()).abs().max() / reference.double().abs().max())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    errors = {}
    for dtype in (torch.float32, torch.float16):  # the interpreter has no bfloat16 (numpy lacks it)
        # batched, sizes that are not multiples of the tile, several K steps, one tile
        for name, shape in (("batched_40x72", (2, 40, 72)), ("odd_33x50", (33, 50)), ("one_tile_9x20", (9, 20))):
            X = torch.randn(*shape, generator=g).to(dtype)
            exact = X.double() @ X.double().mT
            errors[f"{name}/{dtype}/xxt"] = relative_error(symmetric_product(X, tile=(16, 16)), exact)
            A = (exact / shape[-1]).to(dtype)  # symmetric, entries O(1)
            b, c = -4.775, 2.0315
            result = symmetric_product(A, alpha=c, add=A, beta=b, tile=(16, 16))
            errors[f"{name}/{dtype}/poly"] = relative_error(result, b * A.double() + c * (A.double() @ A.double()))
            errors[f"{name}/{dtype}/asymmetry"] = relative_error(result, result.mT)
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
