"""Head function (W4 step 3, W5): detectors, OV/QK circuits on the embeddings, composition
scores and attention patterns. Grouped-query attention is handled explicitly: every result
says whether it is per query head or per KV head.

>>> from replab.heads import detect, ov_table, qk_table, composition_table, resolve_tokens
>>> table, summary = detect(model, "previous,induction")            # doctest: +SKIP
>>> ov_table(model, resolve_tokens("weekdays", model.tokenizer))     # doctest: +SKIP

* :mod:`~replab.heads.detectors`: previous-token, duplicate-token, induction, BOS, positional, copying;
* :mod:`~replab.heads.ov` / :mod:`~replab.heads.qk`: circuits on the embeddings over a token set;
* :mod:`~replab.heads.composition`: Q/K/V composition scores with a random baseline;
* :mod:`~replab.heads.tokensets`: builtin token sets (digits, months, weekdays, words) or a file;
* :mod:`~replab.heads.weights`: per-head weights (GQA explicit) and the norm conventions;
* :mod:`~replab.heads.runs`: one call per ``replab heads`` command, writing a run directory.
"""

from replab.heads.composition import composition_scores, composition_table, random_baseline
from replab.heads.detectors import DETECTORS, detect, tl_crosscheck
from replab.heads.ov import eigen_copy_scores, ov_matrices, ov_table
from replab.heads.qk import positional_qk, qk_matrices, qk_table
from replab.heads.runs import run_composition, run_detect, run_ov, run_patterns, run_qk
from replab.heads.tokensets import TokenSet
from replab.heads.tokensets import resolve as resolve_tokens

__all__ = ["DETECTORS", "TokenSet", "composition_scores", "composition_table", "detect",
           "eigen_copy_scores", "ov_matrices", "ov_table", "positional_qk", "qk_matrices", "qk_table",
           "random_baseline", "resolve_tokens", "run_composition", "run_detect", "run_ov", "run_patterns",
           "run_qk", "tl_crosscheck"]
