"""Shared fixtures: the tiny random model (unit tests) and SmolLM2 (integration)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    from replab.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def smol():
    from replab.models import load_model

    return load_model(None, device="cpu")


@pytest.fixture()
def people_jsonl(tmp_path):
    """A small user JSONL set with labels, an entity span, and clean/corrupt pairs."""
    rows = [
        {"prompt": "Pablo Picasso is a famous", "answer": " artist", "foils": [" physicist"],
         "corrupt_prompt": "Albert Einstein is a famous", "corrupt_answer": " physicist",
         "template": "famous", "entity": "Pablo Picasso", "superclass": "artist"},
        {"prompt": "Albert Einstein is a famous", "answer": " physicist", "foils": [" artist"],
         "template": "famous", "entity": "Albert Einstein", "superclass": "scientist"},
        {"prompt": "By profession, Claude Monet was a", "answer": " painter",
         "template": "profession", "entity": "Claude Monet", "superclass": "artist"},
        {"prompt": "By profession, Marie Curie was a", "answer": " chemist",
         "template": "profession", "entity": "Marie Curie", "superclass": "scientist"},
        {"prompt": "The capital of France is", "answer": " Paris", "template": "capital",
         "entity": "France", "superclass": "place"},
    ]
    path = tmp_path / "people.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
