"""bench/gpu_check.py's tiny mode on CPU: the GPU check script cannot rot unnoticed between the
occasions a GPU is lent (SDPA, and the Triton kernels through Triton's interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu_without_ray(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="the triton package is a test dependency")
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny mode is the CPU path even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ray_imported"] is False  # the engine runs without Ray
    assert set(report["backends"]) == {"sdpa", "triton"}
    for name, backend in report["backends"].items():
        assert backend["attention"] == name and backend["logits_ok"], backend["logits"]
        assert [r["kind"] for r in backend["logits"]] == \
            ["mixed prefill", "chunk + decodes", "decode", "decode"]
        assert all(r["max_rel_err"] < 1e-4 and r["top1_agree"] == 1.0 for r in backend["logits"])
        modes = {(r["mode"], r["batch"]) for r in backend["decode"] if r.get("tok_s", 0) > 0}
        assert modes == {("greedy", 1), ("greedy", 4), ("sampled", 1), ("sampled", 4)}
    assert "roofline" in proc.stdout and "max rel err" in proc.stdout
