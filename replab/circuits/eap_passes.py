"""The passes behind :mod:`replab.circuits.eap`: forward and backward runs of a batch of prompts
(gradients at every receiver input in :func:`~replab.patching.edge_patch.edge_mode`, the sender
outputs, an optional frozen key/value cache of the shared prefix), the senders' ``Δ_u`` rows and
the batched products ``Δ_u · g_v`` that turn them into one score per edge."""

from __future__ import annotations

import numpy as np
import torch

from replab.circuits.graph import EdgeGraph
from replab.patching.edge_patch import edge_mode, head_outputs
from replab.patching.metrics import FULL_VOCAB, metric_values, readout


class DropGrad(torch.autograd.Function):
    """Identity forward, zero gradient backward (GradDrop)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def prompt_batches(n: int, n_tokens: int, batch_size: int | None) -> list[slice]:
    size = batch_size or max(1, 512 // max(1, n_tokens))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def sender_stack(model, acts: dict) -> torch.Tensor:
    """Sender outputs ``[N, T, S, d]`` in graph order from cached hook activations."""
    parts = [acts["blocks.0.hook_resid_pre"][:, :, None]]
    for layer in range(model.cfg.n_layers):
        parts.append(head_outputs(model, acts[f"blocks.{layer}.attn.hook_z"], layer))
        parts.append(acts[f"blocks.{layer}.hook_mlp_out"][:, :, None])
    return torch.cat(parts, dim=2)


@torch.no_grad()
def delta_rows(model, corrupt: dict, clean: dict, keep: int) -> torch.Tensor:
    """``Δ_u`` of every sender as rows ``[S, N·keep·d]`` (graph order; the last ``keep``
    positions, which both runs end with), straight from the two runs' hook activations: a head's
    ``Δ`` is ``(z_corrupt − z_clean) W_O`` (one product per layer, written in place), so no
    per-run sender stack is built."""
    def diff(name):
        return corrupt[name][:, -keep:] - clean[name][:, -keep:]

    first = diff("blocks.0.hook_resid_pre")
    n, t, d = first.shape
    h = model.cfg.n_heads
    rows = torch.empty(1 + model.cfg.n_layers * (h + 1), n * t, d, dtype=first.dtype, device=first.device)
    rows[0] = first.reshape(n * t, d)
    for layer in range(model.cfg.n_layers):
        up = 1 + layer * (h + 1)
        dz = diff(f"blocks.{layer}.attn.hook_z")                       # [N, T', H, d_head]
        torch.bmm(dz.permute(2, 0, 1, 3).reshape(h, n * t, -1), model.blocks[layer].attn.W_O,
                  out=rows[up:up + h])
        rows[up + h] = diff(f"blocks.{layer}.hook_mlp_out").reshape(n * t, d)
    return rows.reshape(rows.shape[0], -1)


def sender_hooks(model) -> list[str]:
    n = model.cfg.n_layers
    return (["blocks.0.hook_resid_pre"] + [f"blocks.{k}.attn.hook_z" for k in range(n)]
            + [f"blocks.{k}.hook_mlp_out" for k in range(n)])


def metric_sum(model, task, rows: slice, metric: str, final: torch.Tensor, clean_logp) -> torch.Tensor:
    """Σ over the batch's prompts of the per-prompt metric, from final residuals ``[n, T, d]``."""
    need_full = metric in FULL_VOCAB
    r = readout(model, final[:, -1], task.candidates[rows], need_full, metric == "kl")
    return metric_values(metric, r, clean_logp, getattr(task, "class_a", None)).sum()


def prefix_cache(model, kv: dict, cut: int):
    """A frozen TransformerLens key/value cache of the first ``cut`` positions from the keys and
    values a whole-sequence pass recorded (``kv[layer] = (k, v)``, as the attention caches them:
    projected, before the rotary embedding), so later runs compute positions ``cut:`` only."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    n = kv[0][0].shape[0]
    entries = [TransformerLensKeyValueCacheEntry(kv[layer][0][:, :cut], kv[layer][1][:, :cut], frozen=True)
               for layer in range(model.cfg.n_layers)]
    mask = torch.ones(n, cut, dtype=torch.int, device=kv[0][0].device)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def forward_final(model, tokens, hooks, cache):
    """Final residuals ``[n, T', d]`` of ``tokens`` (positions after the cached prefix, if any)."""
    extra = {} if cache is None else {"past_kv_cache": cache, "attention_mask": torch.ones_like(tokens)}
    return model.run_with_hooks(tokens, stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks, **extra)


def run_metric(model, tokens, task, rows, metric, clean_logp, cache=None) -> tuple[float, dict]:
    """Metric sum and the sender hooks' activations (:func:`sender_hooks`) of one run without
    gradients (``tokens`` after ``cache``'s prefix)."""
    names = set(sender_hooks(model))
    store: dict = {}

    def keep(act, hook):
        store[hook.name] = act

    with torch.no_grad():              # the senders need no per-head input copies (no edge mode)
        final = forward_final(model, tokens, [(n, keep) for n in names], cache)
        value = float(metric_sum(model, task, rows, metric, final, clean_logp))
        return value, store


def clean_log_probs(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        final = model(tokens, stop_at_layer=model.cfg.n_layers)
        full = model.unembed(model.ln_final(final[:, -1:]))[:, 0]
        return torch.log_softmax(full, dim=-1)


def grad_pass(model, tokens, task, rows, metric, n_total: int, clean_logp, input_value=None,
               drop: int | None = None, patterns: bool = False, senders: bool = False, cache=None,
               record_kv: bool = False) -> dict:
    """One forward + backward (edge mode) of ``Σ metric / n_total``: gradients at every receiver
    input (``q``, ``k``, ``v`` ``[n, T, heads, d]``, ``mlp`` ``[n, T, d]`` per layer, ``logits``),
    and optionally attention patterns and their gradients, resid_pre per layer, sender outputs
    and (``record_kv``) every layer's keys and values for :func:`prefix_cache`."""
    n_layers = model.cfg.n_layers
    store: dict = {}
    keep_grad = {}
    for layer in range(n_layers):
        for kind, name in (("q", "hook_q_input"), ("k", "hook_k_input"), ("v", "hook_v_input"),
                           ("mlp", "hook_mlp_in")):
            keep_grad[f"blocks.{layer}.{name}"] = (kind, layer)
        if patterns:
            keep_grad[f"blocks.{layer}.attn.hook_pattern"] = ("pattern", layer)
    keep_grad[f"blocks.{n_layers - 1}.hook_resid_post"] = ("logits", n_layers - 1)

    def grab(act, hook):
        act.retain_grad()
        store[keep_grad[hook.name]] = act
        return act

    def leaf(act, hook):
        x = (input_value if input_value is not None else act).detach().clone().requires_grad_(True)
        store["input"] = x
        return x

    def keep(act, hook):
        store[hook.name] = act.detach()

    def dropper(act, hook):
        return DropGrad.apply(act)

    def kv(act, hook):
        store[("kv", hook.layer(), hook.name.endswith("hook_k"))] = act.detach()

    hooks = [("blocks.0.hook_resid_pre", leaf)] + [(n, grab) for n in keep_grad]
    if senders:
        hooks += [(n, keep) for n in sender_hooks(model) if n != "blocks.0.hook_resid_pre"]
    if patterns:
        hooks += [(f"blocks.{k}.hook_resid_pre", keep) for k in range(1, n_layers)]
    if drop is not None:
        hooks += [(f"blocks.{drop}.hook_attn_out", dropper), (f"blocks.{drop}.hook_mlp_out", dropper)]
    if record_kv:
        hooks += [(f"blocks.{k}.attn.hook_{x}", kv) for k in range(n_layers) for x in ("k", "v")]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), edge_mode(model):
            final = forward_final(model, tokens, hooks, cache)
            value = metric_sum(model, task, rows, metric, final, clean_logp)
            (value / n_total).backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    out = {"value": float(value.detach()), "grads": {}, "acts": {}}
    if record_kv:
        out["kv"] = {k: (store.pop(("kv", k, True)), store.pop(("kv", k, False))) for k in range(n_layers)}
    for key, act in store.items():
        if isinstance(key, tuple):
            g = act.grad if act.grad is not None else torch.zeros_like(act)
            out["grads"][key] = g.detach()
            if key[0] == "pattern":
                out["acts"][key] = act.detach()
    if patterns:
        out["acts"]["resid_pre"] = {0: store["input"].detach(),
                                    **{k: store[f"blocks.{k}.hook_resid_pre"] for k in range(1, n_layers)}}
    if senders:
        out["senders"] = {"blocks.0.hook_resid_pre": store["input"].detach(),
                          **{k: v for k, v in store.items() if isinstance(k, str) and k != "input"}}
    return out


@torch.no_grad()
def linear_scores(graph: EdgeGraph, flat: torch.Tensor, grads: dict, keep: int) -> np.ndarray:
    """``Δ_u · g_v`` summed over prompts and positions for every edge: ``[n_edges]`` (float64).
    ``flat`` holds the senders' ``Δ_u`` as rows ``[S, N·keep·d]`` (:func:`delta_rows`: the last
    ``keep`` positions). Earlier positions are skipped: the clean and corrupt prompts agree
    there, so every sender's ``Δ_u`` is zero (causal attention)."""
    out = []
    h = graph.n_heads
    width = flat.shape[1]

    def copy_rows(g, into):  # g[:, -keep:] as rows: [N, T, H, d] -> [H, N·keep·d], [N, T, d] -> [1, ...]
        g = g[:, -keep:]
        g = g.permute(2, 0, 1, 3) if g.ndim == 4 else g[None]
        into.view(g.shape).copy_(g)                  # the only copy of the gradients

    kinds = ("q", "k", "v", "mlp")
    sizes = [grads[(kind, 0)].shape[2] if grads[(kind, 0)].ndim == 4 else 1 for kind in kinds]
    buf = torch.empty(sum(sizes), width, dtype=flat.dtype, device=flat.device)
    for layer in range(graph.n_layers):
        up = 1 + layer * (h + 1)
        at = 0
        for kind, k in zip(kinds, sizes, strict=True):
            copy_rows(grads[(kind, layer)], buf[at:at + k])
            at += k
        # one product per layer; the senders of a receiver are a prefix of the rows
        prod = buf @ flat[:up + h].T
        at = 0
        for k in sizes[:3]:                          # q, k, v receivers read the senders below the layer
            out.append(prod[at:at + k, :up].reshape(-1))                                 # [H, up] -> h-major
            at += k
        out.append(prod[at])                         # the MLP also reads its own layer's heads
    last = torch.empty(1, width, dtype=flat.dtype, device=flat.device)
    copy_rows(grads[("logits", graph.n_layers - 1)], last)
    out.append((last @ flat.T).reshape(-1))
    return torch.cat(out).double().cpu().numpy()
