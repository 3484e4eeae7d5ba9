"""Edge scores with their exact check in the same run (``replab circuit edges``).

:func:`score_edges` scores every edge of the graph with an attribution method
(:mod:`replab.circuits.eap`: ``eap``, ``eap-ig``, ``atp*``), then samples edges (the top
``n_top`` by ``|score|`` and ``n_random`` others, seeded) and patches each of them **exactly**
through the one experiment loop (:func:`replab.patching.plan.run_plan`, base = clean: only that
edge carries the corrupt value): ``exact = (M_patched − M_clean) / (M_clean − M_corrupt)``, with
a bootstrap CI, candidate logits and the engine checks. It reports Spearman and Pearson between
approximate and exact scores and flags edges whose signs differ. ``method="exact"`` patches a
given list of edges exactly and nothing else. Every exact run also checks the edge machinery on
the same batch: all edges patched from the corrupt run must reproduce the corrupt run
(``edges_all_corrupt``) and all edges patched from the clean run must change nothing
(``edges_identity``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from replab.circuits.eap import GRAD_METHODS, IG_RULES, EdgeAttribution, attribute_edges
from replab.circuits.graph import EdgeGraph, edge_graph
from replab.errors import ReplabError
from replab.patching.checks import ENGINE_TOL, Check
from replab.patching.engine import Variant

METHODS = (*GRAD_METHODS, "exact")
#: An exact score this large (in units of the clean−corrupt gap) makes a sign disagreement material.
MATERIAL = 0.01


def check_options(method: str, metric: str, steps: int, edges, exact_ok: bool = True,
                  rule: str = "gauss-legendre") -> str:
    """The canonical method name; ReplabError for a bad method, metric, step count, integration
    rule, or an exact run without edges (checked before any model loads)."""
    from replab.patching.metrics import check_metric

    method = {"atp-star": "atp*", "atpstar": "atp*"}.get(str(method).strip(), str(method).strip())
    allowed = METHODS if exact_ok else GRAD_METHODS
    if method not in allowed:
        raise ReplabError(f"unknown edge method {method!r} (known: {', '.join(allowed)})")
    check_metric(metric)
    if metric == "kl" and method not in ("eap-ig", "exact"):
        raise ReplabError("the kl metric has zero gradient at the clean run; use it with --method eap-ig")
    if steps < 1:
        raise ReplabError(f"--steps must be at least 1, not {steps}")
    if rule not in IG_RULES:
        raise ReplabError(f"unknown integration rule {rule!r} (known: {', '.join(IG_RULES)})")
    if method == "exact" and not (edges and str(edges).strip()):
        raise ReplabError("--method exact patches a chosen list of edges: give --edges (SENDER->RECEIVER,... "
                          "or all)")
    return method


def edge_check_variants(graph: EdgeGraph) -> list[Variant]:
    """Two whole-graph variants that check the edge machinery: every edge from the corrupt run
    (must give the corrupt run) and every edge from the clean run (must give the clean run)."""
    every = np.arange(graph.n_edges)
    return [Variant(graph.patches(every, "corrupt"), name="edges_all_corrupt", group="check"),
            Variant(graph.patches(every, "clean"), name="edges_identity", group="check")]


def edge_checks(res) -> list[Check]:
    """The :func:`edge_check_variants` checks of a PlanResult (base = clean)."""
    return [Check("edges_all_corrupt", float(res.effect[res.index("edges_all_corrupt")]), 0.0, ENGINE_TOL,
                  "every edge patched from the corrupt run reproduces the corrupt run"),
            Check("edges_identity", float(res.effect[res.index("edges_identity")]), 1.0, ENGINE_TOL,
                  "every edge patched from the clean run into the clean run changes nothing")]


def exact_edges(model, task, graph: EdgeGraph, idx, metric: str = "logit_diff", *, progress: bool = False,
                forwards=None, engine="local"):
    """Exact scores of edges ``idx`` in one :func:`~replab.patching.plan.run_plan` call
    (``engine``: where its forwards run, e.g. ``"ray"``; see
    :mod:`replab.patching.executors`; the scores are the local engine's).

    Returns ``(table, plan)``: table rows ``edge_index, edge, exact, exact_ci_low, exact_ci_high,
    answer_logit, foil_logit`` (``exact`` = normalised effect − 1) and the PlanResult (its checks
    include :func:`edge_checks`).
    """
    from replab.patching.plan import run_plan

    idx = np.asarray(idx, dtype=np.int64)
    names = graph.edge_names()
    variants = [Variant(graph.patches([i]), name=names[i], group="edge", info={"edge_index": int(i)})
                for i in idx]
    res = run_plan(model, task, variants + edge_check_variants(graph), metric, base="clean",
                   extra_checks=edge_checks, progress=progress, label="exact edges", unit="edge",
                   forwards=forwards, engine=engine)
    n = len(idx)
    table = pd.DataFrame({"edge_index": idx, "edge": [names[i] for i in idx], "exact": res.effect[:n] - 1,
                          "exact_ci_low": res.ci_low[:n] - 1, "exact_ci_high": res.ci_high[:n] - 1,
                          "answer_logit": res.candidates[:n, :, 0].mean(1),
                          "foil_logit": res.candidates[:n, :, 1].mean(1)})
    return table, res


def sample_edges(scores: np.ndarray, n_top: int = 50, n_random: int = 200, seed: int = 0) -> tuple[np.ndarray, list]:
    """The top ``n_top`` edges by ``|score|`` and ``n_random`` others drawn uniformly (seeded):
    ``(indices, reasons)`` with reasons ``"top"`` / ``"random"``. The random draw is over the
    other edges in graph order, so it does not move when scores change in their last digits
    (another thread count, device or method) unless the top ``n_top`` changes."""
    order = np.argsort(-np.abs(scores), kind="stable")
    top = order[:n_top]
    rest = np.sort(order[n_top:])
    rng = np.random.default_rng(seed)
    rand = np.sort(rng.choice(rest, size=min(n_random, len(rest)), replace=False)) if len(rest) else rest
    return np.concatenate([top, rand]).astype(np.int64), ["top"] * len(top) + ["random"] * len(rand)


def agreement(approx: np.ndarray, exact: np.ndarray, names: list[str]) -> dict:
    """Spearman and Pearson of ``approx`` against ``exact`` and the sign disagreements."""
    from scipy.stats import pearsonr, spearmanr

    approx, exact = np.asarray(approx, float), np.asarray(exact, float)
    out = {"n": int(len(exact))}
    if len(exact) < 3:
        return {**out, "status": f"not run: {len(exact)} edges (at least 3 are needed)"}
    if np.ptp(exact) == 0 or np.ptp(approx) == 0:
        return {**out, "status": "not run: the exact or approximate scores are constant on the sample"}
    flip = (np.sign(approx) != np.sign(exact)) & (approx != 0) & (exact != 0)
    material = flip & (np.abs(exact) >= MATERIAL)
    order = np.argsort(-np.abs(exact[flip]))
    worst = [{"edge": names[i], "approx": float(approx[i]), "exact": float(exact[i])}
             for i in np.flatnonzero(flip)[order][:10]]
    return {**out, "status": "ran", "spearman": float(spearmanr(approx, exact).statistic),
            "pearson": float(pearsonr(approx, exact).statistic),
            "spearman_abs": float(spearmanr(np.abs(approx), np.abs(exact)).statistic),
            "sign_disagreements": int(flip.sum()), "sign_disagreements_material": int(material.sum()),
            "material_threshold": MATERIAL, "worst_sign_disagreements": worst}


@dataclass
class EdgeScores:
    """What :func:`score_edges` measured.

    ``table``: one row per edge (graph order) with the method's ``score`` (plus ``atp``,
    ``atp_star``, ``graddrop`` for ``atp*``), ``rank`` by ``|score|``, and ``exact`` /
    ``exact_ci_low`` / ``exact_ci_high`` / ``sampled`` where it was patched exactly.
    ``verification``: :func:`agreement` of the score (and the side-by-side columns) against exact.
    """

    graph: EdgeGraph
    method: str
    metric: str
    table: pd.DataFrame
    verification: dict
    attribution: EdgeAttribution | None
    plan: dict
    seconds: dict = field(default_factory=dict)

    @property
    def sample(self) -> pd.DataFrame:
        return self.table[self.table["sampled"] != ""].sort_values("rank")

    def summary(self) -> dict:
        top = self.table.nsmallest(20, "rank")
        return {"method": self.method, "metric": self.metric, "graph": self.graph.counts(),
                "attribution": self.attribution.describe() if self.attribution else None,
                "exact": self.plan, "verification": self.verification, "seconds": self.seconds,
                "top_edges": [{"edge": r.edge, "score": float(r.score),
                               "exact": None if pd.isna(r.exact) else float(r.exact)} for r in top.itertuples()]}


def score_edges(model, task, method: str = "eap", *, steps: int = 5, metric: str = "logit_diff",
                rule: str = "gauss-legendre", edges=None, graddrop: bool = True, n_top: int = 50, n_random: int = 200,
                seed: int = 0,
                verify: bool = True, progress: bool = False, attribution: EdgeAttribution | None = None,
                engine="local") -> EdgeScores:
    """Score every edge with ``method`` and verify a sample exactly (module docstring).

    Args:
        method: ``eap``, ``eap-ig``, ``atp*`` or ``exact`` (exact needs ``edges``: names
            ``SENDER->RECEIVER`` or ``"all"``).
        steps: ``eap-ig`` integration steps.
        rule: ``eap-ig``'s integration rule (``riemann``, ``midpoint``, ``gauss-legendre``;
            :func:`~replab.circuits.eap.ig_nodes`).
        edges: with an attribution method, extra edges to patch exactly besides the sample.
        n_top, n_random, seed: the verification sample.
        verify: False skips the exact sample (the summary says the check did not run).
        attribution: a precomputed :class:`~replab.circuits.eap.EdgeAttribution` to reuse.
        engine: where the exact edge patching runs (``"local"``, ``"ray"`` or an engine from
            :func:`~replab.patching.executors.make_engine`); attribution runs in this process.
    Returns:
        :class:`EdgeScores`.
    """
    method = {"atp-star": "atp*", "atpstar": "atp*"}.get(method, method)
    if method not in METHODS:
        raise ReplabError(f"unknown edge method {method!r} (known: {', '.join(METHODS)})")
    graph = edge_graph(model)
    names = graph.edge_names()
    table = graph.table()
    seconds = {}
    chosen = None
    if edges is not None:
        chosen = (np.arange(graph.n_edges) if (isinstance(edges, str) and edges.strip() == "all")
                  else graph.edge_index([e for e in (edges.split(",") if isinstance(edges, str) else edges)
                                         if str(e).strip()]))
    if method == "exact":
        if chosen is None or not len(chosen):
            raise ReplabError("--method exact patches a chosen list of edges: give --edges (SENDER->RECEIVER,... "
                              "or all)")
        att = None
        table["score"] = np.nan
    else:
        att = attribution or attribute_edges(model, task, method, steps=steps, metric=metric, rule=rule,
                                             graddrop=graddrop, progress=progress)
        seconds["attribution"] = round(att.seconds, 3)
        table["score"] = att.scores
        for k, v in att.extra.items():
            if k != "atp_star":
                table[k] = v
    table["sampled"] = ""
    if method == "exact":
        pick, reasons = chosen, ["chosen"] * len(chosen)
    elif verify:
        pick, reasons = sample_edges(att.scores, n_top, n_random, seed)
        if chosen is not None:
            extra = np.setdiff1d(chosen, pick)
            pick, reasons = np.concatenate([pick, extra]), reasons + ["chosen"] * len(extra)
    else:
        pick, reasons = (chosen, ["chosen"] * len(chosen)) if chosen is not None else (np.zeros(0, int), [])
    for c in ("exact", "exact_ci_low", "exact_ci_high"):
        table[c] = np.nan
    plan: dict = {}
    if len(pick):
        t0 = time.time()
        exact, res = exact_edges(model, task, graph, pick, metric, progress=progress, engine=engine)
        seconds["exact"] = round(time.time() - t0, 3)
        for c in ("exact", "exact_ci_low", "exact_ci_high"):
            table.loc[pick, c] = exact[c].to_numpy()
        table.loc[pick, "sampled"] = reasons
        plan = {**res.describe(), "n_edges": int(len(pick))}
    ranking = table["score"] if method != "exact" else table["exact"]
    table["rank"] = ranking.abs().rank(ascending=False, method="first", na_option="bottom").astype(int)
    verification = _verification(method, table, pick, reasons, verify, names)
    return EdgeScores(graph, method, metric, table, verification, att, plan, seconds)


def _verification(method, table, pick, reasons, verify, names) -> dict:
    if method == "exact":
        return {"status": "not applicable: --method exact is the reference itself"}
    if not verify:
        return {"status": "not run: verification was switched off (--no-verify)"}
    sample = table.loc[pick]
    sub = [names[i] for i in pick]
    out = {"sample": {"top": reasons.count("top"), "random": reasons.count("random"),
                      "chosen": reasons.count("chosen")}}
    out["score"] = agreement(sample["score"].to_numpy(), sample["exact"].to_numpy(), sub)
    out["status"] = out["score"]["status"]
    top = np.asarray([r == "top" for r in reasons])
    if top.sum() >= 3:            # the harder question: the order among the strongest edges
        t = agreement(sample["score"].to_numpy()[top], sample["exact"].to_numpy()[top],
                    [n for n, keep in zip(sub, top, strict=True) if keep])
        out["score_top"] = {k: t[k] for k in ("n", "status", "spearman", "pearson") if k in t}
    for col in ("atp", "graddrop"):
        if col in sample:
            out[col] = agreement(sample[col].to_numpy(), sample["exact"].to_numpy(), sub)
    if "atp" in sample:          # the QK fix only changes q and k edges: compare on those alone too
        qk = sample["receiver_kind"].isin(["q", "k"]).to_numpy()
        names_qk = [n for n, keep in zip(sub, qk, strict=True) if keep]
        for col, key in (("score", "score_qk"), ("atp", "atp_qk")):
            c = agreement(sample[col].to_numpy()[qk], sample["exact"].to_numpy()[qk], names_qk)
            out[key] = {k: c[k] for k in ("n", "status", "spearman", "pearson", "sign_disagreements") if k in c}
    if "graddrop" in out and out["graddrop"].get("status") == "ran":   # a magnitude: compare with |exact|
        gd = out["graddrop"]
        gd.update({"spearman": gd["spearman_abs"], "note": "graddrop is a magnitude: spearman is against |exact|"})
        for k in ("pearson", "sign_disagreements", "sign_disagreements_material", "worst_sign_disagreements"):
            gd.pop(k, None)
    return out
