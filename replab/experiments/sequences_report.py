"""Headline and narrative of the ``sequences`` experiment (W4), computed from ``summary.json`` only.

Every number goes through :func:`~replab.experiments.report.text` (marked with its key, so the
browser test checks it against the file); sentences branch on the results.
"""

from __future__ import annotations

from markupsafe import Markup

from replab.experiments.report import text
from replab.experiments.sequences_sites import sites_section
from replab.experiments.spec import Section


def headline(results: dict, config: dict) -> dict:
    p, a, h, g, c = (results[k] for k in ("prune", "ablations", "heads", "geometry", "compare"))
    circ = p["circuit"]
    out = {"circuit_threshold": circ["threshold"], "circuit_heads": circ["n_heads"],
           "circuit_performance": circ["performance"], "circuit_kl": circ["kl"],
           "orders_shared_heads": p["shared"]["n_shared"] if p["shared"] else None,
           "harshest_ablation_performance": a["harshest_performance"]}
    if h["best_detector"]:
        out["best_detector_score"] = h["best_detector"]["score"]
    if h["best_next_item"]:
        out["best_next_item_score"] = h["best_next_item"]["score"]
    if g["pairs"]:
        out[f"cosine_max_{g['pairs'][0]['a']}_{g['pairs'][0]['b']}"] = g["pairs"][0]["cosine_max"]
    out.update({"compare_jaccard": c["jaccard"], "compare_a_on_b": c["a_on_b"]})
    return out


def _join(parts: list) -> Markup:
    return Markup(" ").join(parts)


def _prune_section(s: dict) -> Section:
    p = s["stages"]["prune"]
    circ = p["circuit"]
    o = s["config"]["options"]
    paras = [text("Task: {stages.prune.n_prompts} clean/corrupt pairs of {stages.prune.n_tokens} tokens "
                  f"({o['types']}, corruption {o['corruption']}); the "
                  "intact model's logit difference is {stages.prune.clean_metric} on clean prompts and "
                  "{stages.prune.corrupt_metric} on corrupt ones. "
                  f"Heads were removed ({o['ablation']}-ablated) along "
                  "{stages.prune.n_orders} orders (" + ", ".join(p["orders"]) + ") until performance (ablated / "
                  "intact logit difference) fell below each threshold.", s)]
    paras.append(text(
        "{stages.prune.circuit.n_heads} heads keep {stages.prune.circuit.threshold:.0%} of the performance: the "
        f"{circ['order']} order's circuit, re-measured at " "{stages.prune.circuit.performance:.3f} "
        "(KL to the clean run {stages.prune.circuit.kl:.3f} nats).", s))
    same = [lv for lv in p["levels"] if lv["threshold"] == circ["threshold"] and lv["n_heads"]]
    calm = min(same, key=lambda lv: lv["kl"])
    if calm["kl"] < circ["kl"]:
        i = p["levels"].index(calm)
        paras.append(text(
            "Keeping the logit difference is not keeping the output distribution: the "
            f"{calm['order']} order's circuit at the same threshold has {{stages.prune.levels.{i}.n_heads}} heads "
            f"and KL {{stages.prune.levels.{i}.kl:.3f}} nats.", s))
    if p["shared"]:
        sh = p["shared"]
        share = ("they share all of the smaller one's heads" if sh["n_shared"] == min(sh["n_a"], sh["n_b"])
                 else "they share {stages.prune.shared.n_shared} heads" if sh["n_shared"]
                 else "they share no head")
        paras.append(text(f"The {sh['order_a']} and {sh['order_b']} orders give the two smallest circuits at this "
                          "threshold ({stages.prune.shared.n_a} and {stages.prune.shared.n_b} heads); " + share
                          + (": " + ", ".join(sh["heads"]) if 0 < len(sh["heads"]) <= 12 else "") + ".", s))
    if p["n_survive_every_order"]:
        names = p["survive_every_order"]
        paras.append(text("{stages.prune.n_survive_every_order} heads survive in every order's circuit"
                          + (": " + ", ".join(names) if len(names) <= 12 else "") + ".", s))
    else:
        paras.append(text("No head survives in every order's circuit at this threshold: the orders find "
                          "different circuits.", s))
    if p["n_levels_above_intact"]:
        paras.append(text("{stages.prune.n_levels_above_intact} level circuits score above the intact model "
                          "(performance > 1): removing heads raised the logit difference, which is why KL is "
                          "reported next to it.", s))
    paras.append(text("Every level was re-measured in a fresh batched run; the largest difference from the "
                      "search's value is {stages.prune.max_remeasure_diff:.1e}.", s))
    rows = [{k: lv[k] for k in ("order", "threshold", "n_heads", "performance", "kl")} for lv in p["levels"]]
    return Section("Iterative pruning (step 1)", paras, p["figures"], [("Level circuits", rows)], p["command"])


def _ablation_section(s: dict) -> Section:
    a = s["stages"]["ablations"]
    first = a["tests"][0]
    what = ("kept alone (every other head ablated)" if first == "sufficiency" else "removed")
    parts = []
    for i, r in enumerate(a["rows"]):
        if r["test"] != first:
            continue
        k = f"stages.ablations.rows.{i}"
        parts.append(text(f"{r['ablation']}: {{{k}.performance:.3f}} (KL {{{k}.kl:.3f}})", s))
    paras = [_join([text(f"The circuit of {{stages.ablations.n_heads}} heads {what}, performance (ablated / "
                         "intact logit difference) and KL to the clean run by ablation:", s),
                    Markup("; ").join(parts) + "."])]
    paras.append(text(f"The harshest ablation by logit difference is {a['harshest']} "
                      "({stages.ablations.harshest_performance:.3f}); the one that moves the output distribution "
                      f"most is {a['largest_kl']} (KL " "{stages.ablations.largest_kl_value:.3f} nats)"
                      + (", the same one." if a["harshest"] == a["largest_kl"] else
                         ": logit difference and KL rank the ablations differently.") , s))
    if a["n_random_tests"]:
        paras.append(text("Against random head sets of the same size and layer profile, "
                          "{stages.ablations.n_beyond_chance} of {stages.ablations.n_random_tests} tests are "
                          "beyond chance.", s))
    rows = [{k: r[k] for k in ("test", "ablation", "performance", "normalized_effect", "kl", "verdict")}
            for r in a["rows"]]
    return Section("Ablation choices (step 2)", paras, a["figures"], [("Circuit under each ablation", rows)],
                   a["command"])


def _heads_section(s: dict) -> Section:
    h = s["stages"]["heads"]
    paras = []
    b = h["best_detector"]
    if b:
        paras.append(text(
            f"{b['head']} is the circuit's strongest {b['detector']}-token head" if b["detector"] != "induction"
            else f"{b['head']} is the circuit's strongest induction head", s)
            + text(": score {stages.heads.best_detector.score:.3f} (a perfect head scores "
                   "{stages.heads.best_detector.ideal:.3f}; rank {stages.heads.best_detector.rank} of "
                   "{stages.heads.n_heads_model} heads).", s))
    n = h["best_next_item"]
    if n:
        verdict = ("above" if n["score"] > n["chance"] else "not above")
        paras.append(text(f"The best OV next-item score in the circuit is {n['head']}'s on {n['tokens']}: "
                          "{stages.heads.best_next_item.score:.3f} of the items have the next item as the top logit "
                          f"({verdict} chance, " "{stages.heads.best_next_item.chance:.3f}; rank "
                          "{stages.heads.best_next_item.rank} of {stages.heads.n_heads_model} heads"
                          + (", tied with {stages.heads.best_next_item.n_tied} others" if n["n_tied"] else "")
                          + "); its copy score is {stages.heads.best_next_item.copy:.3f}.", s))
    q = h.get("best_previous_item_qk")
    if q:
        verdict = ("above" if q["score"] > q["chance"] else "not above")
        paras.append(text(f"QK circuit on {q['tokens']}: {q['head']}'s query picks the previous item as its "
                          "highest-scoring key for {stages.heads.best_previous_item_qk.score:.3f} of the items "
                          f"({verdict} chance, " "{stages.heads.best_previous_item_qk.chance:.3f}; rank "
                          "{stages.heads.best_previous_item_qk.rank} of {stages.heads.n_heads_model} heads; "
                          "the same item: {stages.heads.best_previous_item_qk.self:.3f}).", s))
    tops = "; ".join(f"{d}: " + ", ".join(x["head"] for x in v) for d, v in h["top_heads"].items())
    paras.append(text(f"Model-wide, the top heads per detector are {tops}.", s))
    if h["patterns"]:
        att = ", ".join(f"{p['head']} → {p['last_attends_to'].split(':', 1)[1]!r}" for p in h["patterns"][:8])
        paras.append(text(f"From the last token of the pattern prompt the circuit heads attend most to: {att}.", s))
    caption = ("Circuit heads" if h["n_rows_shown"] == h["n_heads"] else
               f"The {h['n_rows_shown']} circuit heads (of {h['n_heads']}) with the highest detector scores "
               "relative to a perfect head (all in heads/circuit_heads.parquet)")
    return Section("Head function (step 3)", paras, h["figures"], [(caption, h["circuit_heads"])],
                   h["command"])


def _geometry_section(s: dict) -> Section:
    g = s["stages"]["geometry"]
    paras = [text(f"{{stages.geometry.n_rows}} prompts of {{stages.geometry.n_types}} sequence types, the residual "
                  f"stream at position rule {g['positions']}. Cosines are between class-mean directions relative "
                  "to the grand mean; unrelated classes would score about {stages.geometry.chance:.3f}.", s)]
    for i, p in enumerate(g["pairs"]):
        k = f"stages.geometry.pairs.{i}"
        line = text(f"{p['a']} and {p['b']}: cosine {{{k}.cosine_first:.3f}} at layer {{{k}.first_layer}}, "
                    f"{{{k}.cosine_max:.3f}} at its highest (layer {{{k}.max_layer}}), {{{k}.cosine_last:.3f}} at "
                    f"layer {{{k}.last_layer}} (chance {{{k}.baseline:.3f}}).", s)
        if p["closest_from"] is None:
            more = text(f" At the last layer the type closest to {p['a']} is {p['closest_last']}, not {p['b']}.", s)
        elif p["closest_from"] == p["first_layer"]:
            more = text(f" {p['b']} is the type closest to {p['a']} at every layer.", s)
        else:
            more = text(f" From layer {{{k}.closest_from}} on, {p['b']} is the type closest to {p['a']}.", s)
        paras.append(line + more)
    return Section("Geometry of sequence types (step 4)", paras, g["figures"],
                   [("Cosine per layer", g["cosine_by_layer"])], g["command"])


def _compare_section(s: dict) -> Section:
    c = s["stages"]["compare"]
    a, b = c["a"], c["b"]
    paras = [text(f"Pruned separately ({c['order']} order, {{stages.compare.sizes.{a}.n_prompts}} {a} and "
                  f"{{stages.compare.sizes.{b}.n_prompts}} {b} prompts), the {a} circuit at "
                  "{stages.compare.threshold:.0%} has "
                  "{stages.compare.n_a} heads and the " f"{b} circuit " "{stages.compare.n_b}; they share "
                  "{stages.compare.n_shared} (Jaccard {stages.compare.jaccard:.3f})"
                  + (": " + ", ".join(c["shared"]) if c["shared"] and len(c["shared"]) <= 12 else "") + ".", s)]
    paras.append(text(f"Kept alone, the {a} circuit keeps " "{stages.compare.a_on_a:.3f} of the " f"{a} task's "
                      "logit difference and {stages.compare.a_on_b:.3f} of the " f"{b} task's; the {b} circuit "
                      "keeps {stages.compare.b_on_b:.3f} of its own and {stages.compare.b_on_a:.3f} of the "
                      f"{a} task's.", s))
    ab, ba = c["a_on_b"] >= c["threshold"], c["b_on_a"] >= c["threshold"]
    if ab and ba:
        verdict = "Each circuit does the other task at least as well as the threshold: the two types share a circuit."
    elif ba or ab:
        x, y = (b, a) if ba else (a, b)
        verdict = (f"The {x} circuit is enough for the {y} task as well (above the threshold); the {y} circuit is "
                   f"not enough for the {x} task.")
    else:
        verdict = "Neither circuit reaches the threshold on the other task: the two types use different circuits."
    paras.append(text(verdict, s))
    if max(c["n_a"], c["n_b"]) > 3 * max(1, min(c["n_a"], c["n_b"])):
        paras.append(text("The two circuits differ in size several times over, so the Jaccard index mostly "
                          "reflects that; the cross-task performance is the fairer comparison.", s))
    return Section(f"{a} against {b} (step 5)", paras, [], [("Overlap per level", c["overlap"])], c["command"])


def narrative(s: dict) -> list[Section]:
    return [_prune_section(s), _ablation_section(s), sites_section(s), _heads_section(s), _geometry_section(s),
            _compare_section(s)]
