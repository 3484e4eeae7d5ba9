"""Component patching for the W1 report: one prompt, every head and MLP, three corruptions.

Noising (necessity): the base run is the **clean** prompt; a component's activation at the
prompt's positions is replaced by its corrupted value, and the effect is the **drop** of the
target's score (clean − patched; positive = the component supports the answer). Every
variant is a list of :class:`replab.patching.Intervention` handed to
:func:`replab.patching.run_variants` (the one experiment loop); nothing here runs its own
patched forward, except the independent TransformerLens-hook reference of the sanity check.

Corruptions (the report records which, because each gives a different answer):

* ``other-prompt``: activations from the item's ``corrupt_prompt`` (or, when it has none,
  the first other prompt of the set with the same token length and a different answer);
* ``zero``: zero ablation;
* ``mean``: the mean over the set's prompts of the same token length (per position).

Scoring: ``first_token`` reads the target's first token at the last prompt position;
``sum_logprob`` adds the teacher-forced log-probabilities of all target tokens: the run is
repeated with the prompt followed by the first ``k`` target tokens (only the prompt's
positions are patched) and position ``T + k − 1`` is read out, for each ``k``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from replab.circuits.components import check_components, parse_component
from replab.errors import ReplabError
from replab.hooks import hook_name, parse_layers
from replab.patching import Intervention, Variant, run_variants
from replab.patching.metrics import readout

CORRUPTIONS = ("other-prompt", "zero", "mean")
SCORINGS = ("first_token", "sum_logprob")


@dataclass
class Setup:
    """Token ids and the corruption source of one report."""

    prompt_ids: list[int]
    target_ids: list[int]
    corruption: str
    corrupt_ids: list[int] | None = None      # other-prompt
    corrupt_prompt: str | None = None
    corrupt_source: str | None = None         # "corrupt_prompt" or "row N"
    mean: dict | None = None                  # hook -> [T, ...] mean activation
    n_mean: int = 0

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)


def check_options(corruption: str, scoring: str) -> None:
    if corruption not in CORRUPTIONS:
        raise ReplabError(f"unknown corruption {corruption!r} (known: {', '.join(CORRUPTIONS)})")
    if scoring not in SCORINGS:
        raise ReplabError(f"unknown scoring {scoring!r} (known: {', '.join(SCORINGS)})")


def source_of(setup: Setup, hook: str) -> str:
    return {"other-prompt": "corrupt", "zero": "zero"}.get(setup.corruption, f"custom:{hook}")


def intervention(setup: Setup, site: str, layer: int, head: int | None = None) -> Intervention:
    """Replace ``site`` (at every prompt position) by the setup's corrupted value."""
    return Intervention(site, layer, head=head, positions=tuple(range(setup.n_prompt)),
                        source=source_of(setup, hook_name(site, layer)))


def mean_activations(model, prompts_ids: list[list[int]], hooks: set[str]) -> dict[str, torch.Tensor]:
    """``{hook: [T, ...]}`` means over prompts of equal length (the ``mean`` corruption)."""
    toks = torch.tensor(prompts_ids)
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in hooks, return_type=None)
    return {h: cache[h].mean(0).clone() for h in hooks}


def _sources(setup: Setup, k: int) -> dict[str, torch.Tensor] | None:
    if setup.mean is None:
        return None
    out = {}
    for hook, m in setup.mean.items():
        pad = torch.zeros((k, *m.shape[1:]), dtype=m.dtype)
        out[hook] = torch.cat([m, pad])[None]                       # [1, T + k, ...]
    return out


def score_variants(model, setup: Setup, variants: list[Variant], scoring: str,
                   max_tokens: int = 65536) -> dict[str, np.ndarray]:
    """Per variant: ``logit`` and ``logprob`` of the target's first token and ``sum_logprob``
    (of all target tokens under ``sum_logprob``, else equal to ``logprob``), ``[V]`` each."""
    k_max = len(setup.target_ids) if scoring == "sum_logprob" else 1
    V = len(variants)
    total = np.zeros(V)
    first = {}
    for k in range(k_max):
        extra = setup.target_ids[:k]
        clean = torch.tensor([setup.prompt_ids + extra])
        corrupt = torch.tensor([(setup.corrupt_ids or setup.prompt_ids) + extra])
        finals, _ = run_variants(model, clean, corrupt, variants, base="clean", sources=_sources(setup, k),
                                 max_tokens=max_tokens)
        cand = torch.full((V, 1), setup.target_ids[k], dtype=torch.long)
        with torch.inference_mode():
            r = readout(model, finals.reshape(V, -1), cand, need_full=True)
        lp = (r.cand[:, 0] - r.lse).double().numpy()
        if k == 0:
            first = {"logit": r.cand[:, 0].double().numpy(), "logprob": lp}
        total += lp
    return {**first, "sum_logprob": total}


@torch.inference_mode()
def reference_full_corruption(model, setup: Setup, scoring: str) -> float:
    """Independent reference (TransformerLens hooks, no engine): the target score when
    ``blocks.0.hook_resid_pre`` at the prompt's positions is replaced by the corrupted value."""
    hook = "blocks.0.hook_resid_pre"
    k_max = len(setup.target_ids) if scoring == "sum_logprob" else 1
    T = setup.n_prompt
    total = 0.0
    for k in range(k_max):
        ids = torch.tensor([setup.prompt_ids + setup.target_ids[:k]])
        if setup.corruption == "other-prompt":
            _, c = model.run_with_cache(torch.tensor([setup.corrupt_ids + setup.target_ids[:k]]),
                                        names_filter=lambda n: n == hook, return_type=None)
            value = c[hook][0, :T]
        elif setup.corruption == "zero":
            value = None
        else:
            value = setup.mean[hook]

        def patch(act, hook=None, value=value):
            act = act.clone()
            act[0, :T] = 0.0 if value is None else value
            return act

        logits = model.run_with_hooks(ids, fwd_hooks=[(hook, patch)])[0, -1].double()
        lp = float(torch.log_softmax(logits, -1)[setup.target_ids[k]])
        if k == 0 and scoring == "first_token":
            return float(logits[setup.target_ids[0]])
        total += lp
    return total


#: the patched site of each unit kind: a query head's ``z``, an MLP's ``post`` (step 2); a KV head's
#: ``v``, an MLP's gate pre-activation (step 3)
UNIT_SITES = {"head": "z", "mlp": "mlp_post", "v": "v", "mlp_pre": "mlp_pre"}


def unit_name(kind: str, layer: int, index: int | None = None) -> str:
    """``L3H2`` (query head), ``L3MLP``, ``L3KV0`` (KV head, refinement), ``L3MLP.pre``."""
    return {"head": f"L{layer}H{index}", "mlp": f"L{layer}MLP", "v": f"L{layer}KV{index}",
            "mlp_pre": f"L{layer}MLP.pre"}[kind]


def component_units(model, layers="all") -> list[tuple[str, int, int | None]]:
    """Step 2's units, ``(kind, layer, head)``: every query head (``"head"``) of ``layers``, then
    every MLP (``"mlp"``, head None)."""
    lays = parse_layers(layers, model.cfg.n_layers)
    return [("head", la, h) for la in lays for h in range(model.cfg.n_heads)] + [("mlp", la, None) for la in lays]


def refine_units(model, layers="all", components: list[str] | None = None) -> list[tuple[str, int, int | None]]:
    """Step 3's units, ``(kind, layer, index)``: every KV head's ``v`` (``"v"``) of ``layers``, then
    every MLP's ``pre`` (``"mlp_pre"``); with ``components`` (names such as ``L3H2``, ``L5MLP``),
    only the units that refine them (a head's KV head, an MLP's pre), in the same order
    (``layers`` is then ignored)."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    if components is None:
        lays = parse_layers(layers, cfg.n_layers)
        return [("v", la, g) for la in lays for g in range(n_kv)] + [("mlp_pre", la, None) for la in lays]
    group = cfg.n_heads // n_kv
    want = set()
    for name in components:
        c = parse_component(name)
        check_components([c], model)
        if c.kind not in ("head", "mlp") or c.part or c.positions:
            raise ReplabError(f"not a component the report refines: {name!r} (L5H3 or L7MLP)")
        want.add(("v", c.layer, c.head // group) if c.kind == "head" else ("mlp_pre", c.layer, None))
    return sorted(want, key=lambda u: (u[0] != "v", u[1], u[2] or 0))


@dataclass
class PatchedUnits:
    """Result of :func:`patch_units`: ``table`` (one row per unit), the three sanity ``checks``,
    the ``clean`` score, the ``full`` (fully corrupted) score and the ``seconds`` of the
    patched run and of the checks."""

    table: pd.DataFrame
    checks: dict
    clean: float
    full: float
    seconds: dict


def patch_units(model, setup: Setup, units: list[tuple[str, int, int | None]], check: dict,
                scoring: str = "first_token") -> PatchedUnits:
    """Steps 2 and 3 in one batched engine run: each unit's site (:data:`UNIT_SITES`) replaced by
    the setup's corruption at every prompt position, plus three sanity variants (the empty patch,
    the whole layer-0 residual stream, a clean-into-clean patch) checked against a plain forward
    and an independent TransformerLens-hook reference (ReplabError on failure). ``check`` is
    :func:`replab.circuits.report.answer_check`'s result (the clean scores).

    Returns:
        :class:`PatchedUnits`; its table has per unit ``component`` (:func:`unit_name`), ``kind``,
        ``layer``, ``head`` (query head or None), ``kv_head``, ``site``, ``patched`` (the score),
        ``drop`` = clean − patched, ``drop_logit`` and ``drop_logprob`` (first target token),
        ``normalized_drop`` = drop / the fully corrupted run's drop.
    """
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    group = H // (cfg.n_key_value_heads or H)
    key = "logit" if scoring == "first_token" else "sum_logprob"
    clean = check[key]
    variants = [Variant(()), Variant((intervention(setup, "resid_pre", 0),)),
                Variant((Intervention("z", L // 2, head=0, positions=tuple(range(setup.n_prompt)), source="clean"),))]
    variants += [Variant((intervention(setup, UNIT_SITES[k], la, h),)) for k, la, h in units]
    t0 = time.time()
    res = score_variants(model, setup, variants, scoring)
    t1 = time.time()
    checks = _checks(model, setup, scoring, key, res, clean)
    seconds = {"patching": round(t1 - t0, 2), "checks": round(time.time() - t1, 2)}
    full = float(res[key][1])
    table = pd.DataFrame([{"component": unit_name(k, la, h), "kind": k, "layer": la,
                           "head": h if k == "head" else None,
                           "kv_head": (h // group if k == "head" else h) if k in ("head", "v") else None,
                           "site": UNIT_SITES[k]} for k, la, h in units],
                         columns=["component", "kind", "layer", "head", "kv_head", "site"])
    table["patched"] = res[key][3:]
    table["drop"] = clean - table["patched"]
    table["drop_logit"] = check["logit"] - res["logit"][3:]
    table["drop_logprob"] = check["logprob"] - res["logprob"][3:]
    table["normalized_drop"] = table["drop"] / (clean - full) if abs(clean - full) > 1e-6 else np.nan
    return PatchedUnits(table, checks, clean, full, seconds)


def _checks(model, setup: Setup, scoring: str, key: str, res: dict, clean: float) -> dict:
    ref_full = reference_full_corruption(model, setup, scoring)
    out = {"empty_patch_equals_clean": (res[key][0], clean),
           "full_corruption_equals_reference": (res[key][1], ref_full),
           "clean_into_clean_is_noop": (res[key][2], clean)}
    checks = {}
    for name, (got, want) in out.items():
        err = abs(float(got) - float(want))
        checks[name] = {"value": float(got), "expected": float(want), "abs_error": err,
                        "ok": err <= 1e-4 * max(1.0, abs(float(want)))}
    bad = [n for n, c in checks.items() if not c["ok"]]
    if bad:
        raise ReplabError(f"sanity check failed: {bad[0]} (error {checks[bad[0]]['abs_error']:.2e})")
    return checks
