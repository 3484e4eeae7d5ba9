"""The parity check: replab's model against the Hugging Face model, on every load.

At conversion time (once per cache key) the HF model runs a short fixed prompt in float32 and
its logits ``[T, d_vocab]`` are saved next to the converted weights (``parity.safetensors``,
~1.5 MB for a 49k vocabulary). Every :func:`replab.load_model` then runs the same tokens
through the loaded model, in the dtype and on the device it was loaded with, and compares:
one forward of about 16 tokens (a few ms for SmolLM2), so the check costs nothing noticeable
while still catching a wrong conversion, a damaged cache or a dtype that breaks the model.

The result (max |logit difference|, the tolerance, dtype, device) is recorded in
``model.replab_identity.parity``; above the tolerance the load fails with a ReplabError.

Tolerance: ``atol * max(1, max |reference logit|)`` with ``atol`` per dtype (:data:`ATOL`):
float32 differences come only from a different order of float operations (measured ≤ 5e-7
on the tiny architectures, 3e-5 on SmolLM2, whose logits reach about 20); bfloat16 and float16
keep 8 and 11 significant bits, and their measured errors are in docs/models.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from replab.errors import ReplabError

PROMPT = "The capital of France is Paris. Monday, Tuesday, Wednesday, 1, 2, 3, 4"
FILE = "parity.safetensors"
ATOL = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 0.1, "float16": 0.03}


def parity_tokens(tokenizer, prepend_bos: bool, n_ctx: int) -> torch.Tensor:
    """The fixed parity prompt as token ids ``[1, T]`` (T ≤ ``n_ctx``)."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    if prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor([ids[:n_ctx]], dtype=torch.long)


@torch.inference_mode()
def hf_reference(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """The HF model's float32 logits ``[T, d_vocab]`` on ``tokens`` ``[1, T]``."""
    return hf_model(input_ids=tokens).logits[0].float()


def save_reference(folder: Path, tokens: torch.Tensor, logits: torch.Tensor, conversion: dict) -> None:
    """Write ``parity.safetensors`` into ``folder`` (through a temporary file and a rename):
    the tokens, the HF logits, and the float32 conversion check (:func:`measure`) as metadata."""
    import os

    from safetensors.torch import save_file

    meta = {"conversion_max_abs_logit_diff": repr(conversion["max_abs_logit_diff"]),
            "conversion_tolerance": repr(conversion["tolerance"])}
    tmp = Path(folder) / f".{FILE}.tmp{os.getpid()}"
    save_file({"tokens": tokens.contiguous(), "logits": logits.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, Path(folder) / FILE)


def load_reference(folder: Path) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """``(tokens [1, T], logits [T, d_vocab], conversion)`` saved at conversion, or None;
    ``conversion`` has the float32 check's ``conversion_max_abs_logit_diff`` and
    ``conversion_tolerance``."""
    path = Path(folder) / FILE
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tokens, logits = f.get_tensor("tokens"), f.get_tensor("logits")
    return tokens, logits, {k: float(v) for k, v in meta.items() if k.startswith("conversion_")}


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    name = str(dtype).removeprefix("torch.")
    return ATOL.get(name, 0.1) * max(1.0, float(reference.abs().max()))


@torch.inference_mode()
def measure(model, tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    """Run ``tokens`` through ``model``; compare with ``reference`` logits.

    Returns ``{"max_abs_logit_diff", "tolerance", "reference_max_abs_logit", "tokens", "dtype",
    "device", "prompt"}``.
    """
    logits = model(tokens.to(model.cfg.device), return_type="logits")[0].float().cpu()
    if logits.shape != reference.shape:
        raise ReplabError(f"parity check: the model's logits have shape {tuple(logits.shape)}, the "
                          f"reference {tuple(reference.shape)}; delete the cached conversion")
    diff = float((logits - reference).abs().max())
    return {"max_abs_logit_diff": diff, "tolerance": tolerance(model.cfg.dtype, reference),
            "reference_max_abs_logit": float(reference.abs().max()), "tokens": int(tokens.shape[1]),
            "dtype": str(model.cfg.dtype).removeprefix("torch."), "device": str(model.cfg.device),
            "prompt": PROMPT}


def enforce(result: dict, what: str) -> dict:
    """Raise a one-line ReplabError when ``result`` (from :func:`measure`) exceeds its tolerance."""
    if not result["max_abs_logit_diff"] <= result["tolerance"]:   # NaN fails too
        raise ReplabError(
            f"parity check failed for {what}: max |logit difference| from Hugging Face "
            f"{result['max_abs_logit_diff']:.3g} > tolerance {result['tolerance']:.3g} "
            f"({result['dtype']} on {result['device']}); the conversion is wrong for this model")
    return result
