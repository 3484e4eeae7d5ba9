"""Features: is a direction or a set of features what the model actually uses?

W3 step 6 (docs/workflows.md). Two halves:

* :mod:`replab.features.sae` — sparse autoencoders with SAELens: train on a hook's
  activations over a text corpus, evaluate (L0, FVU, CE loss recovered, KL, dead and
  dense latents), decompose a probe direction onto latents, and splice an SAE into a
  forward pass (reconstruction + error term) for latent patching.
* direction patching (replace / steer / ablate along a Direction artifact, with random
  and shuffled baselines), the layer scan (where a probe's direction is used), SAE latent
  patching live in sibling modules of this package; their options are the config
  dataclasses of :mod:`replab.features.config`, their people-level bootstrap CIs are
  :mod:`replab.patching.bootstrap`.

Submodules are imported lazily (``import replab.features`` stays cheap).
"""

# Direction patching, the scan and latent patching (lazy: resolved on first attribute access).
_DIRECTION_EXPORTS = {
    "DirectionPatchConfig": "config", "DirectionRunConfig": "config", "ScanConfig": "config",
    "ScanRunConfig": "config", "LatentPatchConfig": "config", "LatentRunConfig": "config",
    "DirectionSummary": "verdict",
    "DirectionInput": "direction_inputs", "load_direction": "direction_inputs",
    "shuffled_direction": "direction_inputs", "fit_leace": "direction_inputs",
    "DirectionPatchResult": "direction_patch", "patch_direction": "direction_patch",
    "run_direction_patch": "direction_run",
    "scan_layers": "scan", "choose_layer": "scan", "run_scan": "scan",
    "patch_latents": "latent_patch", "run_latent_patch": "latent_run",
}


def __getattr__(name):
    if name in _DIRECTION_EXPORTS:
        import importlib

        module = importlib.import_module(f"replab.features.{_DIRECTION_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'replab.features' has no attribute {name!r}")
