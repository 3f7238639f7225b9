"""Evaluation memory as a user feels it: peak RSS of a fresh process.

One identity with many gallery images (m = 2,000 of 20,000) used to build ``[chunk, m, m]``
temporaries in ``_market_chunk`` (+8.9 GB for 256 queries). The child process caps its address
space, so a regression fails fast with an allocation error instead of swapping the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    import torch
    from ev_reid.evaluation import evaluate_rank

    nq, ng, m = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    dist = torch.from_numpy(rng.random((nq, ng), dtype=np.float32))
    g_pids = np.arange(ng) + 10
    g_pids[:m] = 1                       # one identity owns m gallery images ...
    g_cams = rng.integers(0, 6, ng)
    q_pids = np.ones(nq, dtype=np.int64)  # ... and every query is that identity
    q_cams = rng.integers(0, 6, nq)
    evaluate_rank(dist[:8], q_pids[:8], g_pids, q_cams[:8], g_cams)  # warm up allocator/libs
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize"))
    cap = (vm + 1536 * 1024) * 1024       # 1.5 GiB of headroom over the current mapping
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t = time.perf_counter()
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (peak - base) / 1024, "seconds": time.perf_counter() - t,
                      "mAP": res.mAP, "valid": res.num_valid_queries}))
    """
)


def _run(nq: int, ng: int, m: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(nq), str(ng), str(m)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluation_memory_bounded_when_one_identity_has_many_images() -> None:
    # 256 queries x 20,000 gallery: the distance matrix itself is 20 MiB; the ordinary case
    # (m = 2) grows RSS by ~100 MiB here. One identity owning 2,000 gallery images must stay
    # within the same bound (before the fix: +8.9 GB, here stopped by the address-space cap).
    out = _run(256, 20_000, 2000)
    assert out["valid"] == 256
    assert out["growth_mib"] < 200, out
