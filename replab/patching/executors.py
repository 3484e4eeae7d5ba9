"""Where the experiment loop's patched forwards run: this process, or Ray actors.

:func:`~replab.patching.plan.run_plan` takes ``engine=``: ``"local"`` (the default), ``"ray"``
or an engine object from :func:`make_engine` (``make_engine("ray", workers=4,
address="auto")``). Every caller of ``run_plan`` (sweeps, the layer scan, direction and
latent patching, pruning, exact edges) gets the Ray engine by passing that one argument.

The Ray engine changes *where* the variants' forwards run, nothing else:

* the driver validates the variants, computes the clean and corrupt forwards exactly as the
  local engine does (:func:`~replab.patching.engine.needed_hooks`,
  :func:`~replab.patching.engine.cache_forwards`, in
  :func:`~replab.patching.edge_patch.edge_mode` for edge plans) and puts them in Ray's object
  store once per plan;
* it splits the plan into **the local engine's own chunks**
  (:func:`~replab.patching.engine.variant_chunks`: variants sharing a first patched position,
  sorted by entry layer, bounded by ``max_tokens`` and, for edge plans, ``edge_memory``); each
  chunk is one job, shipped as plain data (each intervention's ``to_dict()``: site, layer,
  head, positions, source, scale, direction, seed; edge patches' senders and receiver; the
  recorded hooks; never a closure); labels stay on the driver;
* each worker (a Ray actor that loaded the model once, checked against the driver's weights)
  fetches and caches the forwards once per plan and runs the chunk with the same
  :func:`~replab.patching.engine.run_chunk` the local engine calls, so every block call sees
  the same batch as it would locally;
* the driver puts every variant's final residual (and recordings) back in plan order;
  metrics, normalised effects, bootstrap CIs and checks are then computed on the driver by
  ``run_plan`` as always.

So the result equals the local engine's **bit for bit** (``tests/test_distributed.py``
compares every array, CIs included). The parallelism is across chunks: a layer × position
sweep has a chunk per position at least, while a plan that fits one chunk (e.g. one pruning
step on a small prompt set) runs on one worker. ``RayEngine(split="variants")`` deals the
variants round-robin to every worker instead (parallel for any plan); the batches then differ
from the local engine's, so bit-for-bit equality is no longer guaranteed (values agree to float
rounding; on the tiny model on this CPU they were still identical). Seeded
sources (``resample``: a derangement from the intervention's ``seed``; ``noise``: a generator
seeded from it) depend only on the intervention, never on its place in the plan.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import torch

from replab.distributed import ModelWorker, check_engine, crash_point, model_spec, require_ray, start_pool
from replab.errors import ReplabError
from replab.patching.edge_patch import EdgePatch, edge_mode
from replab.patching.engine import (
    ForwardCache,
    Variant,
    check_plan,
    complete_records,
    plan_chunks,
    run_chunk,
    run_variants,
)
from replab.patching.interventions import Intervention


class LocalEngine:
    """Runs :func:`~replab.patching.engine.run_variants` in this process."""

    name = "local"

    def run_variants(self, model, clean, corrupt, variants, **kw):
        """``([V, N, d_model] finals, forwards)``; see :func:`~replab.patching.engine.run_variants`."""
        return run_variants(model, clean, corrupt, variants, **kw)

    def describe(self) -> dict:
        return {"engine": "local"}

    def close(self) -> None:
        """Nothing to stop."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def variant_to_dict(v: Variant) -> dict:
    """The data a worker needs to run ``v``: its interventions (edge patches tagged), forced
    entry layer and recorded hooks (labels stay on the driver)."""
    return {"interventions": [{"edge": iv.to_dict()} if isinstance(iv, EdgePatch) else iv.to_dict()
                              for iv in v.interventions],
            "start": v.start, "record": list(v.record)}


def variant_from_dict(d: dict) -> Variant:
    """The inverse of :func:`variant_to_dict` (without the labels)."""
    ivs = tuple(EdgePatch.from_dict(x["edge"]) if "edge" in x else Intervention.from_dict(x)
                for x in d["interventions"])
    return Variant(ivs, start=d["start"], record=tuple(d.get("record", ())))


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
            any plan); the batches differ from the local engine's, so values are equal only
            where a row's value does not depend on the rest of its batch (measured here on
            the tiny model's sweeps, CPU: no difference at all; not guaranteed elsewhere, e.g.
            on GPUs); the test holds them to 1e-5.

    The actors live as long as this object (or until :meth:`close`), so a caller that runs
    many plans on one model (pruning, edge patching) loads the model on each worker once.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None,
                 cpus_per_worker: float | None = None, split: str = "chunks"):
        check_engine("ray", workers, address)
        if split not in ("chunks", "variants"):
            raise ReplabError(f"split must be 'chunks' or 'variants', not {split!r}")
        self.workers, self.address, self.cpus_per_worker, self.split = workers, address, cpus_per_worker, split
        self._pool = None
        self._pool_key = None
        self._shipped = None          # (clean cache, corrupt cache, key, ObjectRef)

    # ----------------------------------------------------------------- actors
    def _actors(self, model):
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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- the loop
    def run_variants(self, model, clean: torch.Tensor, corrupt: torch.Tensor, variants: list[Variant],
                     base: str = "corrupt", forwards: dict | None = None, max_tokens: int = 65536,
                     use_prefix: bool | None = None, progress=None, sources: dict | None = None,
                     recorded: dict | None = None, vectorise: bool = True,
                     edge_memory: int = 2 ** 26) -> tuple[torch.Tensor, dict]:
        """What :func:`~replab.patching.engine.run_variants` returns (same arguments), computed
        on the actors; ``recorded`` is filled as the local engine fills it."""
        variants = list(variants)
        n = clean.shape[0]
        split = check_plan(model, clean, variants, base)
        with edge_mode(model, split):
            forwards, noops, chunks = plan_chunks(model, clean, corrupt, variants, base, forwards, max_tokens,
                                                  use_prefix, split, edge_memory, sources)
        final = forwards[base].final
        finals = torch.empty(len(variants), n, model.cfg.d_model, dtype=final.dtype, device=final.device)
        for vi in noops:
            finals[vi] = final
        if progress is not None and noops:
            progress(len(noops))
        raw: dict[int, dict] = {}
        first_pos: dict[int, int] = {}
        if chunks:
            first_pos = self._run_chunks(model, chunks, variants, forwards, base, n, clean, corrupt, split,
                                         vectorise, max_tokens, edge_memory, finals, raw, progress)
        if recorded is not None:
            complete_records(variants, raw, first_pos, forwards, base, recorded)
        return finals, forwards

    def _run_chunks(self, model, chunks, variants, forwards, base, n, clean, corrupt, split, vectorise,
                    max_tokens, edge_memory, finals, raw, progress) -> dict[int, int]:
        """Run ``chunks`` on the pool into ``finals`` and ``raw``; returns the first computed
        position of each recording (0 where the worker completed it)."""
        import ray

        pool = self._actors(model)
        key, ref = self._ship(forwards)
        src_ref = ray.put(_to_cpu(forwards["custom"]))
        opts = {"split": split, "vectorise": vectorise}
        if self.split == "variants":
            todo = [vi for _, part in chunks for vi, _ in part]
            k = min(len(pool), len(todo))
            pieces = [todo[i::k] for i in range(k)]
            jobs = [(key, [ref], base, n, [src_ref], None, opts,
                     [(i, variant_to_dict(variants[i])) for i in piece],
                     (clean.cpu(), corrupt.cpu(), max_tokens, edge_memory)) for piece in pieces]
        else:
            n_layers = model.cfg.n_layers
            t = clean.shape[1]
            cost = [sum(n_layers - v.start_layer(n_layers) for _, v in part) * (t - p) for p, part in chunks]
            order = sorted(range(len(chunks)), key=lambda c: -cost[c])     # biggest first: a shorter tail
            pieces = [[vi for vi, _ in chunks[c][1]] for c in order]
            jobs = [(key, [ref], base, n, [src_ref], chunks[c][0], opts,
                     [(vi, variant_to_dict(v)) for vi, v in chunks[c][1]]) for c in order]
        on_done = (lambda i, result: progress(len(pieces[i]))) if progress is not None else None
        device = finals.device
        for piece, (out, rec) in zip(pieces, pool.map("run_job", jobs, on_done=on_done), strict=True):
            finals[piece] = out.to(device)
            for vi, hooks in rec.items():
                raw[vi] = {h: v.to(device) for h, v in hooks.items()}
        return {} if self.split == "variants" else {vi: p for p, part in chunks for vi, _ in part}

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


def _to_cpu(sources: dict) -> dict:
    """``custom:`` sources (tensors, or dicts of tensors per hook) on the CPU."""
    return {k: ({h: x.detach().cpu() for h, x in v.items()} if isinstance(v, dict) else v.detach().cpu())
            for k, v in sources.items()}


def _to_device(sources: dict, device) -> dict:
    return {k: ({h: x.to(device) for h, x in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in sources.items()}


class PatchWorker(ModelWorker):
    """A Ray actor holding one model; runs pieces of plans (see :class:`RayEngine`)."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.device = next(self.model.parameters()).device
        self._key, self._forwards = None, None

    def run_job(self, key: str, forwards_ref: list, base: str, n_prompts: int, sources_ref: list,
                p: int | None, opts: dict, members: list, piece: tuple | None = None) -> tuple:
        """``(finals [V_job, N, d_model], {index: {hook: raw recording}})`` on the CPU for the
        job's variants (``members``: ``[(index, variant dict)]``): one chunk of
        :func:`~replab.patching.engine.variant_chunks` starting at position ``p``, run exactly as
        the local engine runs it, or (``p is None``) a piece of variants run with
        :func:`~replab.patching.engine.run_variants` (``piece = (clean, corrupt, max_tokens,
        edge_memory)``; recordings then come back complete)."""
        import ray

        if key != self._key:                 # the plan's clean/corrupt forwards, fetched once
            plain = ray.get(forwards_ref[0])
            self._forwards = {run: _cache_from(plain[run], self.device) for run in ("clean", "corrupt")}
            self._key = key
        sources = _to_device(ray.get(sources_ref[0]), self.device)
        part = [(vi, variant_from_dict(d)) for vi, d in members]
        if p is None:
            clean, corrupt, max_tokens, edge_memory = piece
            recorded: dict = {}
            finals, _ = run_variants(self.model, clean.to(self.device), corrupt.to(self.device),
                                     [v for _, v in part], base=base, forwards=self._forwards,
                                     max_tokens=max_tokens, sources=sources, recorded=recorded,
                                     vectorise=opts["vectorise"], edge_memory=edge_memory)
            rec = {part[j][0]: {h: x.cpu() for h, x in r.items()} for j, r in recorded.items()}
            crash_point()
            return finals.cpu(), rec
        raw: dict = {}
        with edge_mode(self.model, opts["split"]):
            out = run_chunk(self.model, part, {**self._forwards, "custom": sources}, base, p, n_prompts, raw,
                            opts["vectorise"])
        rec = {vi: {h: x.cpu() for h, x in r.items()} for vi, r in raw.items()}
        crash_point()                        # tests: a worker dies after computing its chunk
        return torch.stack([out[vi] for vi, _ in part]).cpu(), rec


def make_engine(engine="local", workers: int | None = None, address: str | None = None,
                cpus_per_worker: float | None = None):
    """An engine for :func:`~replab.patching.plan.run_plan` from what a command line gives.

    ``engine``: ``"local"``, ``"ray"``, or an engine object (returned as it is). ``"ray"`` with
    a new :class:`RayEngine`: its actors start with its first plan and live until its
    :meth:`~RayEngine.close` (or the end of a ``with`` block), so a caller running many plans on
    one model passes the same engine object to each and loads the model on every worker once.
    :func:`~replab.patching.plan.run_plan` given the string ``"ray"`` makes one for that plan and
    closes it. Without Ray installed, ``"ray"`` is a one-line ReplabError saying what to install.
    """
    if not isinstance(engine, str) and engine is not None:
        if not hasattr(engine, "run_variants"):
            raise ReplabError(f"engine {engine!r} has no run_variants method")
        return engine
    if check_engine(engine or "local", workers, address) == "local":
        return LocalEngine()
    return RayEngine(workers=workers, address=address, cpus_per_worker=cpus_per_worker)


@contextmanager
def engine_scope(engine="local", workers: int | None = None, address: str | None = None,
                 cpus_per_worker: float | None = None):
    """``with engine_scope("ray", workers=2) as eng:`` an engine for several
    :func:`~replab.patching.plan.run_plan` calls (its workers load the model once), closed on
    exit when it was made here; an engine object passed in is yielded as it is and left open."""
    runner = make_engine(engine, workers=workers, address=address, cpus_per_worker=cpus_per_worker)
    try:
        yield runner
    finally:
        if runner is not engine:
            runner.close()
