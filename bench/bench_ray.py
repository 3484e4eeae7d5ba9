"""Benchmark: a harvest on Ray (1 and 2 local workers) against the single-process harvest.

Run: ``.venv/bin/python bench/bench_ray.py`` (needs ``pip install 'replab[ray]'``). Prints a
table and writes ``runs/bench/ray.json``. Every number is measured in this run, on the same
inputs: ``--n`` prompts (default 2,000) of about ``--tokens`` tokens cut from the offline
corpus (``datasets/corpus/train.txt``), ``resid_post`` at ``--layers`` (default every layer),
last position (one row per prompt: a probing harvest), batch ``--batch-size``.

Runs (each into a fresh store; the Ray ones are checked byte for byte against the local one
with the same torch thread count, since that is what the workers use):

* ``local, T threads``: ``replab.harvest`` in this process (T = torch's default here);
* ``ray, 1 worker x T threads``;
* ``local, 1 thread``: the per-worker baseline of the next run;
* ``ray, 2 workers x 1 thread``: the driver's thread count set to 1, so that the two
  workers share the machine's cores instead of oversubscribing them.

Columns: wall seconds of the whole call (Ray: worker start and model load included), rows/s
over that wall time, the part spent starting workers (``start``), and rows/s once started
(``steady``: rows / (wall - start)). The Ray cluster itself is started once, before the
runs (``ray_init_seconds``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "runs" / "bench"


def make_prompts(tokenizer, n: int, n_tokens: int, path: Path) -> int:
    """``n`` distinct prompts of about ``n_tokens`` tokens: windows over the corpus's sentences."""
    text = (ROOT / "datasets" / "corpus" / "train.txt").read_text()
    words = re.sub(r"\s+", " ", text).split(" ")
    rows, i, step = [], 0, 5
    seen = set()
    while len(rows) < n:
        lo = (i * step) % max(1, len(words) - 4 * n_tokens)
        chunk = " ".join(words[lo:lo + n_tokens])
        ids = tokenizer(chunk, add_special_tokens=False).input_ids[:n_tokens]
        prompt = tokenizer.decode(ids).strip()
        if prompt and prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "chunk": len(rows)})
        i += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct ('tiny' for a smoke run)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", default="all", help="layers harvested (resid_post), e.g. all or 0-9")
    ap.add_argument("--json", default=str(OUT / "ray.json"))
    args = ap.parse_args()

    import ray
    import torch

    from replab.harvesting import harvest
    from replab.models import load_model

    threads = torch.get_num_threads()
    load_start = os.getloadavg()
    model = load_model(args.model, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    prompts = tmp / "prompts.jsonl"
    n = make_prompts(model.tokenizer, args.n, args.tokens, prompts)
    kw = dict(dataset=str(prompts), hooks="resid_post", layers=args.layers, positions="last",
              batch_size=args.batch_size, progress=False)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0

    runs = []

    def run(name, t, **extra):
        torch.set_num_threads(t)
        out = tmp / name.replace(" ", "_").replace(",", "")
        start = time.perf_counter()
        store = harvest(model, out=out, **kw, **extra)
        wall = time.perf_counter() - start
        info = store.harvest_run
        rows = int(info["rows"])
        started = float(info.get("start_seconds") or 0.0)
        row = {"run": name, "threads": t, "workers": info.get("workers"), "rows": rows, "wall_s": round(wall, 2),
               "rows_per_s": round(rows / wall, 1), "start_s": round(started, 2),
               "steady_rows_per_s": round(rows / max(1e-9, wall - started), 1), "digest": digest(out)}
        runs.append(row)
        print(f"{name:<28} {row['wall_s']:>8.1f} s {row['rows_per_s']:>9.1f} rows/s   start {row['start_s']:>6.1f} s"
              f"   steady {row['steady_rows_per_s']:>8.1f} rows/s", flush=True)
        return row

    local_t = run(f"local, {threads} threads", threads)
    ray_1 = run(f"ray, 1 worker x {threads} threads", threads, engine="ray", workers=1)
    local_1 = run("local, 1 thread", 1)
    ray_2 = run("ray, 2 workers x 1 thread", 1, engine="ray", workers=2, cpus_per_worker=1)
    torch.set_num_threads(threads)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    identical = {"ray_1_vs_local": ray_1["digest"] == local_t["digest"],
                 "ray_2_vs_local_1_thread": ray_2["digest"] == local_1["digest"],
                 "local_vs_local_1_thread": local_t["digest"] == local_1["digest"]}
    load = os.getloadavg()
    result = {"model": model.replab_identity.name, "prompts": n, "tokens_per_prompt": args.tokens,
              "layers": args.layers,
              "batch_size": args.batch_size, "rows": local_t["rows"], "cpu_count": os.cpu_count(),
              "torch_threads": threads, "ray_version": ray.__version__, "ray_init_seconds": round(ray_init, 2),
              "runs": runs, "byte_identical": identical,
              "ray_overhead_1_worker_s": round(ray_1["wall_s"] - local_t["wall_s"], 2),
              "speedup_2_workers_vs_local_1_thread": round(local_1["wall_s"] / ray_2["wall_s"], 3),
              "speedup_2_workers_vs_local": round(local_t["wall_s"] / ray_2["wall_s"], 3),
              "load_average_at_start": [round(x, 2) for x in load_start],
              "load_average_at_end": [round(x, 2) for x in load]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
