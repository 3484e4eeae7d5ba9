"""User-facing errors.

Anything a researcher can cause by bad input (unknown model, hook, layer, dataset
or label; mismatched clean/corrupt lengths; empty input; a corrupted store)
raises :class:`ReplabError`. The CLI prints its message as one line and exits
non-zero; it never shows a traceback for these.
"""


class ReplabError(Exception):
    """An error caused by the user's input or files, with a one-line message."""
