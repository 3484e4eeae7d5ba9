"""Measure reduced-precision results against float32: harvest, a patching sweep and DLA.

Run: ``python bench/bench_dtype.py`` (SmolLM2 and the tiny architecture matrix; ``--skip-smol``
or ``--skip-tiny`` for one of them; ``--device cuda`` on a GPU). Prints a Markdown table and
writes ``runs/bench/dtype.json``. For each model and dtype (bfloat16, float16), against the
same model in float32 on the same device:

* ``parity``: the load-time check, max |logit − Hugging Face float32 logit| on the parity prompt,
  and that maximum relative to max(1, max |reference logit|) (the tolerance's unit);
* ``harvest``: ``resid_post`` at every layer, last position, of the ``next_day`` prompts:
  ``harvest_rel_error`` = ‖Δ‖ / ‖float32‖ (Frobenius, all rows and dimensions of a layer), worst
  layer; ``harvest_max_err_over_rms`` = max |Δ| / RMS of the float32 activations, worst layer
  (large where a few dimensions carry outsized values);
* ``sweep``: ``resid_pre`` by layer × position on the ``next_day`` task (SmolLM2: 7 prompts;
  tiny: 3): max |Δ normalised effect| over cells, the float32 effects' range (max − min: it
  grows as the clean − corrupt gap the effects are divided by shrinks), and whether the
  sweep's sanity checks passed;
* ``dla``: per-head DLA of the logit difference: max |Δ| relative to the largest float32 head
  effect; and the DLA sum-check error (sum of components vs the model's logit difference).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "bench"
DTYPES = ("bfloat16", "float16")


def measure(name: str, device: str, limit: int, work: Path) -> list[dict]:
    from replab.harvesting import harvest
    from replab.models import load_model
    from replab.patching import load_task, sweep
    from replab.patching.logit_attribution import dla

    def run(dtype):
        t0 = time.perf_counter()
        m = load_model(name, device=device, dtype=dtype)
        task = load_task("next_day", m.tokenizer, limit=limit)
        store = harvest(m, "next_day", hooks="resid_post", layers="all", positions="last",
                        out=work / f"{Path(str(name)).name}-{dtype}", progress=False)
        acts = {h: np.asarray(store.acts(h), dtype=np.float64) for h in store.hooks}
        sw = sweep(m, task, site="resid_pre", by="layer,position", n_boot=10, checks=True)
        d = dla(m, task)
        return {"model": m, "acts": acts, "sweep": sw, "dla": d, "seconds": time.perf_counter() - t0}

    ref = run("float32")
    rows = []
    for dtype in DTYPES:
        try:
            got = run(dtype)
        except Exception as exc:  # noqa: BLE001 - a dtype that breaks is a result too
            rows.append({"model": str(name), "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        par = got["model"].replab_identity.parity or {}
        harvest_err = max(float(np.abs(got["acts"][h] - a).max() / np.sqrt((a ** 2).mean()))
                          for h, a in ref["acts"].items())
        harvest_fro = max(float(np.linalg.norm(got["acts"][h] - a) / np.linalg.norm(a))
                          for h, a in ref["acts"].items())
        e_ref = ref["sweep"].table.sort_values(["layer", "position"])["normalized_effect"].to_numpy()
        e_got = got["sweep"].table.sort_values(["layer", "position"])["normalized_effect"].to_numpy()
        h_ref = ref["dla"]["heads"]["logit_diff"].to_numpy()
        h_got = got["dla"]["heads"]["logit_diff"].to_numpy()
        rows.append({
            "model": str(name), "dtype": dtype, "device": device,
            "parity_max_abs_logit_diff": par.get("max_abs_logit_diff"),
            "parity_relative": (par["max_abs_logit_diff"] / max(1.0, par["reference_max_abs_logit"])
                                if par else None),
            "harvest_max_err_over_rms": harvest_err,
            "harvest_rel_error": harvest_fro,
            "sweep_max_abs_effect_diff": float(np.abs(e_got - e_ref).max()),
            "sweep_effect_range": float(e_ref.max() - e_ref.min()),
            "sweep_checks_ok": all(c["ok"] for c in got["sweep"].summary["checks"].values()),
            "dla_head_max_diff_rel": float(np.abs(h_got - h_ref).max() / np.abs(h_ref).max()),
            "dla_sum_check_error": float(got["dla"]["check"]["abs_error"].max()),
            "seconds": round(got["seconds"], 1), "seconds_float32": round(ref["seconds"], 1),
        })
    return rows


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2g}"
    return str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-smol", action="store_true")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--archs", default=None, help="comma list of tiny architectures (default: all)")
    p.add_argument("--json", default=str(OUT / "dtype.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from replab.models.zoo import TINY_SUPPORTED, build_tiny

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="replab-dtype-") as tmp:
        work = Path(tmp)
        if not args.skip_tiny:
            from replab.models import load_tokenizer

            load_tokenizer(None)                       # from the shared cache, before switching
            os.environ["REPLAB_CACHE"] = str(work / "cache")
            archs = args.archs.split(",") if args.archs else TINY_SUPPORTED
            for arch in archs:
                folder = build_tiny(arch, work / "zoo" / arch)
                for r in measure(str(folder), args.device, 3, work):
                    rows.append({**r, "model": f"tiny {arch}"})
                    print(json.dumps(rows[-1]), flush=True)
            del os.environ["REPLAB_CACHE"]
        if not args.skip_smol:
            for r in measure(None, args.device, None, work):
                rows.append({**r, "model": "SmolLM2-135M-Instruct"})
                print(json.dumps(rows[-1]), flush=True)
    cols = ["model", "dtype", "parity_max_abs_logit_diff", "parity_relative", "harvest_rel_error",
            "harvest_max_err_over_rms", "sweep_max_abs_effect_diff", "sweep_effect_range", "sweep_checks_ok",
            "dla_head_max_diff_rel", "dla_sum_check_error"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) if "error" not in r or c in ("model", "dtype") else
                                 (r["error"] if c == "parity_max_abs_logit_diff" else "")
                                 for c in cols) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
