"""Activations for SAEs: hook names, corpus windows, and harvesting one hook's vectors.

Position convention: every corpus window ``[seq_len]`` is run from its first token, and
the first ``skip_first`` positions of each window (default 1) are dropped from training
and from every metric. SmolLM2 prepends no BOS, so position 0 is an ordinary token that
the model uses as an attention sink: its residual norm at layer 15 is ~2.4e4 against
~170 elsewhere. Including it would make the SAE spend its capacity on one outlier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.hooks import SITES, SYNONYMS, stop_at_layer
from replab.prompts.corpus import read_corpus, token_chunks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

#: hook aliases an SAE can be trained on (one vector per position).
SAE_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post")


def sae_hook_name(model: HookedTransformer, hook: str, layer: int | None) -> str:
    """Full TransformerLens hook name for an alias + layer (or a full name), validated."""

    alias = SYNONYMS.get(hook, hook)
    if alias in SITES:
        if alias not in SAE_SITES:
            raise ReplabError(f"SAEs here train on one vector per position; use one of "
                              f"{', '.join(SAE_SITES)}, not {hook!r}")
        if layer is None:
            raise ReplabError(f"hook {hook!r} needs a layer (--layer)")
        n = model.cfg.n_layers
        if not -n <= int(layer) < n:
            raise ReplabError(f"layer {layer} is out of range: this model has layers 0-{n - 1}")
        name = SITES[alias].hook(int(layer) % n)
    else:
        name = hook
    if name not in model.hook_dict:
        raise ReplabError(f"hook {name!r} does not exist on this model")
    if name.endswith(("hook_pattern", "hook_attn_scores", "hook_q", "hook_k", "hook_v", "hook_z")):
        raise ReplabError(f"{name} is not one vector per position; SAEs need resid/mlp/attn_out hooks")
    return name


def stop_layer(model: HookedTransformer, hook_name: str) -> int | None:
    """``stop_at_layer`` that still runs ``hook_name`` (None: the whole model)."""

    return stop_at_layer([hook_name], model.cfg.n_layers)


def corpus_windows(tokenizer, corpus: str, seq_len: int, max_tokens: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Token windows ``LongTensor [n, seq_len]`` of a corpus (``"builtin"``, a file, a dir)."""

    return token_chunks(read_corpus(corpus), tokenizer, seq_len, max_tokens, seed=seed)


@torch.no_grad()
def hook_acts(model: HookedTransformer, hook_name: str, tokens: torch.Tensor) -> torch.Tensor:
    """Activations ``[batch, pos, d]`` of ``hook_name`` on ``tokens [batch, pos]``.

    Runs only the blocks up to the hook (``stop_at_layer``), no unembedding.
    """
    box = {}

    def grab(act, hook):  # noqa: ARG001 - TransformerLens hook signature
        box["x"] = act.detach()
        return act

    model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[(hook_name, grab)],
                         stop_at_layer=stop_layer(model, hook_name), return_type=None)
    if "x" not in box:
        raise ReplabError(f"hook {hook_name} did not fire")
    return box["x"]


def harvest_acts(model: HookedTransformer, hook_name: str, windows: torch.Tensor, skip_first: int = 1,
                 batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Stack the hook's vectors over ``windows [n, seq_len]``, positions ``>= skip_first``.

    Returns:
        ``FloatTensor [n * (seq_len - skip_first), d]`` on CPU, window-major order.
    """

    n, seq_len = windows.shape
    out = None
    per = seq_len - skip_first
    with progress_bar(windows.numel(), "harvest activations", "tok", enabled=progress) as bar:
        for s in range(0, n, batch_size):
            part = windows[s:s + batch_size]
            x = hook_acts(model, hook_name, part)[:, skip_first:].float().cpu()
            if out is None:
                out = torch.empty(n * per, x.shape[-1], dtype=torch.float32)
            out[s * per:(s + len(part)) * per] = x.reshape(-1, x.shape[-1])
            bar.advance(part.numel())
    return out
