"""Benchmark: harvest throughput vs a plain forward, peak RSS, and model load times.

Run: ``make bench`` (or ``.venv/bin/python bench/bench_harvest.py``). Prints a table
and writes ``runs/bench/harvest.json``. All numbers are measured in this run:

* plain forward: ``model(tokens)`` (full logits) on the same batches;
* harvest: ``replab.harvest`` of ``resid_post`` at all 30 layers and all positions,
  written to disk, on the same prompts and batch size;
* ratio = harvest tok/s / forward tok/s (target >= 0.85);
* peak RSS of a harvest in a fresh process, for N and 4N prompts (bounded memory
  means the two are close);
* cold load (empty cache: GGUF -> HF -> TransformerLens conversion) and warm load
  (cached) of the default model, each in a fresh process, imports timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "bench"


def make_prompts(tokenizer, n: int, n_tokens: int, path: Path) -> None:
    """``n`` prompts of about ``n_tokens`` tokens, cut from the builtin sets' text."""
    from replab.prompts import load_prompts

    text = " ".join(load_prompts("fact_recall", tokenizer=tokenizer).rows["prompt"]) + " "
    text += " ".join(load_prompts("superset", tokenizer=tokenizer).rows["prompt"])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rows = []
    for i in range(n):
        start = (i * 37) % (len(ids) - n_tokens)
        rows.append({"prompt": tokenizer.decode(ids[start:start + n_tokens]).strip(), "chunk": i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def time_forward(model, ps, batch_size: int) -> tuple[float, int]:
    import torch

    from replab.prompts import token_ids

    lists = [token_ids(model.tokenizer, p) for p in ps.rows["prompt"]]
    total, start = 0, time.perf_counter()
    for lo in range(0, len(lists), batch_size):
        batch = lists[lo:lo + batch_size]
        tokens = torch.full((len(batch), max(map(len, batch))), 0, dtype=torch.long)
        for i, ids in enumerate(batch):
            tokens[i, :len(ids)] = torch.tensor(ids)
        with torch.inference_mode():
            model(tokens)
        total += sum(map(len, batch))
    return time.perf_counter() - start, total


def time_harvest(model, ps, batch_size: int, out: Path) -> tuple[float, int]:
    from replab.harvesting import harvest

    start = time.perf_counter()
    store = harvest(model, ps, hooks="resid_post", layers="all", positions="all",
                    batch_size=batch_size, out=out, progress=False)
    return time.perf_counter() - start, len(store.index)


def child_rss(path: Path, out: Path, batch_size: int) -> dict:
    code = (
        "import resource, json, time; t=time.perf_counter(); import replab;"
        f"s=replab.harvest(None, {str(path)!r}, hooks='resid_post', layers='all', positions='all',"
        f" batch_size={batch_size}, out={str(out)!r}, progress=False);"
        "print(json.dumps({'rows': len(s.index), 'bytes': s.summary()['bytes'],"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024,"
        " 'seconds': time.perf_counter()-t}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_load(cache: str) -> dict:
    code = (
        "import time, json; t0=time.perf_counter(); import torch, transformer_lens, transformers;"
        "t1=time.perf_counter(); from replab.models import load_model; m=load_model(None, device='cpu');"
        "t2=time.perf_counter(); print(json.dumps({'import_s': t1-t0, 'load_s': t2-t1}))"
    )
    env = {**os.environ, "REPLAB_CACHE": cache}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=192, help="prompts for the ratio (N)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-load", action="store_true", help="skip the cold/warm load timing")
    args = parser.parse_args()

    import torch

    from replab.models import load_model
    from replab.prompts import load_prompts

    OUT.mkdir(parents=True, exist_ok=True)
    model = load_model(None, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="replab-bench-"))
    small, large = work / "n.jsonl", work / "4n.jsonl"
    make_prompts(model.tokenizer, args.prompts, args.tokens, small)
    make_prompts(model.tokenizer, 4 * args.prompts, args.tokens, large)
    ps = load_prompts(str(small), tokenizer=model.tokenizer)
    time_forward(model, ps.subset(list(range(args.batch_size))), args.batch_size)  # warm-up

    fwd, hv = [], []
    for r in range(args.repeats):  # interleaved, so drift hits both alike
        s, n = time_forward(model, ps, args.batch_size)
        fwd.append(n / s)
        s, n = time_harvest(model, ps, args.batch_size, work / f"store{r}")
        hv.append(n / s)
    forward_tps, harvest_tps = max(fwd), max(hv)
    rss_n = child_rss(small, work / "rss_n", args.batch_size)
    rss_4n = child_rss(large, work / "rss_4n", args.batch_size)
    result = {
        "torch_threads": torch.get_num_threads(),
        "prompts": args.prompts, "tokens_per_prompt": args.tokens, "batch_size": args.batch_size,
        "forward_tok_s": forward_tps, "harvest_tok_s": harvest_tps,
        "ratio": harvest_tps / forward_tps,
        "forward_runs_tok_s": fwd, "harvest_runs_tok_s": hv,
        "paired_ratios": [h / f for f, h in zip(fwd, hv, strict=True)],
        "peak_rss_mb_N": rss_n, "peak_rss_mb_4N": rss_4n,
    }
    if not args.skip_load:
        cache = str(work / "cache")
        result["cold_load"] = child_load(cache)
        result["warm_load"] = child_load(cache)
    (OUT / "harvest.json").write_text(json.dumps(result, indent=1))
    print(f"plain forward          {forward_tps:8.0f} tok/s   (runs: {', '.join(f'{x:.0f}' for x in fwd)})")
    print(f"replab harvest         {harvest_tps:8.0f} tok/s   (runs: {', '.join(f'{x:.0f}' for x in hv)})")
    print(f"ratio harvest/forward  {result['ratio']:8.2f}       (best of each; target >= 0.85)")
    print("paired ratios          " + ", ".join(f"{r:.2f}" for r in result["paired_ratios"])
          + "   (each forward run vs the harvest run right after it)")
    for key, r in (("N", rss_n), ("4N", rss_4n)):
        print(f"peak RSS, {key:>2} prompts   {r['peak_rss_mb']:8.0f} MB    "
              f"({r['rows']:,} rows, {r['bytes'] / 1e6:,.0f} MB on disk)")
    if not args.skip_load:
        for key in ("cold_load", "warm_load"):
            r = result[key]
            print(f"{key.replace('_', ' '):<22} {r['load_s']:8.2f} s     (+ {r['import_s']:.1f} s imports)")
    print(f"wrote {OUT / 'harvest.json'}")


if __name__ == "__main__":
    main()
