"""The work behind ``replab datasets check`` (kept out of the command module)."""

from __future__ import annotations

from pathlib import Path


def check_sets(name: str, model_name, scoring: str, known: bool, out: Path | None,
               per_prompt: Path | None, batch_size: int, cache: bool = True,
               progress: bool = True) -> list[dict]:
    """Check one set (or ``all`` builtin sets); optionally write the known-only JSONL."""
    from replab._progress import progress_bar
    from replab.errors import ReplabError
    from replab.models import load_model
    from replab.prompts import check_dataset, known_only, list_datasets, load_prompts
    from replab.prompts.check_cache import check_dataset_cached

    if scoring not in ("first_token", "sum_logprob"):
        raise ReplabError(f"unknown scoring {scoring!r}; use first_token or sum_logprob")
    names = list(list_datasets()["name"]) if name == "all" else [name]
    if (out or per_prompt) and len(names) > 1:
        raise ReplabError("--out and --per-prompt need a single dataset, not 'all'")
    model = load_model(model_name)
    summaries = []
    for set_name in names:
        ps = load_prompts(set_name, tokenizer=model.tokenizer,
                          prepend_bos=bool(model.cfg.default_prepend_bos))
        run = check_dataset_cached if cache else check_dataset
        with progress_bar(len(ps), f"check {set_name}", unit="prompt", enabled=progress) as bar:
            seen = [0]

            def tick(done, total, bar=bar, seen=seen):
                bar.advance(done - seen[0])
                seen[0] = done

            scores, summary = run(model, ps, scoring=scoring, batch_size=batch_size, progress=tick)
            bar.advance(len(ps) - seen[0])  # a cached result arrives without ticks
        if per_prompt:
            if str(per_prompt).endswith(".parquet"):
                scores.to_parquet(per_prompt, index=False)
            else:
                scores.to_csv(per_prompt, index=False)
        if out:
            kept = known_only(ps, scores) if known else ps
            if len(kept) == 0:
                raise ReplabError(f"no item of {set_name} is known to the model; nothing written")
            kept.to_jsonl(out)
            summary["written"] = f"{out} ({len(kept)} prompts)"
        summaries.append({**summary, "model": model.replab_identity.name})
    return summaries
