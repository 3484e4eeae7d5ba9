"""Headline and narrative of ``replab run superset`` (:mod:`replab.experiments.superset`).

Everything here reads ``summary.json`` only: each number goes through
:func:`~replab.experiments.report.text` (marked with its key), and each sentence is chosen by
the result (a branch per outcome), never written in advance.
"""

from __future__ import annotations

from replab.experiments.report import text
from replab.experiments.spec import Section

#: the words the direction / latent verdicts start with (``replab.features.verdict.sufficiency``)
VERDICTS = ("sufficient", "partly sufficient", "weak", "not sufficient", "uninformative")


def headline(results: dict, config: dict) -> dict:
    sc, bl, d, ev, la = (results[k] for k in ("scan", "blocks", "direction", "sae_eval", "latents"))
    return {"layer": sc["layer"], "probe_accuracy": sc["probe_accuracy"], "full_patch": sc["full_effect"],
            "top_head": bl["top_head"], "direction_verdict": d["verdict"], "direction_of_full": d["of_full"],
            "direction_of_full_low": d["of_full_low"], "direction_of_full_high": d["of_full_high"],
            "sae_explained_variance": ev["explained_variance"], "sae_ce_loss_recovered": ev["ce_loss_recovered"],
            "latents_verdict": la["verdict"], "latents_of_full": la["of_full"]}


def _known(s: dict) -> Section:
    k = s["stages"]["known_items"]
    return Section("Known items", [text(
        "The model knows {stages.known_items.n_known} of the {stages.known_items.n_prompts} prompts of the set "
        "(top-1 accuracy {stages.known_items.accuracy:.0%}; the answer beats every foil on "
        "{stages.known_items.candidate_accuracy:.0%} of the prompts with foils). Every later step uses only the "
        "known items, so a class effect cannot come from people the model does not know.", s)],
        tables=[("known prompts per super-class", k["known_by_class"])], command=k["command"])


def _probe(s: dict) -> Section:
    p = s["stages"]["probe"]
    held_out = "people" if p["split"] in ("group", "entity") else "{stages.probe.split}s"
    paras = [text("Harvested {stages.harvest.n_rows} residual-stream vectors at each person's last name token. "
                  "A linear probe of the super-class ({stages.probe.n_classes} classes, chance "
                  "{stages.probe.chance:.0%}) is most accurate at layer {stages.probe.best_layer}: balanced accuracy "
                  "{stages.probe.best_accuracy:.0%} over folds that hold out whole " + held_out + ".", s)]
    if p["best_control"] is not None and p["best_selectivity"] is not None:
        paras.append(text("On the control task (random labels per entity) the same probe reaches "
                          "{stages.probe.best_control:.0%}, a selectivity of {stages.probe.best_selectivity:.0%}; "
                          "with shuffled labels {stages.probe.best_shuffled:.0%}. High accuracy alone does not show "
                          "that the model uses the information: the causal tests below do.", s))
    return Section("Super-class probe sweep", paras, p["figures"], command=p["command"])


def _scan(s: dict) -> Section:
    sc = s["stages"]["scan"]
    if sc["fixed"]:
        first = text("The candidate layer was fixed at {stages.scan.layer} (option layer).", s)
    else:
        first = text("The scan chooses layer {stages.scan.layer}: the most accurate probe among the "
                     "{stages.scan.n_eligible} of {stages.scan.n_layers} layers whose full-residual patch at the "
                     "name restores at least {stages.scan.min_full:.0%} of the clean-vs-corrupt gap.", s)
    paras = [first, text("There the full patch restores {stages.scan.full_effect:.0%} and the probe's own "
                         "direction {stages.scan.direction_effect:.0%} (probe accuracy {stages.scan.probe_accuracy}).",
                         s)]
    if sc["probe_best_layer"] != sc["layer"]:
        paras.append(text("The probe's most accurate layer on held-out templates, {stages.scan.probe_best_layer} "
                          "({stages.scan.probe_best_accuracy}), is not the candidate: patching the name there "
                          "restores only {stages.scan.probe_best_full_effect} of the gap (the class information "
                          "has left the name by then).", s))
    return Section("Feature scan: the candidate layer", paras, sc["figures"], command=sc["command"])


def _blocks(s: dict) -> Section:
    b = s["stages"]["blocks"]
    paras = [text("At layer {stages.blocks.layer} (metric: log class mass, clean {stages.blocks.clean_metric}, "
                  "corrupt {stages.blocks.corrupt_metric}): zero-ablating the residual stream leaves "
                  "{stages.blocks.resid_necessity} of the effect, and patching it clean into the corrupt run restores "
                  "{stages.blocks.resid_sufficiency} (the full patch).", s)]
    if b["top_head_necessity"] < 0.9:
        paras.append(text("The most necessary head is {stages.blocks.top_head}: ablating it leaves "
                          "{stages.blocks.top_head_necessity}; ablating the MLP leaves {stages.blocks.mlp_necessity}.",
                          s))
    else:
        paras.append(text("No single head of this layer is necessary: the one that matters most, "
                          "{stages.blocks.top_head}, still leaves {stages.blocks.top_head_necessity} when ablated "
                          "(the MLP: {stages.blocks.mlp_necessity}). The later steps follow this head.", s))
    if b["n_sufficient_blocks"]:
        paras.append(text("{stages.blocks.n_sufficient_blocks} single block(s) besides the residual stream restore "
                          "at least half of the effect on their own (best head {stages.blocks.best_sufficient_head}: "
                          "{stages.blocks.best_head_sufficiency}; MLP {stages.blocks.mlp_sufficiency}).", s))
    else:
        paras.append(text("No single head or MLP is sufficient: the best head, {stages.blocks.best_sufficient_head}, "
                          "restores {stages.blocks.best_head_sufficiency} and the MLP {stages.blocks.mlp_sufficiency}; "
                          "the effect is carried by the residual stream as a whole.", s))
    paras.append(text("Every candidate's logit is logged in the table (blocks.csv), not just the margin: a swing "
                      "in a foil cannot pass for an effect.", s))
    return Section("Block sweeps at the candidate layer", paras, b["figures"],
                   [("necessity and sufficiency per block (normalised: 0 = corrupt, 1 = clean)",
                     [{k: r[k] for k in ("block", "test", "normalized_effect", "ci_low", "ci_high", "answer_logit",
                                         "foil_logit", "max_other_logit")} for r in b["records"]])],
                   command=b["command"])


def _hydra(s: dict) -> Section:
    h = s["stages"]["hydra"]
    paras = [text("Ablating {stages.hydra.ablate} ({stages.hydra.ablation} ablation) moves the log class mass from "
                  "{stages.hydra.clean_metric} to {stages.hydra.ablated_metric} (normalised effect "
                  "{stages.hydra.normalized_effect}); the head's own direct effect on the answer-minus-foil logit "
                  "changes by {stages.hydra.lost_direct_effect}.", s)]
    if h["n_backups"]:
        paras.append(text("Widen the set: {stages.hydra.n_backups} head(s) compensate, led by "
                          "{stages.hydra.top_compensating} (rise {stages.hydra.top_compensation}, "
                          "{stages.hydra.top_fraction_of_lost:.0%} of the lost direct effect).", s))
    elif abs(h["lost_direct_effect"]) < 0.05:
        paras.append(text("There is little to compensate: the largest rise of any other head's direct effect is "
                          "{stages.hydra.top_compensation} ({stages.hydra.top_compensating}).", s))
    else:
        paras.append(text("No backup head: the largest rise, {stages.hydra.top_compensating} "
                          "({stages.hydra.top_compensation}), is below {stages.hydra.min_fraction:.0%} of the lost "
                          "direct effect or not distinguishable from 0.", s))
    return Section("Backup heads (hydra)", paras, h["figures"],
                   [("largest rises of direct effect", h["top"])], command=h["command"])


def _path(s: dict) -> Section:
    p = s["stages"]["path"]
    paras = [text("Path patching from each of the {stages.path.n_senders} heads of layers "
                  "{stages.path.first_sender_layer} to {stages.path.last_sender_layer} into {stages.path.receiver} "
                  "(sender from the corrupt run, every other head frozen clean): the strongest path is from "
                  "{stages.path.top_sender}, leaving {stages.path.top_effect:.0%} of the effect (a drop of "
                  "{stages.path.top_drop:.0%}); {stages.path.n_paths_over_5pct} path(s) drop it by more than 5%.", s)]
    if p["top_drop"] > 0.05:
        paras.append(text("Ablating only that path ({stages.path.confirm_ablation} ablation) leaves "
                          "{stages.path.confirm_effect:.0%} of the effect.", s))
    else:
        paras.append(text("No earlier head feeds this input much: ablating only the strongest path "
                          "({stages.path.confirm_ablation} ablation) leaves {stages.path.confirm_effect:.0%}.", s))
    return Section("Path patching into the top head", paras, p["figures"],
                   [("strongest paths", p["next"])], command=p["command"])


def _grid(s: dict) -> Section:
    g = s["stages"]["grid"]
    paras = [text("The block sweep at layer {stages.grid.layer} repeated over every ordered pair of "
                  "{stages.grid.n_classes} super-classes ({stages.grid.n_tasks} tasks, {stages.grid.n_pairs} entity "
                  "pairs, {stages.grid.n_answer_words} answer words): ablating {stages.grid.top_head} leaves between "
                  "{stages.grid.head_necessity_min} ({stages.grid.head_necessity_min_class}) and "
                  "{stages.grid.head_necessity_max} ({stages.grid.head_necessity_max_class}) of the effect.", s)]
    if g["n_control_cells"]:
        paras.append(text("Negative controls (invented and ambiguous people in the same template): "
                          "{stages.grid.n_silent} of the {stages.grid.n_control_cells} (class, block, test) cells "
                          "where a block acts on real people are silent there: they change the metric by at most "
                          "{stages.grid.silent_fraction:.0%} of what they do on real people.", s))
    else:
        paras.append(text("No control cell could be judged (no component acts on real people enough).", s))
    return Section("Generalisation grid, split by class", paras, g["figures"],
                   [("pooled per clean class", g["by_class"]), ("negative controls", g["controls"])],
                   command=g["command"])


def _rank(s: dict) -> Section:
    r = s["stages"]["rank"]
    if r["smallest_rank"] == 1:
        first = text("At layer {stages.rank.layer} a rank-1 probe is within {stages.rank.epsilon} of the full-rank "
                     "one ({stages.rank.rank1} against {stages.rank.full}): low rank, consistent with a single "
                     "direction per class.", s)
    elif r["smallest_rank"] is not None:
        first = text("At layer {stages.rank.layer} the smallest rank within {stages.rank.epsilon} of the full-rank "
                     "probe ({stages.rank.full}) is {stages.rank.smallest_rank} (rank 1: {stages.rank.rank1}): "
                     "several features, not one direction.", s)
    else:
        first = text("At layer {stages.rank.layer} no rank up to {stages.rank.max_rank} comes within "
                     "{stages.rank.epsilon} of the full-rank probe ({stages.rank.full}; rank 1: {stages.rank.rank1}): "
                     "high rank, several features.", s)
    paras = [first]
    if r["n_clusters"] is not None and r["first_merge"] is not None:
        paras.append(text("Clustering the class directions (cosine distance; unrelated directions sit at "
                          "{stages.rank.chance_distance}) gives {stages.rank.n_clusters} cluster(s); the first merge "
                          "is {stages.rank.first_merge} at {stages.rank.first_merge_distance}.", s))
    return Section("Rank of the super-class code", paras, r["figures"],
                   [("balanced accuracy by rank", r["accuracy_by_rank"])], command=r["command"])


def _verdict_sentence(s: dict, stage: str, subject: str, baseline: str) -> list:
    """The verdict as a sentence; ``subject`` and ``baseline`` are templates (numbers in braces)."""
    r = s["stages"][stage]
    if r["verdict"] == "uninformative":
        return [text("Uninformative: the full-residual patch restores only "
                     f"{{stages.{stage}.full_residual_effect:.0%}} of the gap, so nothing at this site can carry the "
                     "effect.", s)]
    above = (f"above all {{stages.{stage}.n_random}} " if r["n_random_below"] >= r["n_random"] else
             f"above {{stages.{stage}.n_random_below}} of {{stages.{stage}.n_random}} ")
    return [text(subject + f" is {{stages.{stage}.verdict}}: it restores {{stages.{stage}.of_full:.0%}} "
                 f"[{{stages.{stage}.of_full_low:.0%}}, {{stages.{stage}.of_full_high:.0%}}] of the full patch "
                 f"({{stages.{stage}.full_residual_effect:.0%}} of the clean-vs-corrupt gap), " + above + baseline
                 + ".", s)]


def _direction(s: dict) -> Section:
    d = s["stages"]["direction"]
    paras = _verdict_sentence(s, "direction", "The {stages.direction.class} direction at layer "
                              "{stages.direction.layer}", "random directions")
    if d["verdict"] != "uninformative":
        paras.append(text("Everything but the direction (the complement) restores "
                          "{stages.direction.complement_of_full:.0%} of the full patch; projecting the direction "
                          "out of the clean run removes {stages.direction.ablation_drop:.0%} of the gap.", s))
        if d["shuffled_of_full"] is not None:
            paras.append(text("The shuffled-label probe's direction restores "
                              "{stages.direction.shuffled_of_full:.0%} of the full patch.", s))
    return Section("Direction patching", paras, d["figures"], command=d["command"])


def _sae(s: dict) -> Section:
    t, e = s["stages"]["sae_train"], s["stages"]["sae_eval"]
    paras = [text("A TopK SAE ({stages.sae_train.d_sae} latents, k = {stages.sae_train.k}) on layer "
                  "{stages.sae_train.layer}, trained once for this model and configuration and cached: "
                  "{stages.sae_train.tokens_trained} training tokens from "
                  "{stages.sae_train.corpus_tokens} distinct corpus tokens.", s),
             text("On {stages.sae_eval.tokens} held-out tokens it explains {stages.sae_eval.explained_variance:.0%} "
                  "of the variance with L0 {stages.sae_eval.l0}, and recovers "
                  "{stages.sae_eval.ce_loss_recovered:.0%} of the CE loss (ΔCE {stages.sae_eval.delta_ce} nats: "
                  "clean {stages.sae_eval.ce_clean}, spliced {stages.sae_eval.ce_sae}, zero-ablated "
                  "{stages.sae_eval.ce_zero}); {stages.sae_eval.dead_latents} latents never fire there.", s)]
    if e["explained_variance"] < 0.8 or e["ce_loss_recovered"] < 0.9:
        paras.append(text("This is a small SAE for a short run: read the latent results below with its "
                          "reconstruction error in mind (the error term is kept in every patch).", s))
    return Section("SAE at the candidate layer", paras, e["figures"], command=t["command"] + " && " + e["command"])


def _decompose(s: dict) -> Section:
    d = s["stages"]["sae_decompose"]
    paras = [text("The {stages.sae_decompose.n_top} latents that best explain the class-mean difference along the "
                  "direction are listed below; the largest cosine of any of them with the direction is "
                  "{stages.sae_decompose.max_cosine}.", s)]
    if d["reconstructed_fraction"] is not None:
        paras.append(text("Together the latents' contributions sum to "
                          "{stages.sae_decompose.reconstructed_fraction:.0%} "
                          "of the projected class difference.", s))
    return Section("SAE decomposition of the direction", paras, d["figures"], [("top latents", d["top"])],
                   command=d["command"])


def _latents(s: dict) -> Section:
    la = s["stages"]["latents"]
    paras = _verdict_sentence(s, "latents", "Patching the top {stages.latents.n_latents} latents",
                              "random sets of {stages.latents.n_latents} active latents")
    paras.append(text("Every latent together (error term kept corrupt) restores {stages.latents.all_latents_effect}; "
                      "the error term alone {stages.latents.error_term_effect}.", s))
    return Section("Latent patching", paras, la["figures"], [("top-k latents by attribution", la["top_k"])],
                   command=la["command"])


def narrative(s: dict) -> list[Section]:
    return [_known(s), _probe(s), _scan(s), _blocks(s), _hydra(s), _path(s), _grid(s), _rank(s), _direction(s),
            _sae(s), _decompose(s), _latents(s)]
