"""Launch real torchrun jobs from tests.

Multi-rank behaviour is only trusted when it comes from separate processes talking over
gloo, exactly as a user's ``torchrun --nproc_per_node=N`` would run them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.processes import REPO_ROOT, child_env, free_port


def run_torchrun(
    script: str | Path,
    nproc: int,
    args: list[str] | tuple[str, ...] = (),
    timeout: float = 600,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=nproc script *args`` on CPU and return the result.

    Each rank gets one intra-op thread so that N ranks share the machine's cores fairly.
    With ``check`` a non-zero exit raises with the captured output attached.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed with exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
