"""Lenses: decode the residual stream at every layer (logit lens, tuned lens).

* :class:`LogitLens` (TransformerLens model; the model's own final norm + unembedding)
  and :class:`TunedLensDecoder` (a tuned-lens ``TunedLens`` on the HF model's hidden
  states) share the point convention of :mod:`replab.lenses.decoders`.
* :func:`lens_table` / :func:`first_top1`: tidy per (prompt, layer, position) tables,
  computed by :func:`lens_arrays` (vectorised; shared prefixes decoded once).
* :func:`apply_lens`: CLI-level entry point that writes a run directory with figures.
* :func:`train_lens` / :func:`load_tuned_lens`: train (cached per model identity and training
  config; :func:`default_lens_dir` is the default lens) and load; :func:`export_lens` writes one in
  tuned-lens's own format (with its ``params.pt``) for tuned-lens's loader.
* :func:`probe_norm`: the model's own final norm, measured (for the least-squares init).
* :func:`evaluate_lenses` / :func:`run_eval`: KL and CE per layer on held-out text.
* :func:`logit_diff_curve` / :func:`decoder_logit_diff_curve`: W2 step 3 of docs/workflows.md (logit lens:
  accumulated residual; tuned lens: its translated residual).
"""

from replab.lenses.cache import cached_lens_dir, load_lens, save_lens
from replab.lenses.cells import lens_arrays
from replab.lenses.decoders import LogitLens, Point, TunedLensDecoder, lens_points
from replab.lenses.evaluate import evaluate_lenses, run_eval
from replab.lenses.logit_diff import decoder_logit_diff_curve, logit_diff_curve
from replab.lenses.norms import probe_norm
from replab.lenses.run import apply_lens, first_top1_summary
from replab.lenses.table import first_top1, lens_table
from replab.lenses.train import TrainConfig, train_tuned_lens
from replab.lenses.tuned import default_lens_dir, export_lens, load_tuned_lens, train_lens
from replab.prompts.corpus import read_corpus, token_chunks

__all__ = [
    "LogitLens", "Point", "TrainConfig", "TunedLensDecoder", "apply_lens", "cached_lens_dir", "export_lens",
    "decoder_logit_diff_curve", "default_lens_dir", "evaluate_lenses", "first_top1",
    "first_top1_summary", "lens_arrays", "lens_points", "lens_table", "load_lens",
    "load_tuned_lens", "logit_diff_curve", "probe_norm", "read_corpus", "run_eval", "save_lens",
    "token_chunks", "train_lens", "train_tuned_lens",
]
