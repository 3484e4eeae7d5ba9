"""The GPU benchmark (``bash bench/gpu.sh``): SmolLM2 at float32 and bfloat16 on one CUDA GPU.

Sections (each measured now, each failure recorded in the results instead of stopping the run):

* harvest: tokens/s of ``replab.harvest`` (``resid_post``, every layer and position, written to
  disk) against a plain forward on the same batches (CUDA synchronised), batch size from
  :func:`replab.models.auto_batch_size`;
* patching: ``bench/bench_patching.py`` (replab's engine against TransformerLens's ``patching``
  on the next_day task), run in this process with the model in the section's dtype on the GPU;
* probes: ``bench/bench_probes.py --skip-full`` (CPU-bound; once, not per dtype);
* SAE training: tokens/s of :func:`replab.features.sae.train_sae` (TopK, d_sae 4096, k 64) on
  a middle layer, harvest and training timed apart.

Writes ``bench/RESULTS.md`` (naming the GPU, driver, torch and CUDA versions) and a JSON copy.
``--dry-run`` runs every section on CPU with the tiny test model and small sizes (about a
minute), writing into ``--work``: that is what the test suite runs; its numbers are not GPU
numbers and the file says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    import torch

    import replab

    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "replab": replab.__version__, "cpus": os.cpu_count(), "python": sys.version.split()[0],
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            env["driver"] = None
    else:
        env["gpu"] = "none (CPU dry run)"
    return env


def section_harvest(model_name, dtype: str, device: str, n_prompts: int, n_tokens: int, repeats: int,
                    work: Path) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_harvest import make_prompts

    from replab.harvesting import harvest
    from replab.models import auto_batch_size, load_model
    from replab.prompts import load_prompts, token_ids

    t0 = time.perf_counter()
    model = load_model(model_name, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    path = work / "prompts.jsonl"
    if not path.exists():
        make_prompts(model.tokenizer, n_prompts, n_tokens, path)
    ps = load_prompts(str(path), tokenizer=model.tokenizer)
    lists = [token_ids(model.tokenizer, p) for p in ps.rows["prompt"]]
    batch = auto_batch_size(model, max(map(len, lists)))

    def forward() -> float:
        _sync(device)
        start, total = time.perf_counter(), 0
        for lo in range(0, len(lists), batch):
            part = lists[lo:lo + batch]
            tokens = torch.zeros((len(part), max(map(len, part))), dtype=torch.long)
            for i, ids in enumerate(part):
                tokens[i, :len(ids)] = torch.tensor(ids)
            with torch.inference_mode():
                model(tokens.to(device))
            total += sum(map(len, part))
        _sync(device)
        return total / (time.perf_counter() - start)

    def harvested(r: int) -> float:
        _sync(device)
        start = time.perf_counter()
        store = harvest(model, ps, hooks="resid_post", layers="all", positions="all", batch_size=batch,
                        out=work / f"store-{dtype}-{r}", progress=False)
        _sync(device)
        secs = time.perf_counter() - start
        rows = len(store.index)
        shutil.rmtree(work / f"store-{dtype}-{r}", ignore_errors=True)
        return rows / secs

    forward()                                          # warm-up (kernels, allocator)
    fwd, hv = [], []
    for r in range(repeats):
        fwd.append(forward())
        hv.append(harvested(r))
    return {"load_s": round(load_s, 1), "batch_size": batch, "prompts": len(lists),
            "tokens_per_prompt": n_tokens, "forward_tok_s": round(max(fwd)),
            "harvest_tok_s": round(max(hv)), "ratio": round(max(hv) / max(fwd), 2),
            "runs": {"forward": [round(x) for x in fwd], "harvest": [round(x) for x in hv]},
            "parity": model.replab_identity.parity}


def _bench_module(name: str):
    """Import ``bench/<name>.py`` as a module (the other benchmarks run in this process)."""
    import importlib

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(name)


def _main_with(module, argv: list[str]) -> None:
    old = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        module.main()
    finally:
        sys.argv = old


def section_patching(model_name, dtype: str, device: str, work: Path, dry: bool, threads: int) -> dict:
    """``bench/bench_patching.py`` in this process, its model loaded in ``dtype`` on ``device``."""
    from replab.models import model_options

    out = work / f"patching-{dtype}.json"
    argv = ["--threads", str(threads), "--repeats", "1", "--json", str(out)]
    if model_name:
        argv += ["--model", model_name]
    if dry:
        argv += ["--limit", "2"]
    with model_options(dtype=dtype, device=device):
        _main_with(_bench_module("bench_patching"), argv)
    return json.loads(out.read_text())


def section_probes(work: Path, dry: bool, threads: int) -> dict:
    """``bench/bench_probes.py --skip-full`` in this process (a dry run writes under ``work``)."""
    module = _bench_module("bench_probes")
    if dry:
        module.OUT = work / "runs" / "bench"
    argv = ["--skip-full", "--threads", str(threads)]
    if dry:
        argv += ["--rows", "300", "--dim", "16", "--layers", "2"]
    _main_with(module, argv)
    return json.loads((module.OUT / "probes.json").read_text())


def section_sae(model_name, dtype: str, device: str, work: Path, dry: bool) -> dict:
    from replab.features.sae import train_sae
    from replab.models import load_model, model_options

    model = load_model(model_name, device=device, dtype=dtype)
    layer = model.cfg.n_layers // 2
    size = (dict(d_sae=64, k=8, tokens=512 * 8, corpus_tokens=1024, batch_size=512, seq_len=64)
            if dry else dict(d_sae=4096, k=64, tokens=4096 * 500, corpus_tokens=131072,
                             batch_size=4096, seq_len=128))
    with model_options(device=device):
        _, stats = train_sae(model, out=work / f"sae-{dtype}", layer=layer, force=True,
                             progress=False, lr_warm_up_steps=10, harvest_batch=32, **size)
    return {"layer": layer, **{k: size[k] for k in ("d_sae", "k", "batch_size")},
            "tokens_trained": stats["tokens_trained"], "seconds_train": stats["seconds_train"],
            "train_tok_s": round(stats["tokens_trained"] / max(stats["seconds_train"], 1e-9)),
            "corpus_tokens": stats["corpus_tokens"], "seconds_harvest": stats["seconds_harvest"],
            "harvest_tok_s": round(stats["corpus_tokens"] / max(stats["seconds_harvest"], 1e-9)),
            "train_fvu_last": round(stats["train_fvu_last"], 4)}


def guarded(results: dict, key: str, fn, *args) -> None:
    t0 = time.perf_counter()
    print(f"[gpu bench] {key} ...", flush=True)
    try:
        results[key] = {**fn(*args), "wall_s": round(time.perf_counter() - t0, 1)}
    except Exception as exc:  # noqa: BLE001 - record it and go on with the other sections
        results[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                        "traceback": traceback.format_exc()[-2000:]}
    print(f"[gpu bench] {key}: {time.perf_counter() - t0:.1f} s"
          + (f"  FAILED {results[key]['error']}" if "error" in results[key] else ""), flush=True)


def _cell(d: dict, key: str, fmt: str = "{:,}") -> str:
    if "error" in d:
        return "failed"
    v = d.get(key)
    return "–" if v is None else fmt.format(v)


def write_markdown(path: Path, env: dict, results: dict, dry: bool, command: str) -> None:
    lines = ["# GPU benchmark results", ""]
    if dry:
        lines += ["**DRY RUN on CPU with the tiny random model and small sizes: these are not GPU",
                  "numbers.** It only shows that every section of `bench/gpu.sh` runs.", ""]
    lines += [f"- GPU: **{env.get('gpu')}**" + (f" ({env.get('gpu_memory_gb')} GiB, driver "
                                                  f"{env.get('driver')})" if not dry else ""),
              f"- torch {env['torch']}, CUDA {env['cuda']}, replab {env['replab']} "
              f"(commit {env['commit']}), {env['cpus']} CPUs, {env['date']}",
              f"- command: `{command}`", ""]
    dtypes = [k.split(":")[1] for k in results if k.startswith("harvest:")]
    lines += ["## Harvest against a plain forward (SmolLM2, resid_post at every layer and position, to disk)",
              "", "| dtype | batch | forward tok/s | harvest tok/s | harvest / forward | parity max abs logit diff |",
              "|---|---|---|---|---|---|"]
    for dt in dtypes:
        r = results[f"harvest:{dt}"]
        par = (r.get("parity") or {}).get("max_abs_logit_diff")
        lines.append(f"| {dt} | {_cell(r, 'batch_size')} | {_cell(r, 'forward_tok_s')} | "
                     f"{_cell(r, 'harvest_tok_s')} | {_cell(r, 'ratio', '{:.2f}')} | "
                     f"{'–' if par is None else f'{par:.2g}'} |")
    lines += ["", "## Patching engine against TransformerLens (next_day task; `bench/bench_patching.py`)", "",
              "| dtype | sweep | cells | TransformerLens (s) | replab (s) | speed-up | max abs diff |",
              "|---|---|---|---|---|---|---|"]
    for dt in dtypes:
        r = results.get(f"patching:{dt}", {})
        if "error" in r:
            lines.append(f"| {dt} | failed: {r['error']} | | | | | |")
            continue
        for s in r.get("results", []):
            lines.append(f"| {dt} | {s['sweep']} | {s['cells']} | {s['transformer_lens_s']} | {s['replab_s']} | "
                         f"{s['speedup']}× | {s['max_abs_diff']:.1e} |")
    lines += ["", "## SAE training (TopK; `replab.features.sae.train_sae`)", "",
              "| dtype | layer | d_sae | k | batch | train tok/s | tokens | harvest tok/s | FVU (last 10%) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for dt in dtypes:
        r = results.get(f"sae:{dt}", {})
        lines.append(f"| {dt} | {_cell(r, 'layer')} | {_cell(r, 'd_sae')} | {_cell(r, 'k')} | "
                     f"{_cell(r, 'batch_size')} | {_cell(r, 'train_tok_s')} | {_cell(r, 'tokens_trained')} | "
                     f"{_cell(r, 'harvest_tok_s')} | {_cell(r, 'train_fvu_last', '{:.3f}')} |")
    p = results.get("probes", {})
    lines += ["", "## Probe sweep (`bench/bench_probes.py --skip-full`; CPU-bound, dtype-independent)", ""]
    if "error" in p:
        lines.append(f"failed: {p['error']}")
    else:
        core = p.get("core", {})
        lines.append(f"{p.get('layers')} layers, {p.get('rows')} rows × {p.get('dim')} dims, 5-fold grouped CV, "
                     f"{p.get('threads')} threads: **{core.get('seconds')} s wall** "
                     f"({core.get('cpu_seconds')} s CPU)")
    failed = [k for k, v in results.items() if "error" in v]
    lines += ["", "## Failures", ""] + ([f"- `{k}`: {results[k]['error']}" for k in failed] or ["none"])
    lines += ["", f"Raw numbers: `{path.with_suffix('.json').name}` next to this file.", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, small sizes (for tests)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: min(8, CPUs))")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support (torch " + torch.__version__ + "); install a CUDA "
               "build, e.g. pip install torch==" + torch.__version__.split("+")[0] +
               " --index-url https://download.pytorch.org/whl/cu126") if torch.version.cuda is None \
            else "no CUDA device is visible"
        print(f"error: {why}; `bash bench/gpu.sh --dry-run` runs the CPU smoke version", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    threads = args.threads or min(8, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    model_name = "tiny" if dry else None
    work = Path(args.work or tempfile.mkdtemp(prefix="replab-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    results: dict = {}
    t0 = time.perf_counter()
    n_prompts, n_tokens = (8, 16) if dry else (256, 64)
    for dt in args.dtypes.split(","):
        guarded(results, f"harvest:{dt}", section_harvest, model_name, dt, device, n_prompts, n_tokens,
                1 if dry else 2, work)
        guarded(results, f"patching:{dt}", section_patching, model_name, dt, device, work, dry, threads)
        guarded(results, f"sae:{dt}", section_sae, model_name, dt, device, work, dry)
    guarded(results, "probes", section_probes, work, dry, threads)
    env["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "bash bench/gpu.sh" + (" --dry-run" if dry else "")
    write_markdown(out, env, results, dry, command)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "dry_run": dry, "results": results},
                                                   indent=1, default=str))
    print(f"[gpu bench] wrote {out} ({env['total_s']} s)")
    return 1 if any("error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
