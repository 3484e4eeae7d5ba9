"""bench/gpu.sh: its CPU dry run runs every section with the tiny model and writes RESULTS.md;
without a GPU the real run refuses in one line (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)


def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    res = _run(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1"], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = out.read_text()
    assert "DRY RUN on CPU" in text and "failed" not in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["dry_run"] is True
    sections = data["results"]
    assert set(sections) == {f"{s}:{d}" for s in ("harvest", "patching", "sae") for d in ("float32", "bfloat16")} | {
        "probes"}
    for dt in ("float32", "bfloat16"):
        h = sections[f"harvest:{dt}"]
        assert h["forward_tok_s"] > 0 and h["harvest_tok_s"] > 0 and h["parity"] is None   # tiny: no HF twin
        p = sections[f"patching:{dt}"]["results"]
        assert len(p) == 2 and all(r["max_abs_diff"] < (1e-4 if dt == "float32" else 0.05) for r in p)
        assert sections[f"sae:{dt}"]["train_tok_s"] > 0
    assert sections["probes"]["core"]["seconds"] > 0
    assert not (ROOT / "bench" / "RESULTS.md").exists() or "DRY RUN" not in (ROOT / "bench" / "RESULTS.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_the_real_run_refuses(tmp_path):
    res = _run(["--out", str(tmp_path / "R.md")], tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("error:") == 1 and "dry-run" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "R.md").exists()
