"""``replab run lenses`` (W5's lens part): the logit and the tuned lens on a prompt set, their
tables and curves, and the held-out KL comparison of the two lenses.

Stages: logit lens table → tuned lens (trained once, cached per model and training config) →
tuned lens table → held-out KL/CE per layer of both lenses. Every step is a library call of
:mod:`replab.lenses`.
"""

from __future__ import annotations

from replab.experiments.report import text
from replab.experiments.spec import Experiment, Section, Stage, model_flag, rel
from replab.lenses import TrainConfig, apply_lens, run_eval, train_lens
from replab.models.tiny_hf import resolve

DEFAULTS = {
    "dataset": "next_day",          # prompt set with answers (and clean/corrupt pairs)
    "limit": None,                  # first N prompts (None: all)
    "top_k": 5,
    "lens_tokens": 16384,           # tuned-lens training: tokens of the least-squares phase
    "lens_steps": 30,               # tuned-lens training: Adam steps of the KL phase
    "eval_corpus": "builtin-heldout",
    "eval_tokens": 1024,
    "eval_seq_len": 128,
    "seed": 0,
}
QUICK = {"limit": 8, "lens_tokens": 1024, "lens_steps": 2, "eval_tokens": 256, "eval_seq_len": 64}


def _lens_result(ctx, summary: dict, kind: str) -> dict:
    ft = summary.get("first_top1") or {}
    return {
        "kind": kind,
        "n_prompts": summary["n_prompts"],
        "median_first_top1_layer": ft.get("median_first_top1_layer"),
        "median_first_top1_layer_final_top1": ft.get("median_first_top1_layer_final_top1"),
        "frac_final_top1": ft.get("frac_final_top1"),
        "frac_ever_top1": ft.get("frac_ever_top1"),
        "logit_diff_final_mean": summary.get("logit_diff_final_mean"),
        "figures": [rel(f, ctx.run_dir) for f in summary["figures"]],
    }


def _args(c: dict) -> str:
    return f"--dataset {c['dataset']}" + (f" --limit {c['limit']}" if c["limit"] is not None else "") \
        + f" --top-k {c['top_k']}"


def logit_table(ctx) -> dict:
    c = ctx.config
    s = apply_lens("logit", ctx.model_name, dataset=c["dataset"], limit=c["limit"], k=c["top_k"], out=ctx.out,
                   progress=ctx.progress)
    return {**_lens_result(ctx, s, "logit"),
            "command": f"replab lens logit{model_flag(ctx)} {_args(c)} --out {ctx.out}"}


def _train_config(c: dict) -> TrainConfig:
    return TrainConfig(fit_tokens=c["lens_tokens"], steps=c["lens_steps"], seed=c["seed"])


def train(ctx) -> dict:
    c = ctx.config
    path, stats = train_lens(resolve(ctx.model_name), _train_config(c), progress=ctx.progress)
    # whether this run trained the lens or found it in the cache is not a result (a replay would
    # differ): the lens and its training time, recorded when it was trained, are the same either way
    return {"lens_path": str(path), "train_seconds": stats.get("seconds"),
            "command": (f"replab lens train{model_flag(ctx)} --tokens {c['lens_tokens']} "
                        f"--steps {c['lens_steps']} --seed {c['seed']}")}


def tuned_table(ctx) -> dict:
    c = ctx.config
    lens = ctx.results["tuned_lens_train"]["lens_path"]
    s = apply_lens("tuned", resolve(ctx.model_name), dataset=c["dataset"], limit=c["limit"], k=c["top_k"], out=ctx.out,
                   lens_path=lens, progress=ctx.progress)
    return {**_lens_result(ctx, s, "tuned"),
            "command": f"replab lens tuned{model_flag(ctx)} {_args(c)} --lens {lens} --out {ctx.out}"}


def heldout(ctx) -> dict:
    c = ctx.config
    lens = ctx.results["tuned_lens_train"]["lens_path"]
    df, s = run_eval(resolve(ctx.model_name), c["eval_corpus"], c["eval_tokens"], c["eval_seq_len"], lens, ctx.out,
                     progress=ctx.progress)
    w = df.pivot(index="layer", columns="lens", values="kl").reset_index()
    inner = w[w["layer"] < w["layer"].max()]
    mid = inner.iloc[len(inner) // 2]
    return {
        "tuned_better_every_layer": s["tuned_better_every_layer"],
        "n_layers_tuned_better": int((inner["tuned"] < inner["logit"]).sum()),
        "n_layers_compared": int(len(inner)),
        "mean_kl_logit": float(inner["logit"].mean()), "mean_kl_tuned": float(inner["tuned"].mean()),
        "mid_layer": int(mid["layer"]), "mid_kl_logit": float(mid["logit"]), "mid_kl_tuned": float(mid["tuned"]),
        "tokens": s["config"]["tokens"],
        "kl_by_layer": [{"layer": int(r.layer), "kl_logit": float(r.logit), "kl_tuned": float(r.tuned)}
                        for r in w.itertuples()],
        "figures": ["heldout_kl/eval.png"],
        "command": (f"replab lens eval{model_flag(ctx)} --corpus {c['eval_corpus']} --tokens {c['eval_tokens']} "
                    f"--seq-len {c['eval_seq_len']} --lens {lens} --out {ctx.out}"),
    }


STAGES = (
    Stage("logit_lens", "logit lens table on the prompt set", logit_table, ("dataset", "limit", "top_k")),
    Stage("tuned_lens_train", "tuned lens (trained once, cached)", train, ("lens_tokens", "lens_steps", "seed"),
          slow=True),
    Stage("tuned_lens", "tuned lens table on the prompt set", tuned_table, ("dataset", "limit", "top_k")),
    Stage("heldout_kl", "held-out KL of both lenses", heldout, ("eval_corpus", "eval_tokens", "eval_seq_len")),
)


def headline(results: dict, config: dict) -> dict:
    lo, tu, kl = results["logit_lens"], results["tuned_lens"], results["heldout_kl"]
    return {"logit_median_first_top1_layer": lo["median_first_top1_layer"],
            "tuned_median_first_top1_layer": tu["median_first_top1_layer"],
            "frac_final_top1": lo["frac_final_top1"],
            "mean_kl_logit": kl["mean_kl_logit"], "mean_kl_tuned": kl["mean_kl_tuned"],
            "n_layers_tuned_better": kl["n_layers_tuned_better"]}


def narrative(s: dict) -> list[Section]:
    st = s["stages"]
    lo, tu, kl, tr = st["logit_lens"], st["tuned_lens"], st["heldout_kl"], st["tuned_lens_train"]

    def first_top1(key: str, r: dict) -> str:
        if r["median_first_top1_layer"] is None:
            return text(f"Through the {r['kind']} lens the answer never becomes the top-1 token on "
                        f"any of the {{stages.{key}.n_prompts}} prompts.", s)
        return text(f"Through the {r['kind']} lens the answer first becomes the top-1 token at layer "
                    f"{{stages.{key}.median_first_top1_layer}} (median over the prompts where it ever does: "
                    f"{{stages.{key}.frac_ever_top1:.0%}} of {{stages.{key}.n_prompts}}); the model's own output "
                    f"ranks it first on {{stages.{key}.frac_final_top1:.0%}} of them.", s)

    better = ("The tuned lens is closer to the model's output than the logit lens at every layer"
              if kl["tuned_better_every_layer"] else
              "The tuned lens is closer to the model's output than the logit lens at "
              "{stages.heldout_kl.n_layers_tuned_better} of {stages.heldout_kl.n_layers_compared} layers")
    return [
        Section("Logit lens", [first_top1("logit_lens", lo)], lo["figures"], command=lo["command"]),
        Section("Tuned lens", [
            text("A tuned lens (an affine translator per layer) is trained once for this model and training "
                 "configuration and cached" + (", in {stages.tuned_lens_train.train_seconds:.0f} s" if
                                               tr.get("train_seconds") is not None else "") + ".", s),
            first_top1("tuned_lens", tu)], tu["figures"], command=tu["command"]),
        Section("Held-out KL to the model's output", [
            text(better + ": mean KL {stages.heldout_kl.mean_kl_logit} nats (logit) against "
                 "{stages.heldout_kl.mean_kl_tuned} (tuned) over {stages.heldout_kl.tokens} held-out tokens; at "
                 "layer {stages.heldout_kl.mid_layer}, {stages.heldout_kl.mid_kl_logit} against "
                 "{stages.heldout_kl.mid_kl_tuned}.", s)],
            kl["figures"], [("KL (nats) per layer", kl["kl_by_layer"])], command=kl["command"]),
    ]


EXPERIMENT = Experiment(
    name="lenses", workflow="W5", title="Logit and tuned lens on a prompt set",
    description="Logit and tuned lens tables and curves on a prompt set, with the held-out KL comparison.",
    defaults=DEFAULTS, quick=QUICK, stages=STAGES, headline=headline, narrative=narrative)
