"""The feature runs' config dataclasses (replab.features.config) and the typed direction summary:
validation, the keyword form of the library calls, and the summary.json keys."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from replab.errors import ReplabError
from replab.features.config import (
    DirectionPatchConfig,
    DirectionRunConfig,
    LatentPatchConfig,
    LatentRunConfig,
    ScanConfig,
    ScanRunConfig,
    build_run_config,
)

#: the keys of a direction-patching summary (docs/features.md, "Output"); summary.json adds the
#: run's own: kind, separation, leace_fit, notes, config, files, model, replab_version
SUMMARY_KEYS = {
    "effect", "ci_low", "ci_high", "of_full", "of_full_low", "of_full_high", "full_residual_effect", "full_ci_low",
    "full_ci_high", "random_mean", "random_sd", "random_p95", "random_max", "n_random", "percentile",
    "complement_effect", "complement_of_full", "shuffled_effect", "shuffled_of_full", "shuffled_percentile",
    "ablation", "noising", "leace", "site", "layer", "hook", "positions", "position_rule", "position_label", "metric",
    "clean_metric", "corrupt_metric", "steering", "projection", "checks", "task", "direction", "n_variants",
    "seconds", "bootstrap", "shuffled_source", "random_mean_ok", "verdict", "verdict_detail"}


@pytest.mark.parametrize("kw, match", [
    ({"n_random": 0}, "--random must be at least 1"),
    ({"alphas": "1,x"}, "bad --alphas"),
    ({"alpha_unit": "nats"}, "unknown alpha unit"),
    ({"site": "z"}, "d_model sites"),
    ({"site": "resid"}, "ambiguous"),
    ({"metric": "accuracy"}, "unknown metric"),
    ({"n_random_ablate": -1}, "n_random_ablate must be at least 0"),
    ({"random_tol": -0.1}, "--random-tol must be >= 0"),
])
def test_direction_patch_config_rejects_bad_options(kw, match):
    with pytest.raises(ReplabError, match=match):
        DirectionPatchConfig(**kw)


def test_configs_normalise_and_record_what_was_asked():
    cfg = DirectionPatchConfig(site="blocks.3.hook_resid_post", alphas="-1,0,2", positions=[4, 5])
    assert cfg.site == "resid_post" and cfg.alphas == (-1.0, 0.0, 2.0) and cfg.positions == (4, 5)
    assert cfg.to_dict()["alphas"] == [-1.0, 0.0, 2.0] and cfg.to_dict()["positions"] == [4, 5]
    run = DirectionRunConfig(direction="runs/probe", cls="artist", layer="12", patch=cfg)
    d = run.to_dict()
    assert d["layer"] == 12 and d["class"] == "artist" and d["patch"] == cfg.to_dict() and d["task"] == "superclass"
    assert DirectionRunConfig(direction="x", layer="runs/scan").layer == "runs/scan"
    # keywords go to the run config, or to its experiment config when the run has no such field
    built = build_run_config(DirectionRunConfig, None, {"direction": "x", "layer": 3, "n_random": 7, "seed": 2})
    assert built.layer == 3 and built.patch.layer is None and (built.patch.n_random, built.patch.seed) == (7, 2)
    again = build_run_config(DirectionRunConfig, built, {"n_random": 9, "classes": "artist,writer"})
    assert again.patch.n_random == 9 and again.patch.seed == 2 and again.classes == "artist,writer"
    assert built.patch.n_random == 7   # the given config is not modified
    with pytest.raises(TypeError):
        build_run_config(DirectionRunConfig, None, {"direction": "x", "n_randum": 3})
    with pytest.raises(ReplabError, match="--random must be >= 0 and --min-full"):
        ScanConfig(min_full=0)
    scan = ScanRunConfig(probe="runs/probe", scan=ScanConfig(cls="artist", layers=[3, 1]))
    assert scan.to_dict()["scan"]["class"] == "artist" and scan.scan.layers == (3, 1)
    with pytest.raises(ReplabError, match="--top must be at least 1"):
        LatentPatchConfig(top=0)
    with pytest.raises(ReplabError, match="bad list"):
        LatentPatchConfig(latents="1,b")
    lat = LatentRunConfig(layer=20, patch=LatentPatchConfig(latents="12,3"))
    assert lat.patch.latents == (12, 3) and LatentPatchConfig(latents="").latents is None
    assert lat.to_dict()["patch"]["latents"] == [12, 3]
    with pytest.raises(ReplabError, match="at least 1"):
        DirectionRunConfig(direction="x", pairs=0)


def test_config_and_keywords_give_the_same_run(tiny):
    """``patch_direction(model, task, d, config)`` = the keyword form; the summary is a typed
    dataclass whose ``to_dict()`` has exactly the documented keys."""
    from replab.features.direction_inputs import DirectionInput
    from replab.features.direction_patch import patch_direction
    from replab.features.verdict import DirectionSummary
    from replab.patching import load_task

    task = load_task("next_day", tiny.tokenizer, limit=4)
    d = DirectionInput(np.random.default_rng(0).normal(size=tiny.cfg.d_model), site="resid_pre", layer=1)
    kw = dict(metric="logit_diff", n_random=8, n_random_ablate=2, n_random_steer=1, alphas=(0.0, 1.0), n_boot=50,
              random_tol=1.0)
    a = patch_direction(tiny, task, d, **kw)
    cfg = DirectionPatchConfig(**kw)
    b = patch_direction(tiny, task, d, cfg)
    c = patch_direction(tiny, task, d, dataclasses.replace(cfg, n_random=3), n_random=8)
    assert isinstance(a.summary, DirectionSummary) and set(a.summary.to_dict()) == SUMMARY_KEYS
    for res in (b, c):
        x, y = a.summary.to_dict(), res.summary.to_dict()
        x.pop("seconds"), y.pop("seconds")
        assert x == y
        assert a.effects.equals(res.effects)
    with pytest.raises(TypeError):
        patch_direction(tiny, task, d, {"n_random": 3})
