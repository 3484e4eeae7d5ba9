"""Decompose a direction (e.g. a probe's "artistness" Direction) onto SAE latents.

For a unit direction ``v [d]`` and the SAE's effective decoder rows ``d_i``
(:func:`replab.features.sae.splice.decoder_rows`):

* ``cosine_i = cos(d_i, v)`` — for every latent;
* with an activation store and a label: ``mean_pos_i`` / ``mean_neg_i`` = the mean latent
  activation over rows of the positive class / of every other labelled row (the rows a probe
  uses: :func:`replab.probes.splits.select_rows` drops control people and odd-one-out
  prompts, whose labels do not describe the person at the stored position),
  ``diff_i = mean_pos_i - mean_neg_i`` (the class difference attributed to latent ``i``)
  and ``contribution_i = diff_i * (d_i . v)``: latent ``i``'s share of the class-mean
  difference projected on ``v``. ``sum_i contribution_i`` equals the projection of the
  reconstructed class-mean difference; ``summary["reconstructed_fraction"]`` compares it
  with the raw activations' projected difference.
* top latents: by ``|contribution|`` when a store is given, else by ``|cosine|``; each with
  its top-activating store rows (prompt with ``«token»``) and logit effects (``d_i @ W_U``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.features.sae.artifact import load_sae, model_for
from replab.features.sae.latents import encode_store, logit_effects, top_examples
from replab.features.sae.splice import decoder_rows
from replab.hooks import SITES, parse_hook_name
from replab.models import load_tokenizer
from replab.probes.directions import Direction
from replab.probes.splits import select_rows
from replab.store.select import as_store

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def read_direction(direction) -> tuple[np.ndarray, dict]:
    """``(unit vector [d], provenance dict)`` from a Direction, a path or an array.

    Paths: a replab Direction (``.json`` or ``.safetensors`` with its ``.json`` sibling), a
    raw ``.npy`` vector, or a ``.safetensors`` file holding one tensor (or a ``direction``
    tensor). Provenance has ``hook``, ``layer``, ``label``, ``positive_class`` when known.
    """

    if isinstance(direction, Direction):
        d = direction
        return d.vector, {"hook": d.hook, "layer": d.layer, "label": d.label,
                          "positive_class": d.positive_class, "kind": d.kind}
    if isinstance(direction, (str, os.PathLike)):
        path = Path(direction)
        base = path.with_suffix("")
        if path.suffix in (".json", ".safetensors") and Path(str(base) + ".json").exists():
            return read_direction(Direction.load(path))
        if not path.exists():
            raise ReplabError(f"direction file {path} does not exist")
        if path.suffix == ".npy":
            vec = np.load(path, allow_pickle=False)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if "direction" in tensors:
                vec = tensors["direction"]
            elif len(tensors) == 1:
                vec = next(iter(tensors.values()))
            else:
                raise ReplabError(f"{path} holds {len(tensors)} tensors; name one 'direction'")
        else:
            raise ReplabError(f"direction {path}: use a Direction .json, a .npy or a .safetensors file")
        return _unit(vec, str(path)), {"source": str(path)}
    return _unit(direction, "direction"), {}


def _unit(vec, what: str) -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32)
    if v.ndim != 1 and not (v.ndim == 2 and 1 in v.shape):
        raise ReplabError(f"{what}: need one vector, got shape {v.shape}")
    v = v.reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise ReplabError(f"{what}: the vector is zero or not finite")
    return v / norm


def _check_site(prov: dict, meta: dict) -> None:
    hook = prov.get("hook")
    if hook is None:
        return

    want = meta["hook_name"]
    name = SITES[hook].hook(prov.get("layer")) if hook in SITES else hook
    if name != want:
        alias, layer = parse_hook_name(want)
        raise ReplabError(f"the direction lives at {name} but the SAE reads {want}; use an SAE "
                          f"trained at that site (replab sae train --layer {prov.get('layer')}"
                          f" --hook {hook}) or a direction from layer {layer}")


def decompose_direction(sae_dir, direction, store=None, label: str | None = None,
                        positive_class: str | None = None, top: int = 10, n_examples: int = 5,
                        n_tokens: int = 10, model: HookedTransformer | str | None = None,
                        where: str | None = None) -> dict:
    """Decompose ``direction`` onto the latents of the SAE at ``sae_dir``.

    Args:
        sae_dir: an SAE directory (:func:`replab.features.sae.train_sae`).
        direction: a replab Direction (object or path), a ``.npy`` / ``.safetensors``
            vector, or an array ``[d_in]``.
        store: an activation store (or its path) holding the SAE's hook; enables the class
            attribution and top-activating examples.
        label, positive_class: the label column and class (default: the Direction's).
        top: how many top latents to report; ``n_examples`` store rows and ``n_tokens``
            logit-effect tokens (each side) per top latent.
        model: the SAE's model (loaded from the SAE's metadata when None).
        where: optional pandas query restricting the store rows used.

    Returns:
        ``{"cosine", "attribution" (None without store), "top", "examples", "logits":
        DataFrames, "summary": dict}``. ``top`` has ``latent, rank, cosine, mean_pos,
        mean_neg, diff, contribution, store_frequency, top_tokens, bottom_tokens`` (logit
        effects) and, with a store, ``example_tokens`` (tokens of the top-activating rows).
    """

    sae, meta = load_sae(sae_dir)
    vec, prov = read_direction(direction)
    if vec.shape[0] != int(sae.cfg.d_in):
        raise ReplabError(f"direction has {vec.shape[0]} dimensions but the SAE reads {sae.cfg.d_in}")
    _check_site(prov, meta)
    rows = decoder_rows(sae).cpu().numpy()
    dots = rows @ vec
    cos = dots / np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
    cosine = pd.DataFrame({"latent": np.arange(len(cos)), "cosine": cos, "abs_cosine": np.abs(cos),
                           "dot": dots})
    cosine["rank"] = cosine["abs_cosine"].rank(ascending=False, method="first").astype(int) - 1
    summary = {"sae": str(sae_dir), "hook_name": meta["hook_name"], "direction": prov,
               "d_sae": int(sae.cfg.d_sae), "max_abs_cosine": float(np.abs(cos).max())}
    attribution, enc, st = None, None, None
    label = label or prov.get("label")
    positive_class = positive_class or prov.get("positive_class")
    if store is not None:
        attribution, enc, st, extra = _attribute(sae, meta, store, label, positive_class, where, dots,
                                                 vec, max(n_examples, 1))
        summary.update(extra)
    if attribution is not None:
        order = attribution.reindex(attribution["contribution"].abs().sort_values(ascending=False).index)
    else:
        order = cosine.sort_values("abs_cosine", ascending=False)
    chosen = [int(i) for i in order["latent"].head(top)]
    model = model_for(meta, model)
    logits = logit_effects(sae, model, chosen, n_tokens)
    table = cosine.set_index("latent").loc[chosen, ["cosine"]].reset_index()
    table.insert(1, "rank", range(len(chosen)))
    if attribution is not None:
        cols = ["mean_pos", "mean_neg", "diff", "contribution", "store_frequency"]
        table = table.merge(attribution[["latent", *cols]], on="latent", how="left")
    for side in ("top", "bottom"):
        part = logits[logits["side"] == side]
        joined = part.groupby("latent")["token"].apply(lambda t: " | ".join(map(repr, t)))
        table[f"{side}_tokens"] = table["latent"].map(joined)
    examples = pd.DataFrame()
    if enc is not None:

        tok = _store_tokenizer(st, load_tokenizer)
        examples = top_examples(enc, st.index, chosen, tok,
                                bool(st.manifest["config"].get("prepend_bos", False)),
                                extra_columns=[c for c in (label,) if c])
        examples = examples.groupby("latent", group_keys=False).head(n_examples)
        words = examples.groupby("latent")["token"].apply(
            lambda t: " | ".join(dict.fromkeys(str(x).strip() for x in t)))
        table["example_tokens"] = table["latent"].map(words)
    summary["top_latents"] = chosen
    return {"cosine": cosine, "attribution": attribution, "top": table, "examples": examples,
            "logits": logits, "summary": summary}


def _store_tokenizer(store, load_tokenizer):
    name = store.model.get("name")
    try:
        return load_tokenizer(name)
    except Exception:  # noqa: BLE001 - no tokenizer: examples keep the raw prompt
        return None


def _attribute(sae, meta, store, label, positive_class, where, dots, vec, top_n):

    st = as_store(store)
    hook = meta["hook_name"]
    if hook not in st.hooks:
        raise ReplabError(f"the store has no {hook}; harvest it with --hooks {hook}")
    if st.model.get("weights_sha256") != meta["model"].get("weights_sha256"):
        raise ReplabError("the store was harvested from a different model than the SAE was trained on")
    index = st.index
    keep = np.ones(len(index), dtype=bool)
    if where:
        try:
            keep &= index.eval(where).to_numpy(dtype=bool)
        except Exception as exc:  # noqa: BLE001 - any query error is user input
            raise ReplabError(f"bad --where query {where!r}: {exc}") from None
    groups, extra = {"all": keep}, {"store": str(st.path), "rows": int(keep.sum())}
    if label is not None:
        if label not in index.columns:
            raise ReplabError(f"label {label!r} is not a column of the store index; "
                              f"columns: {', '.join(index.columns)}")

        y = index[label].astype(str).to_numpy()
        rows, dropped = select_rows(index, label)    # the probes' filter: no controls, no odd-one-out
        probe_rows = np.zeros(len(index), dtype=bool)
        probe_rows[rows] = True
        labelled = keep & probe_rows & (y != "None")
        extra["attribution_filter"] = dropped
        if positive_class is None:
            raise ReplabError("give --class (the positive class) for the attribution")
        pos = labelled & (y == str(positive_class))
        neg = labelled & (y != str(positive_class))
        if not pos.any() or not neg.any():
            raise ReplabError(f"class {positive_class!r} of {label!r} needs rows on both sides; "
                              f"values: {', '.join(sorted(set(y[labelled]))[:12])}")
        groups.update(pos=pos, neg=neg)
        extra.update(label=label, positive_class=str(positive_class), n_pos=int(pos.sum()),
                     n_neg=int(neg.sum()))
    acts = st.acts(hook)
    enc = encode_store(sae, acts, groups, top_n=top_n, keep=keep)
    att = None
    if label is not None:
        mpos = enc["sums"]["pos"] / enc["counts"]["pos"]
        mneg = enc["sums"]["neg"] / enc["counts"]["neg"]
        diff = mpos - mneg
        att = pd.DataFrame({"latent": np.arange(len(diff)), "mean_pos": mpos, "mean_neg": mneg,
                            "diff": diff, "contribution": diff * dots,
                            "store_frequency": enc["freq"]})
        raw = (np.asarray(acts[np.where(groups["pos"])[0]], dtype=np.float64).mean(0)
               - np.asarray(acts[np.where(groups["neg"])[0]], dtype=np.float64).mean(0)) @ vec
        extra.update(projected_class_difference=float(raw),
                     latent_contribution_sum=float(att["contribution"].sum()),
                     reconstructed_fraction=float(att["contribution"].sum() / raw) if raw else None)
    return att, enc, st, extra

