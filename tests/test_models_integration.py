"""SmolLM2 (the real default model, shared cache): parity with Hugging Face recorded on every
load, in float32 and bfloat16, and shown by ``replab models info``."""

from __future__ import annotations

import json

import pytest
from replab_testutil import run_cli

pytestmark = pytest.mark.integration


def test_default_model_parity_is_recorded(smol):
    ident = smol.replab_identity
    assert ident.architecture == "LlamaForCausalLM" and len(ident.config_sha256) == 64
    par = ident.parity
    assert par["passed"] and par["dtype"] == "float32" and par["tokens"] >= 16
    # float32: the conversion check and this load's check are both far below the tolerance
    assert par["max_abs_logit_diff"] <= 1e-3 and par["conversion_max_abs_logit_diff"] <= 1e-3
    assert par["reference_max_abs_logit"] > 10         # a real model's logits, not noise
    assert ident.to_dict()["parity"]["conversion_max_abs_logit_diff"] == par["conversion_max_abs_logit_diff"]


def test_models_info_bfloat16(capsys):
    code, out, err = run_cli(["models", "info", "--dtype", "bfloat16", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    par = info["identity"]["parity"]
    assert info["identity"]["dtype"] == "bfloat16" and par["dtype"] == "bfloat16"
    # measured 0.95 on the parity prompt (docs/models.md); the tolerance is 0.1 x max |logit|
    assert 1e-3 < par["max_abs_logit_diff"] <= par["tolerance"]
    assert info["features"]["attention"] == "grouped-query" and info["matrix_tested"]
    assert info["cache_dir"].endswith("tl-v1")
