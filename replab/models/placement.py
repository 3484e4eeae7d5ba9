"""Where a model runs: dtype and device defaults, multi-GPU placement, automatic batch sizes.

* :func:`model_options` sets process-wide defaults for :func:`replab.load_model`'s ``dtype``,
  ``device`` and ``n_devices`` (the CLI's ``--dtype``/``--device``/``--n-devices`` set them once
  per command, so every library call that loads a model honours them). An explicit argument to
  ``load_model`` always wins. ``$REPLAB_DTYPE``, ``$REPLAB_DEVICE`` and ``$REPLAB_N_DEVICES``
  give the starting defaults (used by ``bench/gpu.sh`` to run the other benchmarks).
* ``device=None`` means CUDA when it is available, else CPU.
* ``n_devices > 1`` splits the blocks over ``cuda:0..n-1`` in contiguous runs, exactly the
  block -> device rule TransformerLens's forward uses (:func:`block_devices`); the embedding
  sits with the first block, the final norm and unembedding with the last.
* :func:`auto_batch_size` picks a batch size that fits the device's memory.
"""

from __future__ import annotations

import contextlib
import os

import torch

from replab.errors import ReplabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Process defaults: $REPLAB_DTYPE / $REPLAB_DEVICE / $REPLAB_N_DEVICES when set (benchmarks and
# scripts), else None; model_options() and explicit load_model() arguments take precedence.
_OPTIONS: dict = {"dtype": os.environ.get("REPLAB_DTYPE") or None,
                  "device": os.environ.get("REPLAB_DEVICE") or None,
                  "n_devices": int(os.environ["REPLAB_N_DEVICES"]) if os.environ.get("REPLAB_N_DEVICES") else None}


@contextlib.contextmanager
def model_options(dtype=None, device=None, n_devices=None):
    """Defaults for every :func:`replab.load_model` call inside the block (None: unchanged).

    >>> with model_options(dtype="bfloat16", device="cuda"):     # doctest: +SKIP
    ...     run_sweep("next_day", site="z", by="layer,head")
    """
    if dtype is not None:
        resolve_dtype(dtype)               # fail early on a typo
    old = dict(_OPTIONS)
    for key, value in (("dtype", dtype), ("device", device), ("n_devices", n_devices)):
        if value is not None:
            _OPTIONS[key] = value
    try:
        yield dict(_OPTIONS)
    finally:
        _OPTIONS.clear()
        _OPTIONS.update(old)


def current_options() -> dict:
    """The defaults set by :func:`model_options` (None where unset)."""
    return dict(_OPTIONS)


def resolve_dtype(dtype) -> torch.dtype:
    """``None``/``"float32"``/``"bfloat16"``/``"float16"``/a torch dtype -> torch dtype."""
    if dtype is None:
        dtype = _OPTIONS["dtype"] or "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ReplabError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ReplabError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device) -> str:
    """``None`` -> ``"cuda"`` when available, else ``"cpu"``; checks a requested CUDA device."""
    if device is None:
        device = _OPTIONS["device"]
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ReplabError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ReplabError(f"device {device!r} requested but no CUDA device is available")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ReplabError(f"device {device!r} requested but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible")
    return device


def block_devices(n_layers: int, n_devices: int, device: str = "cuda") -> list[str]:
    """The device of each block when ``n_layers`` blocks are split over ``n_devices``.

    Block ``i`` goes to ``device`` index ``first + (i * n_devices) // n_layers``: the rule
    TransformerLens's forward applies to the residual stream (``get_device_for_block_index``),
    so each block's weights sit where its input arrives. CPU stays CPU.
    """
    if n_devices < 1:
        raise ReplabError("n_devices must be at least 1")
    dev = torch.device(device)
    if dev.type == "cpu" or n_devices == 1:
        return [str(dev)] * n_layers
    first = dev.index or 0
    return [f"{dev.type}:{first + (i * n_devices) // n_layers}" for i in range(n_layers)]


def check_placement(n_devices: int, device: str) -> None:
    """A one-line ReplabError unless ``n_devices`` devices from ``device`` are available."""
    if n_devices < 1:
        raise ReplabError("n_devices must be at least 1")
    if n_devices > 1:
        if not device.startswith("cuda"):
            raise ReplabError("n_devices > 1 needs CUDA devices (device='cuda')")
        need = (torch.device(device).index or 0) + n_devices
        if torch.cuda.device_count() < need:
            raise ReplabError(f"n_devices={n_devices} needs {need} CUDA devices; "
                              f"{torch.cuda.device_count()} are visible")


def place(model, n_devices: int, device: str) -> None:
    """Move ``model``'s modules to their devices (:func:`block_devices`) and set its config.

    TransformerLens 3.9's own ``move_model_modules_to_device`` puts every module on the one
    device with the most free memory, so replab places the blocks itself.
    """
    check_placement(n_devices, device)
    plan = block_devices(model.cfg.n_layers, n_devices, device)
    model.cfg.device = device if n_devices == 1 else plan[0]
    model.cfg.n_devices = n_devices
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        if hasattr(model, name):
            getattr(model, name).to(plan[0])
    for block, dev in zip(model.blocks, plan, strict=True):
        block.to(dev)
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(plan[-1])


DEFAULT_CPU_BATCH = 32     # CPU throughput stops improving well before memory runs out


def device_memory(device: str) -> int:
    """Total memory of ``device`` in bytes (a CUDA device's capacity; for CPU the machine's
    ``MemTotal``). Total, not free: the batch size must not change between a run and its
    resumption."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemTotal", 8 << 30)
    except OSError:
        return 8 << 30


def bytes_per_token(cfg, keep_layers: int | None = None) -> int:
    """A generous estimate of activation memory per token in one forward (no autograd):
    every hook-sized tensor of a block, kept for ``keep_layers`` blocks (all when None), plus
    the logits row."""
    size = torch.finfo(cfg.dtype).bits // 8
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    per_block = (8 * cfg.d_model + 3 * d_mlp + 4 * cfg.n_heads * cfg.d_head) * size
    layers = cfg.n_layers if keep_layers is None else keep_layers
    return per_block * max(1, layers) + 4 * cfg.d_vocab


def auto_batch_size(model, seq_len: int, fraction: float = 0.5, keep_layers: int | None = None,
                    cap: int = 1024) -> int:
    """Prompts per forward for sequences of up to ``seq_len`` tokens.

    On CUDA: ``fraction`` of the device's memory left after the weights, divided by the
    per-prompt estimate (:func:`bytes_per_token` × ``seq_len`` + attention scores
    ``n_heads × seq_len²``), rounded down to a power of two in ``[1, cap]``. On CPU: 32 (more
    does not raise throughput), fewer only if memory is that short. Deterministic for a given
    model, device and ``seq_len``. Every command's ``--batch-size`` overrides it.
    """
    cfg = model.cfg
    device = str(cfg.device)
    size = torch.finfo(cfg.dtype).bits // 8
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_prompt = seq_len * bytes_per_token(cfg, keep_layers) + 2 * cfg.n_heads * seq_len ** 2 * size
    budget = fraction * max(device_memory(device) - weights, 0)
    fits = int(budget // max(per_prompt, 1))
    if torch.device(device).type != "cuda":
        fits = min(fits, DEFAULT_CPU_BATCH)
    fits = max(1, min(cap, fits))
    return 1 << (fits.bit_length() - 1)
