"""Path patching (W3 step 4), with the semantics of Wang et al. 2022 (IOI, appendix B).

>>> res = path_patch(model, task, [[parse_component("L21H4")]], parse_receiver("logits"))   # doctest: +SKIP

For a sender set ``S`` and a receiver ``R``:

1. **Stage 1.** Base run = clean. The senders' outputs (``hook_z``) come from the corrupt run
   (or the ``ablation``: ``--ablation mean`` ablates only the path); every other attention
   head's output is frozen at its clean value; MLPs are recomputed (``freeze_mlps``: frozen
   at their clean values too). The senders' change therefore reaches the receiver only
   directly through the residual stream (and through the recomputed MLPs).
2. Receiver ``logits``: the metric of that run. Receiver a head's input (``L9H1.q``,
   ``.k``, ``.v``) or an MLP (``L12MLP``): that input is **recorded** in the stage-1 run,
   then **stage 2** runs clean with only that input replaced by the recording, and the metric
   is read there. An MLP is a function of its input at each position, so its recorded
   output stands for its input. Under grouped-query attention ``k``/``v`` exist per KV head:
   the receiver is the KV head the query head reads, so stage 2 changes the keys/values of
   its whole query group (``kv_group`` in each record says which heads).

Senders must sit below a head receiver's layer (at or below an MLP receiver's). Each
sender set is one variant; heads are frozen with one several-head intervention per layer,
so hundreds of sender sets run in one batched engine call per stage.

Built-in checks (:class:`~replab.patching.checks.Check`, enforced like the engine's):

* ``path_empty_senders``: an empty sender set (every head frozen at clean, from layer 0)
  reproduces the clean run: normalised effect 1;
* ``path_all_senders`` (receiver ``logits``): every head as a sender with MLPs frozen equals
  the direct computation ``final_clean + Σ_heads (z_src − z_clean) W_O`` at the last position,
  read through the model's own final norm and unembedding;
* ``path_direct_dla`` (receiver ``logits``): each sender set's direct path with frozen MLPs
  equals the same DLA-style patch of just its heads' outputs (the run's own variants when
  ``freeze_mlps``, else one extra frozen-MLP variant).

Records: ``sender`` (list of names), ``receiver``, ``metric`` (prompt mean of the
path-patched run), ``clean_metric``, ``corrupt_metric``, ``normalized_effect`` (1 = clean,
0 = corrupt), ``ci_low``, ``ci_high``, ``drop`` (1 − effect), ``receiver_site``,
``kv_head``, ``kv_group``, ``ablation``, ``freeze_mlps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.components import Component, all_heads, check_components, names, parse_component
from replab.errors import ReplabError
from replab.patching.checks import ENGINE_TOL, Check
from replab.patching.engine import Variant
from replab.patching.interventions import Intervention
from replab.patching.plan import plan_forwards, run_plan


@dataclass(frozen=True)
class Receiver:
    """``logits``, a head's input (``part`` q/k/v) or an MLP."""

    kind: str                  # logits | head | mlp
    layer: int | None = None
    head: int | None = None
    part: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"L{self.layer}MLP"
        return f"L{self.layer}H{self.head}.{self.part}"

    def hook(self) -> str:
        if self.kind == "mlp":
            return f"blocks.{self.layer}.hook_mlp_out"
        return f"blocks.{self.layer}.attn.hook_{self.part}"

    def site_head(self, model) -> tuple[str, int | None]:
        """The stage-2 intervention's site and head (a KV head for k/v)."""
        if self.kind == "mlp":
            return "mlp_out", None
        if self.part in ("k", "v"):
            return self.part, Component("head", self.layer, self.head, self.part).kv_head(model)
        return "q", self.head


def parse_receiver(text: str, model=None) -> Receiver:
    """``logits``, ``L9H1.q|.k|.v`` or ``L12MLP`` -> :class:`Receiver`."""
    t = str(text).strip().upper()
    try:     # the component vocabulary (replab.circuits.components), positions not allowed here
        c = None if t == "LOGITS" else parse_component(t)
    except ReplabError:
        c = Component("invalid")
    if c is None:
        r = Receiver("logits")
    elif c.kind == "head" and c.part and c.positions is None:
        r = Receiver("head", c.layer, c.head, c.part)
    elif c.kind == "mlp" and c.positions is None:
        r = Receiver("mlp", c.layer)
    else:
        hint = " (a head receiver needs its input: .q, .k or .v)" if c.is_head_output and c.positions is None else ""
        raise ReplabError(f"unknown receiver {text!r}{hint}: use logits, L9H1.q, L9H1.k, L9H1.v or L12MLP")
    if model is not None and r.kind != "logits":
        check_components([Component("head", r.layer, r.head) if r.kind == "head" else Component("mlp", r.layer)],
                         model)
    return r


@dataclass
class PathResult:
    """``records`` (one per sender set), ``table`` (with candidate logits), ``summary``."""

    records: list[dict]
    table: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: dict = field(default_factory=dict)
    plan: object = None


def _top_layer(receiver: Receiver, n_layers: int) -> int:
    """Layers whose heads/MLPs must be frozen: below a head receiver, up to and including an
    MLP receiver's layer, everything for logits."""
    if receiver.kind == "head":
        return receiver.layer
    if receiver.kind == "mlp":
        return receiver.layer + 1
    return n_layers


def _check_senders(model, senders: list[Component], receiver: Receiver, n_tokens: int) -> None:
    check_components(senders, model, n_tokens)
    for s in senders:
        if not s.is_head_output:
            raise ReplabError(f"sender {s.name}: senders are head outputs (L3H2, optionally @positions)")
        if receiver.kind == "head" and s.layer >= receiver.layer:
            raise ReplabError(f"sender {s.name} is not below the receiver {receiver.name} (layer {receiver.layer})")
        if receiver.kind == "mlp" and s.layer > receiver.layer:
            raise ReplabError(f"sender {s.name} is above the receiver {receiver.name}")


def path_interventions(model, senders: list[Component], receiver: Receiver, source: str, n_tokens: int,
                       freeze_mlps: bool = False, seed: int = 0, start: int | None = None) -> tuple:
    """Stage-1 interventions of one sender set: senders from ``source``, every other head
    frozen at clean from the lowest sender's layer (or ``start``) up to the receiver, MLPs
    frozen too with ``freeze_mlps`` (never the receiver MLP)."""
    cfg = model.cfg
    top = _top_layer(receiver, cfg.n_layers)
    lo = min([s.layer for s in senders], default=cfg.n_layers) if start is None else start
    every = tuple(range(n_tokens))
    send: dict[int, dict] = {}
    for s in senders:
        send.setdefault(s.layer, {})
        pos = s.abs_positions(n_tokens)
        prev = send[s.layer].get(s.head, ())
        send[s.layer][s.head] = None if pos is None or prev is None else tuple(sorted(set(prev or ()) | set(pos)))
    out = []
    for layer in range(lo, top):
        mine = send.get(layer, {})
        frozen = [h for h in range(cfg.n_heads) if h not in mine]
        if frozen:
            out.append(Intervention("z", layer, head=tuple(frozen), source="clean"))
        by_pos: dict = {}
        for h, pos in mine.items():
            by_pos.setdefault(pos, []).append(h)
            if pos is not None:      # the sender's other positions stay clean
                rest = tuple(p for p in every if p not in pos)
                if rest:
                    out.append(Intervention("z", layer, head=h, positions=rest, source="clean"))
        for pos, heads in by_pos.items():
            out.append(Intervention("z", layer, head=tuple(heads), positions=pos, source=source, seed=seed))
        if freeze_mlps and not (receiver.kind == "mlp" and layer == receiver.layer):
            out.append(Intervention("mlp_out", layer, source="clean"))
    return tuple(out)


def _variant(model, senders, receiver, ablation, n_tokens, freeze_mlps, name, info, start=None, record=()):
    ivs = path_interventions(model, senders, receiver, ablation.source, n_tokens, freeze_mlps, ablation.seed, start)
    rec = (receiver.hook(),) if receiver.kind != "logits" else ()
    return Variant(ivs, start=start, name=name, group=info.get("group", "path"), info=info, record=rec + tuple(record))


def _direct_metric(model, task, metric: str, forwards, deltas: torch.Tensor) -> np.ndarray:
    """Per prompt: the metric of ``final_clean + delta`` (``deltas`` ``[V, N, d]``): the model's
    own final norm and unembedding. ``[V, N]``."""
    from replab.patching.metrics import FULL_VOCAB, metric_values, readout

    final = forwards["clean"].final
    v, n, d = deltas.shape
    need_full, need_logp = metric in FULL_VOCAB, metric == "kl"
    with torch.inference_mode():
        clean_logp = readout(model, final, task.candidates, need_full, need_logp).logp
        r = readout(model, (final[None] + deltas).reshape(v * n, d), task.candidates.repeat(v, 1), need_full, need_logp)
        rep = clean_logp.repeat(v, 1) if clean_logp is not None else None
        vals = metric_values(metric, r, rep, getattr(task, "class_a", None))
    return vals.numpy().astype(np.float64).reshape(v, n)


def _head_delta(model, forwards, senders: list[Component], z_src: dict[int, torch.Tensor]) -> torch.Tensor:
    """``Σ_s (z_src − z_clean)[:, -1] @ W_O[s]`` ``[N, d]`` (positions: only the last matters)."""
    by_layer: dict[int, list[int]] = {}
    for s in senders:
        by_layer.setdefault(s.layer, []).append(s.head)
    out = 0
    for layer, heads in by_layer.items():
        h = torch.tensor(sorted(set(heads)))
        zc = forwards["clean"][f"blocks.{layer}.attn.hook_z"][:, -1, h]          # [N, h, d_head]
        zs = z_src[layer][:, -1, h]
        out = out + torch.einsum("nhe,hed->nd", zs - zc, model.blocks[layer].attn.W_O[h])
    return out


def path_patch(model, task, sender_sets: list[list[Component]], receiver: Receiver,
               ablation: Ablation | None = None, metric: str = "logit_diff", freeze_mlps: bool = False,
               n_boot: int = 1000, seed: int = 0, forwards=None, progress: bool = False,
               labels: list[str] | None = None) -> PathResult:
    """Path-patch each sender set into ``receiver`` (module docstring).

    Args:
        sender_sets: lists of head components (one variant each; may be empty: the clean run).
        ablation: what the senders' outputs become (default ``corrupt``).
        labels: names of the sender sets (default: their components joined by ``+``).
    """
    ablation = ablation or Ablation("corrupt")
    if not sender_sets:
        raise ReplabError("no sender sets given")
    n_tok = task.n_tokens
    for s in sender_sets:
        _check_senders(model, s, receiver, n_tok)
    labels = labels or ["+".join(names(s)) or "(none)" for s in sender_sets]
    direct_check = receiver.kind == "logits"
    corrupt_src = ablation.kind == "corrupt"
    variants = [_variant(model, s, receiver, ablation, n_tok, freeze_mlps, f"path{j}",
                         {"group": "path", "sender": labels[j], "index": j}) for j, s in enumerate(sender_sets)]
    extra = [_variant(model, [], receiver, ablation, n_tok, freeze_mlps, "check_empty", {"group": "check"}, start=0)]
    if direct_check:
        every = all_heads(model)
        z_all = tuple(f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers))
        extra.append(_variant(model, every, receiver, ablation, n_tok, True, "check_all", {"group": "check"},
                              record=() if corrupt_src else z_all))
        if not freeze_mlps:
            first = next((s for s in sender_sets if s), None)
            if first is not None:
                zs = tuple(sorted({f"blocks.{c.layer}.attn.hook_z" for c in first}))
                extra.append(_variant(model, first, receiver, ablation, n_tok, True, "check_direct",
                                      {"group": "check", "index": sender_sets.index(first)},
                                      record=() if corrupt_src else zs))
        elif not corrupt_src:
            # freeze_mlps with an ablation source: record the senders' z of (up to 8) variants
            for j, s in enumerate(sender_sets[:8]):
                if s:
                    zs = tuple(sorted({f"blocks.{c.layer}.attn.hook_z" for c in s}))
                    variants[j] = Variant(variants[j].interventions, name=variants[j].name,
                                          group=variants[j].group, info=variants[j].info, record=zs)
    stage1 = variants + extra
    hooks = sorted({iv.hook for v in stage1 for iv in v.interventions})
    sources = ablation.sources(model, task, hooks)
    if forwards is None:
        extra_hooks = [] if receiver.kind == "logits" else [f"blocks.{receiver.layer}.hook_resid_pre"]
        proto = [] if receiver.kind == "logits" else [Variant((Intervention(*receiver.site_head(model)[:1],
                                                                            receiver.layer,
                                                                            head=receiver.site_head(model)[1],
                                                                            source="custom:x"),))]
        forwards = plan_forwards(model, task, stage1 + proto, base="clean", hooks=extra_hooks)
    res1 = run_plan(model, task, stage1, metric, base="clean", sources=sources, forwards=forwards, n_boot=n_boot,
                    seed=seed, progress=progress, label="path stage 1", unit="path")
    checks: list[Check] = []
    res = res1
    if receiver.kind != "logits":
        site, head = receiver.site_head(model)
        hook = receiver.hook()
        stage2, replay = [], {}
        for i, v in enumerate(stage1):
            key = f"path_input_{i}"
            replay[key] = res1.recorded[i][hook]
            stage2.append(Variant((Intervention(site, receiver.layer, head=head, source=f"custom:{key}"),),
                                  name=v.name, group=v.group, info=v.info))
        res = run_plan(model, task, stage2, metric, base="clean", sources=replay, forwards=res1.forwards,
                       n_boot=n_boot, seed=seed, progress=progress, label="path stage 2", unit="path")
    n = len(variants)
    idx = {v.name: i for i, v in enumerate(stage1)}
    checks.append(Check("path_empty_senders", float(res.effect[idx["check_empty"]]), 1.0, ENGINE_TOL,
                        "no senders (every head frozen at its clean value from layer 0) reproduces the clean run"))
    if direct_check:
        checks += _direct_checks(model, task, metric, res1, sender_sets, idx, freeze_mlps, corrupt_src, n)
    from replab.patching.checks import enforce

    enforce(checks)
    records = []
    site_note = None
    if receiver.kind == "head" and receiver.part in ("k", "v"):
        comp = Component("head", receiver.layer, receiver.head, receiver.part)
        site_note = (comp.kv_head(model), comp.kv_group(model))
    table = res.table().iloc[:n].reset_index(drop=True)
    for j, s in enumerate(sender_sets):
        records.append({"sender": names(s), "receiver": receiver.name, "metric_name": metric,
                        "metric": float(res.patched[j].mean()), "clean_metric": res.clean_metric,
                        "corrupt_metric": res.corrupt_metric, "normalized_effect": float(res.effect[j]),
                        "ci_low": float(res.ci_low[j]), "ci_high": float(res.ci_high[j]),
                        "drop": float(1 - res.effect[j]),
                        "receiver_site": receiver.hook() if receiver.kind != "logits" else "logits",
                        "kv_head": site_note[0] if site_note else None,
                        "kv_group": site_note[1] if site_note else None,
                        "ablation": ablation.describe(), "freeze_mlps": freeze_mlps})
    table = table.assign(sender_layer=[s[0].layer if len(s) == 1 else None for s in sender_sets],
                         sender_head=[s[0].head if len(s) == 1 else None for s in sender_sets],
                         receiver=receiver.name, drop=1 - table["normalized_effect"])
    summary = {"receiver": receiver.name, "n_sender_sets": len(sender_sets), "ablation": ablation.describe(),
               "freeze_mlps": freeze_mlps, "metric": metric, "clean_metric": res.clean_metric,
               "corrupt_metric": res.corrupt_metric, "checks": {**res1.checks_dict(), **res.checks_dict(),
                                                                **{c.name: c.to_dict() for c in checks}},
               "stages": 1 if receiver.kind == "logits" else 2, "bootstrap": res.bootstrap,
               "seconds": round(res1.seconds + (res.seconds if res is not res1 else 0), 3),
               "n_variants": len(stage1) * (1 if res is res1 else 2)}
    if site_note:
        summary["note"] = (f"under grouped-query attention {receiver.name} is KV head {site_note[0]} of layer "
                           f"{receiver.layer}, read by {site_note[1]}: stage 2 changes what all of them read")
    return PathResult(records, table, res.per_prompt(range(n)), summary, res)


def _direct_checks(model, task, metric, res1, sender_sets, idx, freeze_mlps, corrupt_src, n) -> list[Check]:
    fw = res1.forwards
    L = model.cfg.n_layers
    out = []
    # all heads as senders, MLPs frozen: final_clean + sum over heads of the change of their outputs
    row = idx["check_all"]
    if corrupt_src:
        z_src = {layer: fw["corrupt"][f"blocks.{layer}.attn.hook_z"] for layer in range(L)}
    else:
        z_src = {layer: res1.recorded[row][f"blocks.{layer}.attn.hook_z"] for layer in range(L)}
    every = all_heads(model)
    delta = _head_delta(model, fw, every, z_src)
    want = _direct_metric(model, task, metric, fw, delta[None])[0]
    got = res1.patched[row]
    out.append(Check("path_all_senders", float(np.abs(got - want).max() / _scale(res1)), 0.0, ENGINE_TOL,
                     "every head as a sender with frozen MLPs equals final_clean + Σ (z_src − z_clean) W_O "
                     "(max per-prompt difference, in units of |clean − corrupt|)"))
    rows = [idx["check_direct"]] if "check_direct" in idx else [j for j in range(n) if sender_sets[j]]
    if not freeze_mlps and "check_direct" not in idx:
        rows = []
    if freeze_mlps and not corrupt_src:
        rows = [j for j in rows if res1.recorded.get(j)]
    if rows:
        deltas = []
        for j in rows:
            s = sender_sets[res1.variants[j].info.get("index", j)]
            zs = ({c.layer: fw["corrupt"][f"blocks.{c.layer}.attn.hook_z"] for c in s} if corrupt_src else
                  {c.layer: res1.recorded[j][f"blocks.{c.layer}.attn.hook_z"] for c in s})
            if any(c.positions is not None and (task.n_tokens - 1) not in c.abs_positions(task.n_tokens) for c in s):
                zs = {c.layer: fw["clean"][f"blocks.{c.layer}.attn.hook_z"] for c in s}   # not at the last position
            deltas.append(_head_delta(model, fw, s, zs))
        want = _direct_metric(model, task, metric, fw, torch.stack(deltas))
        got = res1.patched[rows]
        out.append(Check("path_direct_dla", float(np.abs(got - want).max() / _scale(res1)), 0.0, ENGINE_TOL,
                         f"the direct path with frozen MLPs equals DLA-style patching of the senders' outputs "
                         f"({len(rows)} sender set(s); max per-prompt difference in units of |clean − corrupt|)"))
    return out


def _scale(res) -> float:
    return max(abs(res.clean_metric - res.corrupt_metric), 1e-8)
