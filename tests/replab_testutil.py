"""Test helpers shared by the store tests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def harvest_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "replab", "harvest", "--out", str(out), *args]


def kill_mid_run(cmd: list[str], out: Path, min_batches: int, delay: float,
                 timeout: float = 600) -> int:
    """Start ``cmd``, SIGKILL it once ``min_batches`` batches are journaled; return that count."""
    env = {**os.environ, "REPLAB_TEST_BATCH_DELAY": str(delay)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "_progress.json"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError("harvest finished before it could be killed")
            if progress.exists():
                try:
                    done = json.loads(progress.read_text())["batches_done"]
                except (ValueError, KeyError):
                    done = 0
                if done >= min_batches:
                    proc.kill()
                    proc.wait()
                    return done
            time.sleep(0.05)
        raise AssertionError("harvest did not reach the kill point in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_cli(args, capsys):
    """Run ``replab ARGS`` in-process; return ``(exit code, stdout, stderr)``."""
    import pytest

    from replab.cli import main

    old = sys.argv
    sys.argv = ["replab", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return (exc.value.code or 0), out.out, out.err
