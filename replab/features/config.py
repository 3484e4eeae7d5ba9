"""Options of the feature-level runs, as validated dataclasses (like ``ProbeConfig`` and
``SAETrainConfig``): one per experiment, and one per command that holds it.

=========================  ==============================================  ===========================
experiment (library call)  its options                                     command (run directory)
=========================  ==============================================  ===========================
``patch_direction``        :class:`DirectionPatchConfig`                   :class:`DirectionRunConfig`
``scan_layers``            :class:`ScanConfig`                             :class:`ScanRunConfig`
``patch_latents``          :class:`LatentPatchConfig`                      :class:`LatentRunConfig`
=========================  ==============================================  ===========================

A command's config adds what the command loads (the task: :class:`TaskOptions`; the
direction, probe run or SAE) and holds the experiment's config as ``patch`` / ``scan``. Its
``to_dict()`` is the ``config`` of the run's ``summary.json``. Every config is checked when
it is made (``__post_init__``: ReplabError with the CLI option's name), so a bad option fails
before a model is loaded. :func:`with_overrides` lets the library calls keep their keyword
form (``patch_direction(model, task, d, n_random=20)``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

from replab.errors import ReplabError
from replab.hooks import canonical_site, hook_name
from replab.patching.catalog import load_task
from replab.patching.metrics import check_metric

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from replab.features.direction_inputs import DirectionInput
    from replab.patching.task import PatchTask

DEFAULT_ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)   # in gap units (DEFAULT_ALPHA_UNIT)
DEFAULT_ALPHA_UNIT = "gap"
ALPHA_UNITS = ("gap", "raw")
#: sites whose activation lives in the residual basis (a direction of d_model dims applies there)
DIRECTION_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
MIN_FULL = 0.5   # the scan's default eligibility floor (:func:`replab.features.scan.choose_layer`)

C = TypeVar("C")


def with_overrides(cls: type[C], config: C | None, overrides: dict) -> C:
    """``config`` with ``overrides`` applied (validated again), or ``cls(**overrides)``."""
    if config is None:
        return cls(**overrides)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, not {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


def build_run_config(cls: type[C], config: C | None, options: dict) -> C:
    """A command's config (:class:`DirectionRunConfig`, ...): ``config`` with ``options``
    applied, or ``cls(**options)``. An option that is not a field of ``cls`` sets a field of
    its experiment config (``cls.EXPERIMENT``: ``patch`` or ``scan``), so the run calls take
    the same keywords as the CLI (``run_direction_patch("runs/probe", cls="artist", n_random=20)``)."""
    own = {f.name for f in dataclasses.fields(cls)}
    run_kw = {k: v for k, v in options.items() if k in own}
    inner_kw = {k: v for k, v in options.items() if k not in own}
    inner_cls = cls.__dataclass_fields__[cls.EXPERIMENT].default_factory
    if config is None:
        inner = run_kw.pop(cls.EXPERIMENT, None)
        return cls(**run_kw, **{cls.EXPERIMENT: with_overrides(inner_cls, inner, inner_kw)})
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, not {type(config).__name__}")
    if not options:
        return config
    inner = with_overrides(inner_cls, run_kw.pop(cls.EXPERIMENT, getattr(config, cls.EXPERIMENT)), inner_kw)
    return dataclasses.replace(config, **run_kw, **{cls.EXPERIMENT: inner})


def _path_text(value) -> str | None:
    """A path-like option as JSON text (None stays None; an array is recorded as ``"array"``)."""
    if value is None:
        return None
    return str(value) if isinstance(value, (str, os.PathLike)) else "array"


def check_direction_site(site: str) -> str:
    """The canonical site name; ReplabError unless a direction of ``d_model`` dims applies there."""

    site, _ = canonical_site(site)
    if site not in DIRECTION_SITES:
        raise ReplabError(f"direction patching works on d_model sites (resid_*, attn_out, mlp_out), not {site}")
    return site


def parse_alphas(spec) -> tuple[float, ...]:
    """``"-8,-4,0,4,8"`` or a sequence -> floats (ReplabError on a bad list); None: the default."""
    if spec is None:
        return DEFAULT_ALPHAS
    if isinstance(spec, str):
        try:
            return tuple(float(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ReplabError(f"bad --alphas {spec!r}; use numbers separated by commas, e.g. -8,-4,0,4,8") from None
    return tuple(float(x) for x in spec)


def _positions(value):
    """A position rule (text) stays text; a sequence of positions becomes a tuple of ints."""
    if value is None or isinstance(value, str):
        return value
    return tuple(int(p) for p in value)


def _check_metric(metric: str | None) -> None:
    if metric is not None:

        check_metric(metric)


def _check_counts(**counts) -> None:
    for name, (value, low) in counts.items():
        if int(value) < low:
            raise ReplabError(f"{name} must be at least {low}, got {value}")


def config_dict(config) -> dict:
    """A config's fields as JSON-ready values: nested configs as dicts, tuples as lists, and
    ``cls`` recorded as ``class``."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = value.to_dict()
        elif isinstance(value, tuple):
            value = list(value)
        out["class" if f.name == "cls" else f.name] = value
    return out


@dataclass
class TaskOptions:
    """The task a command patches: ``load_task(task, ...)`` of :mod:`replab.patching.catalog`.

    Attributes:
        task: ``superclass`` (with ``classes`` ``"artist,scientist"``), another builtin task
            (``next_day``, ...), a prompt set or a file with ``corrupt_prompt``.
        classes: super-classes ``"A,B"`` (clean, corrupt) of the superclass task.
        pairs: at most this many prompt pairs.
        template: keep one template.
        dataset: a prompt file to build the task from (superset schema for ``superclass``).
    """

    task: str = "superclass"
    classes: str | None = None
    pairs: int = 64
    template: str | None = None
    dataset: str | None = None

    def __post_init__(self):
        if int(self.pairs) < 1:
            raise ReplabError(f"the number of prompts (--limit, --pairs) must be at least 1, not {self.pairs}")
        self.dataset = None if self.dataset is None else str(self.dataset)

    def load_task(self, model: HookedTransformer) -> PatchTask:
        """The :class:`~replab.patching.task.PatchTask` on ``model``'s tokenizer."""

        return load_task(self.task, model.tokenizer, self.template, self.pairs,
                         bool(model.cfg.default_prepend_bos), self.classes, self.dataset)

    def to_dict(self) -> dict:
        return config_dict(self)


@dataclass
class DirectionPatchConfig:
    """Options of :func:`replab.features.direction_patch.patch_direction`.

    Attributes:
        site, layer: where to patch (default: the direction's own hook and layer).
        positions: a position rule of the task (``entity_last``, ``last``, ``all``, ``"3,4"``) or
            a sequence of positions; default the direction's own rule, ``last`` for a raw vector.
        metric: any patching metric; default the task's (``class_mass`` for superclass), else
            ``logit_diff``.
        n_random: random subspaces of the same rank for the denoising baseline (at least 1);
            ``n_random_ablate`` / ``n_random_steer``: random baselines of ablation / steering.
        alphas, alpha_unit: steering adds ``α · unit · direction``; ``unit`` is the mean
            clean-minus-corrupt projection onto the direction (``gap``) or 1 (``raw``).
        random_tol: tolerance of the random-mean check (default
            :data:`replab.features.verdict.RANDOM_MEAN_TOL`).
        seed: random directions and bootstrap; n_boot: bootstrap resamples; max_tokens: batch
            size of the engine, in tokens.
    """

    site: str | None = None
    layer: int | None = None
    positions: str | tuple[int, ...] | None = None
    metric: str | None = None
    n_random: int = 100
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    n_random_ablate: int = 10
    n_random_steer: int = 5
    alpha_unit: str = DEFAULT_ALPHA_UNIT
    random_tol: float | None = None
    seed: int = 0
    n_boot: int = 1000
    max_tokens: int = 65536

    def __post_init__(self):
        if self.site is not None:
            self.site = check_direction_site(self.site)
        self.layer = None if self.layer is None else int(self.layer)
        self.positions = _positions(self.positions)
        _check_metric(self.metric)
        if int(self.n_random) < 1:
            raise ReplabError("--random must be at least 1")
        _check_counts(n_random_ablate=(self.n_random_ablate, 0), n_random_steer=(self.n_random_steer, 0),
                      n_boot=(self.n_boot, 1), max_tokens=(self.max_tokens, 1))
        self.alphas = parse_alphas(self.alphas)
        if self.alpha_unit not in ALPHA_UNITS:
            raise ReplabError(f"unknown alpha unit {self.alpha_unit!r} (raw or gap)")
        if self.random_tol is not None and not self.random_tol >= 0:
            raise ReplabError(f"--random-tol must be >= 0, got {self.random_tol}")

    def to_dict(self) -> dict:
        return config_dict(self)


@dataclass(frozen=True)
class DirectionSetup:
    """A :class:`DirectionPatchConfig` resolved against a model, a task and a direction
    (:func:`replab.features.direction_patch.resolve_setup`): what is patched where.

    ``positions`` is None for every position; ``position_rule`` the rule they came from
    (None when given as numbers); ``shuffled_source`` says where the shuffled-label baseline
    came from (None without one).
    """

    direction: DirectionInput
    task: PatchTask
    site: str
    layer: int
    positions: tuple[int, ...] | None
    position_rule: str | None
    metric: str
    config: DirectionPatchConfig
    shuffled_source: str | None = None

    @property
    def hook(self) -> str:

        return hook_name(self.site, self.layer)

    @property
    def position_label(self) -> str:
        """``"5:' Picasso'"`` per patched position (``all`` for every position)."""
        if self.positions is None:
            return "all"
        toks = self.task.str_tokens
        return ",".join(f"{p}:{toks[p]!r}" if toks else str(p) for p in self.positions)


@dataclass(kw_only=True)
class DirectionRunConfig(TaskOptions):
    """``replab features patch``: the direction to load, the task (:class:`TaskOptions`), the
    baselines' sources, and the experiment's options (``patch``).

    Attributes:
        direction: a Direction/probe artifact, a raw ``.npy``/``.safetensors`` vector, a probe
            run directory or an activation store (:func:`~replab.features.direction_inputs.load_direction`).
        cls: class of a probe/store direction (``artist``, or ``artist-scientist``).
        label: label column of a store/probe.
        layer: a layer number or a ``features scan`` run directory (its chosen layer);
            default the direction's own. Overrides ``patch.layer``.
        kind: the probe of a probe run directory (``logistic`` | ``meandiff``).
        shuffled: the shuffled-label baseline's source (a direction file or a store);
            default the probe run's shuffled-label probe, else the direction's own store.
        store: the store LEACE is fitted on (default the direction's own); leace: fit it.
    """

    EXPERIMENT: ClassVar[str] = "patch"

    direction: str
    cls: str | None = None
    label: str = "superclass"
    layer: int | str | None = None
    kind: str = "logistic"
    shuffled: str | None = None
    store: str | None = None
    leace: bool = True
    patch: DirectionPatchConfig = field(default_factory=DirectionPatchConfig)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.patch, DirectionPatchConfig):
            raise TypeError("patch must be a DirectionPatchConfig")
        if isinstance(self.direction, os.PathLike):
            self.direction = str(self.direction)
        for name in ("layer", "shuffled", "store"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, str(value))
        if isinstance(self.layer, str) and self.layer.strip().lstrip("-").isdigit():
            self.layer = int(self.layer)   # a layer number given as text (the CLI)

    def to_dict(self) -> dict:
        return {**config_dict(self), "direction": _path_text(self.direction)}


@dataclass
class ScanConfig:
    """Options of :func:`replab.features.scan.scan_layers`.

    Attributes:
        kind: the probe of the run (``logistic`` | ``meandiff``); cls: the class whose
            direction is patched (default: the task's clean class).
        positions: a position rule of the task (default: the probe's own, e.g. ``entity_last``).
        layers: the layers to scan: a list or a spec (``"0-23"``; default every probe layer).
        metric: default the task's, else ``logit_diff``.
        n_random: random directions per layer (0: none); min_full: a layer is eligible when
            its full-residual patch restores at least this much (in (0, 1]).
        seed, n_boot, max_tokens: as in :class:`DirectionPatchConfig`.
    """

    kind: str = "logistic"
    cls: str | None = None
    positions: str | None = None
    layers: str | tuple[int, ...] | None = None
    metric: str | None = None
    n_random: int = 0
    min_full: float = MIN_FULL
    seed: int = 0
    n_boot: int = 1000
    max_tokens: int = 65536

    def __post_init__(self):
        if int(self.n_random) < 0 or not 0 < float(self.min_full) <= 1:
            raise ReplabError("--random must be >= 0 and --min-full in (0, 1]")
        _check_metric(self.metric)
        _check_counts(n_boot=(self.n_boot, 1), max_tokens=(self.max_tokens, 1))
        if self.layers is not None and not isinstance(self.layers, str):
            self.layers = tuple(int(x) for x in self.layers)

    def to_dict(self) -> dict:
        return config_dict(self)


@dataclass(kw_only=True)
class ScanRunConfig(TaskOptions):
    """``replab features scan``: the probe run directory, the task and the scan's options."""

    EXPERIMENT: ClassVar[str] = "scan"

    probe: str
    scan: ScanConfig = field(default_factory=ScanConfig)

    def __post_init__(self):
        super().__post_init__()
        self.probe = str(self.probe)
        if not isinstance(self.scan, ScanConfig):
            raise TypeError("scan must be a ScanConfig")


@dataclass
class LatentPatchConfig:
    """Options of :func:`replab.features.latent_patch.patch_latents`.

    Attributes:
        latents: the latent ids to patch (default: the ``top`` by attribution).
        positions: the patched positions, a list or a rule of the task (``entity_last``, ``all``,
            ``"3,4"``); None: every position.
        metric: any patching metric; default the task's (``class_mass`` for superclass), else
            ``logit_diff``. n_random: random same-size sets of active latents.
        seed, n_boot: random sets and bootstrap.
    """

    latents: tuple[int, ...] | None = None
    top: int = 5
    positions: str | tuple[int, ...] | None = None
    metric: str | None = None
    n_random: int = 100
    seed: int = 0
    n_boot: int = 1000

    def __post_init__(self):
        if int(self.top) < 1 or int(self.n_random) < 0:
            raise ReplabError("--top must be at least 1 and --random at least 0")
        if isinstance(self.latents, str):   # the CLI's "12,345" ("" = none given)
            self.latents = parse_ints(self.latents) or None
        self.latents = None if self.latents is None else tuple(int(i) for i in self.latents)
        self.positions = _positions(self.positions)
        _check_metric(self.metric)
        _check_counts(n_boot=(self.n_boot, 1))

    def to_dict(self) -> dict:
        return config_dict(self)


@dataclass(kw_only=True)
class LatentRunConfig(TaskOptions):
    """``replab sae patch``: the SAE (a directory, else the cached one at ``hook``/``layer``),
    where the latents come from (``patch.latents``, else the top ``patch.top`` of a ``sae
    decompose`` run ``from_dir``, else by attribution), the task and the experiment's options
    (``patch``; for a command its positions default to the task's ``entity_last`` when it has
    one, else every position)."""

    EXPERIMENT: ClassVar[str] = "patch"

    sae: str | None = None
    layer: int | None = None
    hook: str = "resid_post"
    from_dir: str | None = None
    patch: LatentPatchConfig = field(default_factory=LatentPatchConfig)

    def __post_init__(self):
        super().__post_init__()
        self.sae = None if self.sae is None else str(self.sae)
        self.from_dir = None if self.from_dir is None else str(self.from_dir)
        if not isinstance(self.patch, LatentPatchConfig):
            raise TypeError("patch must be a LatentPatchConfig")


def parse_ints(spec) -> tuple[int, ...] | None:
    """``"12,34"`` -> ``(12, 34)`` (ReplabError on a bad list; None stays None)."""
    if spec is None:
        return None
    try:
        return tuple(int(x) for x in str(spec).split(",") if x.strip())
    except ValueError:
        raise ReplabError(f"bad list {spec!r}; use integers separated by commas") from None
