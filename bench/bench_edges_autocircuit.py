"""Benchmark: replab's EAP against auto-circuit's (UFO-101/auto-circuit 1.0.1) on the same task.

auto-circuit is not a replab dependency: run this with a Python that has it, e.g. a throwaway
virtual environment that sees the shared one's packages (nothing of replab's is changed)::

    python -m venv /tmp/acvenv
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/acvenv/lib/python3.11/site-packages/zz_shared.pth
    /tmp/acvenv/bin/pip install auto-circuit          # adds jax, tracr, kaleido ...; keeps torch/TL as they are
    PYTHONPATH=$PWD /tmp/acvenv/bin/python bench/bench_edges_autocircuit.py --json runs/bench/edges_autocircuit.json

auto-circuit's graph has one key and one value input **per query head**; under grouped-query
attention TransformerLens's split inputs have one per KV head, which auto-circuit's per-head
masks do not fit. The script therefore switches on TransformerLens's
``ungroup_grouped_query_attention`` for auto-circuit (each query head gets its own copy of the
shared key/value input; the forward is unchanged). To first order, a replab edge into KV head
``g`` equals the sum of auto-circuit's edges into the query heads of group ``g`` (the grouped
input feeds each of them with the same weights), and every other edge maps one to one.
auto-circuit's score is the gradient of ``−mean logit difference`` with respect to the edge mask
(``mask_gradient_prune_scores(grad_function="logit", answer_function="avg_diff", mask_val=0)``,
which its docs say equals Syed et al.'s EAP), so ``auto_circuit = −replab_eap × (M_clean − M_corrupt)``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _replab_name(src: str, dest: str, group: int) -> tuple[str, str]:
    """auto-circuit node names -> replab sender, receiver names."""
    if src == "Resid Start":
        s = "EMBED"
    elif src.startswith("MLP "):
        s = f"L{src.split()[1]}MLP"
    else:
        layer, head = src[1:].split(".")
        s = f"L{layer}H{head}"
    if dest == "Resid End":
        return s, "LOGITS"
    if dest.startswith("MLP "):
        return s, f"L{dest.split()[1]}MLP"
    layer, head, letter = dest[1:].split(".")
    if letter == "Q":
        return s, f"L{layer}H{head}.q"
    return s, f"L{layer}KV{int(head) // group}.{letter.lower()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default SmolLM2; 'tiny' for a smoke run")
    ap.add_argument("--task", default="next_day")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    shim = _shim_transformer_lens()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model
    from scipy.stats import pearsonr, spearmanr

    from replab.circuits.eap import attribute_edges
    from replab.patching.runs import load

    torch.set_num_threads(args.threads)
    model, task = load(args.model, args.task)
    attribute_edges(model, task, "eap")                        # warm-up (graph, first-call costs)
    t0, c0 = time.perf_counter(), time.process_time()
    mine = attribute_edges(model, task, "eap")
    t_mine, c_mine = time.perf_counter() - t0, time.process_time() - c0
    graph = mine.graph
    lookup = {n: i for i, n in enumerate(graph.edge_names())}
    denom = mine.clean_metric - mine.corrupt_metric

    cfg = model.cfg
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    cfg.use_split_qkv_input = cfg.use_hook_mlp_in = cfg.use_attn_result = True
    if cfg.n_key_value_heads:
        cfg.ungroup_grouped_query_attention = True
    info = {"model": cfg.model_name, "task": task.describe(), "n_edges_replab": graph.n_edges,
            "replab_eap_s": t_mine, "replab_eap_cpu_s": c_mine, "transformer_lens_shim": shim,
            "load_average_start": list(os.getloadavg())}
    try:
        ds = PromptDataset(task.clean, task.corrupt, [a[None] for a in task.answer], [f[None] for f in task.foil])
        dl = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=task.n_prompts, shuffle=False)
        t0 = time.perf_counter()
        pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True,
                             device=torch.device("cpu"))
        t_wrap = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        scores = mask_gradient_prune_scores(pm, dl, None, grad_function="logit", answer_function="avg_diff",
                                            mask_val=0.0)
        t_ac, c_ac = time.perf_counter() - t0, time.process_time() - c0
    except Exception as exc:  # noqa: BLE001 - report why auto-circuit could not run
        info["auto_circuit"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(info["auto_circuit"])
        _write(args.json, info)
        return
    theirs = np.zeros(graph.n_edges)
    seen = 0
    for edge in pm.edges:
        s, r = _replab_name(edge.src.name, edge.dest.name, group)
        theirs[lookup[f"{s}->{r}"]] += float(scores[edge.dest.module_name][edge.patch_idx])
        seen += 1
    expected = -mine.scores * denom
    info["auto_circuit"] = {"n_edges": seen, "wrap_s": t_wrap, "eap_s": t_ac, "eap_cpu_s": c_ac,
                            "spearman": float(spearmanr(theirs, expected).statistic),
                            "pearson": float(pearsonr(theirs, expected).statistic),
                            "max_abs_diff": float(np.abs(theirs - expected).max()),
                            "max_abs_score": float(np.abs(expected).max())}
    a = info["auto_circuit"]
    print(f"model {info['model']}, task {task.name}: {graph.n_edges:,} replab edges, {seen:,} auto-circuit edges "
          f"(K/V per query head)")
    print(f"replab EAP {t_mine:.2f} s ({c_mine:.2f} CPU s); auto-circuit wrap {t_wrap:.2f} s + EAP {t_ac:.2f} s "
          f"({c_ac:.2f} CPU s): replab {c_ac / c_mine:.1f}x less CPU time ({t_ac / t_mine:.1f}x wall)")
    print(f"agreement (auto-circuit vs -replab x (clean - corrupt)): Spearman {a['spearman']:.6f}, "
          f"Pearson {a['pearson']:.6f}, max |diff| {a['max_abs_diff']:.2e} (max |score| {a['max_abs_score']:.2e})")
    _write(args.json, info)


def _shim_transformer_lens() -> str | None:
    """auto-circuit 1.0.1 imports ``transformer_lens.past_key_value_caching``, which TransformerLens
    3.x renamed (``transformer_lens.cache.key_value_cache``). It only uses the class as a type and
    for key/value caching, which this benchmark does not ask for: alias the module."""
    import sys
    import types

    import transformer_lens

    try:
        import transformer_lens.past_key_value_caching  # noqa: F401
        return None
    except ModuleNotFoundError:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        shim = types.ModuleType("transformer_lens.past_key_value_caching")
        shim.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        sys.modules[shim.__name__] = shim
        transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        return ("transformer_lens.past_key_value_caching and transformer_lens.HookedTransformerKeyValueCache "
                "aliased to TransformerLens 3's TransformerLensKeyValueCache (auto-circuit 1.0.1 predates "
                "TransformerLens 3)")


def _write(path, info):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(info, indent=1, default=float))


if __name__ == "__main__":
    main()
