"""``next_day``: "Today it is Monday so tomorrow it is" -> " Tuesday" with clean/corrupt pairs.

Every template carries a day ``offset`` (answer = day + offset). The corrupt prompt is the
same template with the day shifted by ``params.corrupt_shift``; its answer is the clean
row's only foil, so answer and foil trade places between clean and corrupt.
"""

from __future__ import annotations

from replab.errors import ReplabError
from replab.prompts.builders.common import require


def build_next_day(params: dict, tokenizer=None, prepend_bos: bool = False) -> list[dict]:
    """Rows for every template x day. Labels: ``day``, ``offset``, ``corrupt_day``."""
    days = list(require(params, "days", "next_day"))
    templates = require(params, "templates", "next_day")
    shift = int(params.get("corrupt_shift", 3))
    n = len(days)
    if n < 2 or shift % n == 0:
        raise ReplabError("next_day: need >= 2 days and a corrupt_shift that changes the day")
    rows = []
    for t in templates:
        tid, text, off = t["id"], t["text"], int(t["offset"])
        if (shift % n) == 0 or ((off + shift) % n) == (off % n):
            raise ReplabError(f"next_day: template {tid} cannot form a pair")
        for d, day in enumerate(days):
            cd = (d + shift) % n
            answer = " " + days[(d + off) % n]
            corrupt_answer = " " + days[(cd + off) % n]
            rows.append({
                "prompt": text.format(day=day),
                "answer": answer,
                "foils": [corrupt_answer],
                "corrupt_prompt": text.format(day=days[cd]),
                "corrupt_answer": corrupt_answer,
                "template": tid,
                "group": f"{tid}/{day}",
                "day": day,
                "offset": off,
                "corrupt_day": days[cd],
            })
    return rows
