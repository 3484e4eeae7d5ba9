"""Where the experiment loop's patched forwards run: this process, or Ray actors.

:func:`~replab.patching.plan.run_plan` takes ``engine=``: ``"local"`` (the default), ``"ray"``
or an engine object from :func:`make_engine` (``make_engine("ray", workers=4,
address="auto")``). Every caller of ``run_plan`` (sweeps, the layer scan, direction and
latent patching, pruning, exact edges) gets the Ray engine by passing that one argument.

The Ray engine changes *where* the variants' forwards run, nothing else:

* the driver validates the variants, computes the clean and corrupt forwards exactly as the
  local engine does (:func:`~replab.patching.engine.needed_hooks`,
  :func:`~replab.patching.engine.cache_forwards`) and puts them in Ray's object store once;
* the variants are dealt round-robin into one piece per worker and shipped as plain data
  (each intervention's ``to_dict()``: site, layer, head, positions, source, scale, direction,
  seed; never a closure); labels stay on the driver;
* each worker (a Ray actor that loaded the model once, checked against the driver's weights)
  fetches and caches the forwards once per plan and runs the same
  :func:`~replab.patching.engine.run_variants` on its piece;
* the driver puts every variant's final residual back in plan order; metrics, normalised
  effects, bootstrap CIs and checks are then computed on the driver by ``run_plan`` as
  always.

Seeded sources (``resample``: a derangement from the intervention's ``seed``; ``noise``: a
generator seeded from it) depend only on the intervention, never on its place in the plan,
so splitting the plan changes no value. The result equals the local engine's bit for bit
where a variant's rows do not depend on what else shares their batch (true of the CPU
kernels here: ``tests/test_ray.py`` compares every array, CIs included).
"""

from __future__ import annotations

import uuid

import torch

from replab.distributed import ModelWorker
from replab.errors import ReplabError
from replab.patching.engine import (
    ForwardCache,
    Variant,
    cache_forwards,
    needed_hooks,
    prefix_ok,
    run_chunk,
    run_variants,
    variant_chunks,
)
from replab.patching.interventions import Intervention, validate


class LocalEngine:
    """Runs :func:`~replab.patching.engine.run_variants` in this process."""

    name = "local"

    def run_variants(self, model, clean, corrupt, variants, **kw):
        """``([V, N, d_model] finals, forwards)``; see :func:`~replab.patching.engine.run_variants`."""
        return run_variants(model, clean, corrupt, variants, **kw)

    def describe(self) -> dict:
        return {"engine": "local"}


def variant_to_dict(v: Variant) -> dict:
    """The data a worker needs to run ``v``: its interventions and forced entry layer (labels stay)."""
    return {"interventions": [iv.to_dict() for iv in v.interventions], "start": v.start}


def variant_from_dict(d: dict) -> Variant:
    return Variant(tuple(Intervention.from_dict(x) for x in d["interventions"]), start=d["start"])


def _plain_forwards(forwards: dict) -> dict:
    """The clean/corrupt caches as plain CPU tensors (what travels through the object store)."""
    return {run: {"acts": {k: v.detach().cpu() for k, v in forwards[run].acts.items()},
                  "final": forwards[run].final.detach().cpu()} for run in ("clean", "corrupt")}


def _cache_from(plain: dict, device) -> ForwardCache:
    cache = ForwardCache.__new__(ForwardCache)
    cache.acts = {k: v.to(device) for k, v in plain["acts"].items()}
    cache.final = plain["final"].to(device)
    return cache


class RayEngine:
    """Runs the variants of a plan on Ray actors (module docstring).

    Args:
        workers: actors (default: what the cluster holds; :func:`replab.distributed.start_pool`).
        address: the Ray cluster (:func:`replab.distributed.connect`).
        cpus_per_worker: Ray CPUs of each actor (default: the driver's torch threads, which
            every worker uses).
        split: ``"chunks"`` (default): the local engine's own batched chunks
            (:func:`~replab.patching.engine.variant_chunks`) are the jobs, so every number is
            bit-identical to the local engine's; parallel across chunks (e.g. the positions of
            a layer × position sweep), so a plan that fits one chunk runs on one worker.
            ``"variants"``: the variants are dealt round-robin to every worker (parallel for
            any plan); the batches differ from the local engine's, so values agree to float
            rounding (about 1e-6 here), not bit for bit.

    The actors live as long as this object (or until :meth:`close`), so a caller that runs
    many plans on one model (pruning, edge patching) loads the model on each worker once.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None,
                 cpus_per_worker: float | None = None, split: str = "chunks"):
        from replab.distributed import require_ray

        require_ray()
        if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
            raise ReplabError(f"workers must be a positive integer, got {workers!r}")
        if split not in ("chunks", "variants"):
            raise ReplabError(f"split must be 'chunks' or 'variants', not {split!r}")
        self.workers, self.address, self.cpus_per_worker, self.split = workers, address, cpus_per_worker, split
        self._pool = None
        self._pool_key = None
        self._shipped = None          # (clean cache, corrupt cache, key, ObjectRef)

    # ----------------------------------------------------------------- actors
    def _actors(self, model):
        from replab.distributed import model_spec, require_ray, start_pool

        ray = require_ray()
        spec = model_spec(model)

        def key():
            job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
            return spec["digest"], spec["device"], spec["threads"], job

        if self._pool is not None and self._pool_key == key():
            return self._pool
        self.close()
        self._pool = start_pool(PatchWorker, model, self.workers, self.address, self.cpus_per_worker)
        self._pool_key = key()
        return self._pool

    def close(self) -> None:
        """Stop the actors (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.close()
        self._pool, self._pool_key, self._shipped = None, None, None

    def describe(self) -> dict:
        return {"engine": "ray", "workers": len(self._pool) if self._pool is not None else self.workers}

    # -------------------------------------------------------------- the loop
    def run_variants(self, model, clean: torch.Tensor, corrupt: torch.Tensor, variants: list[Variant],
                     base: str = "corrupt", forwards: dict | None = None, max_tokens: int = 65536,
                     progress=None, sources: dict | None = None) -> tuple[torch.Tensor, dict]:
        """What :func:`~replab.patching.engine.run_variants` returns, computed on the actors."""
        import ray

        if base not in ("clean", "corrupt"):
            raise ReplabError(f"base must be 'clean' or 'corrupt', not {base!r}")
        variants = list(variants)
        n, t = clean.shape
        for v in variants:
            for iv in v.interventions:
                validate(model, iv, t)
        use_prefix = prefix_ok(model)
        if forwards is None:
            with torch.inference_mode():
                forwards = cache_forwards(model, clean, corrupt, needed_hooks(model, variants, base, use_prefix))
        forwards = {"clean": forwards["clean"], "corrupt": forwards["corrupt"]}
        final = forwards[base].final
        finals = torch.empty(len(variants), n, model.cfg.d_model, dtype=final.dtype, device=final.device)
        if not variants:
            return finals, forwards
        noops, chunks = variant_chunks(model, clean, corrupt, variants, max_tokens, use_prefix)
        for vi in noops:
            finals[vi] = final
        if progress is not None and noops:
            progress(len(noops))
        if not chunks:
            return finals, forwards
        pool = self._actors(model)
        key, ref = self._ship(forwards)
        src_ref = ray.put({k: v.detach().cpu() for k, v in (sources or {}).items()})
        if self.split == "variants":
            todo = [vi for _, part in chunks for vi, _ in part]
            k = min(len(pool), len(todo))
            pieces = [todo[i::k] for i in range(k)]
            jobs = [(key, [ref], base, n, [src_ref], None, [variant_to_dict(variants[i]) for i in piece],
                     clean.cpu(), corrupt.cpu(), max_tokens) for piece in pieces]
        else:
            n_layers = model.cfg.n_layers
            cost = [sum(n_layers - v.start_layer(n_layers) for _, v in part) * (t - p) for p, part in chunks]
            order = sorted(range(len(chunks)), key=lambda c: -cost[c])     # biggest first: a shorter tail
            pieces = [[vi for vi, _ in chunks[c][1]] for c in order]
            jobs = [(key, [ref], base, n, [src_ref],
                     (chunks[c][0], [(vi, variant_to_dict(v)) for vi, v in chunks[c][1]])) for c in order]
        on_done = (lambda i, result: progress(len(pieces[i]))) if progress is not None else None
        for piece, result in zip(pieces, pool.map("run_job", jobs, on_done=on_done), strict=True):
            finals[piece] = result.to(final.device)
        return finals, forwards

    def _ship(self, forwards: dict):
        """Put the forwards in the object store once per plan (reused while the same caches
        come back, e.g. ``forwards=res.forwards``)."""
        import ray

        shipped = self._shipped
        if shipped is not None and shipped[0] is forwards["clean"] and shipped[1] is forwards["corrupt"]:
            return shipped[2], shipped[3]
        key = uuid.uuid4().hex
        ref = ray.put(_plain_forwards(forwards))
        self._shipped = (forwards["clean"], forwards["corrupt"], key, ref)
        return key, ref


class PatchWorker(ModelWorker):
    """A Ray actor holding one model; runs pieces of plans (see :class:`RayEngine`)."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.device = next(self.model.parameters()).device
        self._key, self._forwards = None, None

    def run_job(self, key: str, forwards_ref: list, base: str, n_prompts: int, sources_ref: list,
                chunk: tuple | None, variants: list[dict] | None = None, clean=None, corrupt=None,
                max_tokens: int = 65536) -> torch.Tensor:
        """Final residuals ``[V_job, N, d_model]`` (CPU): one chunk of
        :func:`~replab.patching.engine.variant_chunks` (``chunk = (p, [(index, variant dict)])``,
        run exactly as the local engine runs it), or a piece of variants (``variants``, run
        with :func:`~replab.patching.engine.run_variants`)."""
        import ray

        if key != self._key:                 # the plan's clean/corrupt forwards, fetched once
            plain = ray.get(forwards_ref[0])
            self._forwards = {run: _cache_from(plain[run], self.device) for run in ("clean", "corrupt")}
            self._key = key
        sources = {k: v.to(self.device) for k, v in ray.get(sources_ref[0]).items()}
        if chunk is None:
            finals, _ = run_variants(self.model, clean.to(self.device), corrupt.to(self.device),
                                     [variant_from_dict(d) for d in variants], base=base, forwards=self._forwards,
                                     max_tokens=max_tokens, sources=sources)
            return finals.cpu()
        p, members = chunk
        part = [(vi, variant_from_dict(d)) for vi, d in members]
        out = run_chunk(self.model, part, {**self._forwards, "custom": sources}, base, p, n_prompts)
        return torch.stack([out[vi] for vi, _ in part]).cpu()


_SHARED: dict = {}


def make_engine(engine="local", workers: int | None = None, address: str | None = None):
    """An engine for :func:`~replab.patching.plan.run_plan` from what a command line gives.

    ``engine``: ``"local"``, ``"ray"``, or an engine object (returned as it is). ``"ray"`` with
    the same ``workers`` and ``address`` returns the same :class:`RayEngine` in a process, so
    repeated plans reuse its actors. Without Ray installed, ``"ray"`` is a one-line
    ReplabError saying what to install.
    """
    if not isinstance(engine, str) and engine is not None:
        if not hasattr(engine, "run_variants"):
            raise ReplabError(f"engine {engine!r} has no run_variants method")
        return engine
    from replab.distributed import check_engine

    name = check_engine(engine or "local")
    if name == "local":
        return LocalEngine()
    key = (workers, address)
    if key not in _SHARED:
        _SHARED[key] = RayEngine(workers=workers, address=address)
    return _SHARED[key]
