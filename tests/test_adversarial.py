"""The adversarial suite: bad inputs, damaged or hostile files, concurrent writers, signals.

Every case runs the real command line (in-process through ``replab.cli.main``; the signal
and concurrency cases as separate processes) and asserts replab's promise: exit code 2
(130 after Ctrl-C), exactly one ``error:`` line on stderr naming the problem, no traceback,
and no directory left behind that looks complete (no ``manifest.json`` / ``summary.json``).

Run: ``python -m pytest tests/test_adversarial.py -q`` (about a minute on the tiny model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from replab_testutil import run_cli

from replab.io import sha256_file

PEOPLE = [("Pablo Picasso", "artist"), ("Claude Monet", "artist"), ("Frida Kahlo", "artist"),
          ("Marie Curie", "scientist"), ("Albert Einstein", "scientist"), ("Isaac Newton", "scientist")]
TEMPLATES = {"famous": "{} is a famous", "known": "Everyone knows that {} was a"}


def people_rows():
    return [{"prompt": text.format(name), "answer": " person", "entity": name, "superclass": sc,
             "template": tid} for tid, text in TEMPLATES.items() for name, sc in PEOPLE]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def reuse_tiny(tiny, monkeypatch):
    """In-process commands get the session's tiny model instead of loading it again (~1 s
    each): loading is not what these cases test. The subprocess cases load it for real."""
    import replab.models as models

    real = models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda name=None, *a, **k: tiny if name == "tiny" and not a
                        and k.get("dtype") in (None, "float32") else real(name, *a, **k))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny):
    """A tiny-model store (12 prompts, 4 layers) and a synthetic store (60 rows, 2 layers)."""
    from replab.harvesting import harvest
    from replab.store.synthetic import write_synthetic_store

    root = tmp_path_factory.mktemp("adv")
    data = write_jsonl(root / "people.jsonl", people_rows())
    harvest(tiny, data, hooks="resid_post", layers="all", positions="last", out=root / "tiny",
            progress=False)
    write_synthetic_store(root / "syn", n_rows=60, d=8, n_layers=2, n_classes=3, seed=0)
    return {"tiny": root / "tiny", "syn": root / "syn", "people": data}


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(store: Path, edit) -> None:
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))


def reseal(store: Path) -> None:
    """Recompute the manifest's sha256 sums, so the only damage is the one a case plants."""
    def fix(m):
        m["index"]["sha256"] = sha256_file(store / m["index"]["file"])
        for t in m["tensors"]:
            t["sha256"] = sha256_file(store / "tensors" / f"{t['hook']}.npy")
    edit_manifest(store, fix)


def poison(store: Path, hook: str, rows, value=np.nan) -> None:
    arr = np.load(store / "tensors" / f"{hook}.npy", mmap_mode="r+")
    arr[list(rows), 0] = value
    arr.flush()
    del arr
    reseal(store)


def looks_complete(path: Path | None) -> bool:
    return path is not None and path.exists() and any(
        p.name in ("manifest.json", "summary.json") for p in path.rglob("*"))


def expect_error(capsys, args, match: str, fresh: Path | None = None, code: int = 2) -> str:
    """Run ``replab ARGS``; assert the one-line error contract; return the error line."""
    got, _out, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert got == code, f"exit {got}, stderr:\n{err}"
    assert len(errors) == 1, f"expected one error line:\n{err}"
    assert "Traceback" not in err
    assert re.search(match, errors[0]), errors[0]
    assert not looks_complete(fresh), f"{fresh} looks complete after a failed command"
    return errors[0]


# ------------------------------------------------------------- inputs to `replab harvest`
def _harvest(tmp, data, *extra, out=None):
    out = out or tmp / "out"
    return ["harvest", "--model", "tiny", "--dataset", str(data), "--out", str(out), *extra], out


def _not_writable(tmp):
    if os.geteuid() == 0:             # root ignores permission bits; /sys refuses even root
        if not Path("/sys").is_dir():
            pytest.skip("no read-only location to test as root")
        return Path("/sys/replab_adversarial/out")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


HARVEST_CASES = {
    "missing-file": (lambda t, p: _harvest(t, t / "nope.jsonl"), r"nope\.jsonl.*does not exist"),
    "empty-file": (lambda t, p: _harvest(t, _bytes(t / "e.jsonl", b"")), r"e\.jsonl: dataset e is empty"),
    "malformed-json": (lambda t, p: _harvest(t, _bytes(t / "m.jsonl", b'{"prompt": "a"}\n{"prompt": \n')),
                       r"m\.jsonl: line 2 is not valid JSON"),
    "row-without-prompt": (lambda t, p: _harvest(t, write_jsonl(t / "np.jsonl", [{"answer": " x"}])),
                           r"row 1 has no 'prompt'"),
    "non-utf8-jsonl": (lambda t, p: _harvest(t, _bytes(t / "l1.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')),
                       r"l1\.jsonl: line 2, column 16: byte 0xe9 is not valid UTF-8"),
    "non-utf8-csv": (lambda t, p: _harvest(t, _bytes(t / "l1.csv", b"prompt,label\nok,a\ncaf\xe9 au lait,b\n")),
                     r"l1\.csv: line 3, column 4: byte 0xe9 is not valid UTF-8"),
    "unknown-dataset": (lambda t, p: _harvest(t, "no_such_set"), r"unknown dataset 'no_such_set'"),
    "unknown-hook": (lambda t, p: _harvest(t, p, "--hooks", "resid_bogus"), r"resid_bogus"),
    "unknown-layer": (lambda t, p: _harvest(t, p, "--layers", "9"), r"\b9\b"),
    "negative-layer": (lambda t, p: _harvest(t, p, "--layers=-5"), r"-5"),
    "reversed-layers": (lambda t, p: _harvest(t, p, "--layers", "3-1"), r"3-1"),
    "unknown-position-rule": (lambda t, p: _harvest(t, p, "--positions", "nope_last"), r"nope_last"),
    "position-out-of-range": (lambda t, p: _harvest(t, p, "--positions", "40"), r"out of range"),
    "batch-size-0": (lambda t, p: _harvest(t, p, "--batch-size", "0"), r"batch size must be a positive integer"),
    "bad-dtype": (lambda t, p: _harvest(t, p, "--dtype", "int8"), r"int8"),
    "bad-store-dtype": (lambda t, p: _harvest(t, p, "--store-dtype", "int8"), r"int8"),
    "prompt-longer-than-context": (
        lambda t, p: _harvest(t, write_jsonl(t / "long.jsonl", [{"prompt": "short"},
                                                                {"prompt": "word " * 400}])),
        r"long\.jsonl: row 2 has 401 tokens, more than the model.s context of 256"),
    "out-is-a-file": (lambda t, p: _harvest(t, p, out=_bytes(t / "afile", b"x")), r"afile: --out is a file"),
    "out-parent-is-a-file": (lambda t, p: _harvest(t, p, out=_bytes(t / "afile", b"x") / "store"),
                             r"parent .* is a file"),
    "out-not-writable": (lambda t, p: _harvest(t, p, out=_not_writable(t)), r"not writable|cannot create"),
    "out-not-a-store": (lambda t, p: _harvest(t, p, out=_dir_with_file(t / "full")),
                        r"exists and is not an activation store"),
}


def _dir_with_file(d: Path) -> Path:
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


@pytest.mark.parametrize("case", list(HARVEST_CASES))
def test_harvest_input(case, stores, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, match = HARVEST_CASES[case]
    args, out = make(tmp_path, stores["people"])
    expect_error(capsys, args, match, fresh=out)


def test_harvest_into_a_store_made_otherwise(stores, tmp_path, capsys):
    s = copy_store(stores["tiny"], tmp_path / "s")
    before = (s / "manifest.json").read_bytes()
    args, _ = _harvest(tmp_path, stores["people"], "--layers", "0-1", out=s)
    expect_error(capsys, args, r"manifest\.json: this directory holds a store made with a different")
    assert (s / "manifest.json").read_bytes() == before


def test_datasets_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "short", "answer": " a"},
                                                 {"prompt": "word " * 400, "answer": " b"}])
    expect_error(capsys, ["datasets", "check", str(long), "--model", "tiny", "--no-cache"],
                 r"long\.jsonl: row 2 has 401 tokens, more than the model's context of 256")
    (tmp_path / "adir").mkdir()
    expect_error(capsys, ["datasets", "export", "next_day", "--model", "tiny", "--out", str(tmp_path / "adir")],
                 r"adir: is a directory; --out must be a \.jsonl file path")
    expect_error(capsys, ["datasets", "check", str(_bytes(tmp_path / "b.csv", b"prompt\n\xff\xfe\n")),
                          "--model", "tiny"], r"b\.csv: line 2, column 1: byte 0xff is not valid UTF-8")


# ------------------------------------------------------- damaged and hostile stores
def _outside_copy(s: Path, hook: str) -> Path:
    """A valid .npy next to (outside) the store, so following the path would 'work'."""
    out = s.parent / "outside.npy"
    shutil.copy(s / "tensors" / f"{hook}.npy", out)
    return out


def _traverse(s: Path, hook: str, name: str) -> None:
    def edit(m):
        for t in m["tensors"]:
            if t["hook"] == hook:
                t["file"] = name
    edit_manifest(s, edit)


def _symlink_out(s: Path, hook: str) -> None:
    target = _outside_copy(s, hook)
    (s / "tensors" / f"{hook}.npy").unlink()
    (s / "tensors" / f"{hook}.npy").symlink_to(target)


HOOK = "blocks.1.hook_resid_post"


def _flip(s: Path) -> None:
    f = s / "tensors" / f"{HOOK}.npy"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def _tensor(s: Path) -> Path:
    return s / "tensors" / f"{HOOK}.npy"


def _set_tensor0(**fields):
    return lambda s: edit_manifest(s, lambda m: m["tensors"][0].update(**fields))


T = re.escape(HOOK)
STORE_DAMAGE = {
    # name: (damage(store), what the one error line must say)
    "no-manifest": (lambda s: (s / "manifest.json").unlink(), r"not an activation store \(no manifest\.json\)"),
    "manifest-bad-json": (lambda s: (s / "manifest.json").write_text("{not json"),
                          r"manifest\.json: unreadable manifest \(invalid JSON"),
    "manifest-not-utf8": (lambda s: (s / "manifest.json").write_bytes(b'{"a": "\xff"}'),
                          r"manifest\.json: line 1.*not valid UTF-8"),
    "manifest-wrong-types": (lambda s: edit_manifest(s, lambda m: m.update(tensors={"a": 1})),
                             r"malformed manifest.*tensors"),
    "manifest-bad-shape": (_set_tensor0(shape=[1, 2, 3]), r"malformed manifest.*shape"),
    "manifest-object-dtype": (_set_tensor0(dtype="object"), r"malformed manifest.*dtype"),
    "tensor-truncated": (lambda s: _tensor(s).write_bytes(_tensor(s).read_bytes()[:-64]), rf"{T}\.npy: truncated"),
    "tensor-missing": (lambda s: _tensor(s).unlink(), rf"{T}\.npy: tensor file is missing"),
    "tensor-bad-header": (lambda s: _overwrite(_tensor(s), 0, b"\x00\x00"), r"corrupted \.npy header"),
    "index-missing": (lambda s: (s / "index.parquet").unlink(), r"index\.parquet: index file is missing"),
    "traversal-dotdot": (lambda s: (_outside_copy(s, HOOK), _traverse(s, HOOK, "../outside.npy")),
                         r"'\.\./outside\.npy' points outside the directory"),
    "traversal-absolute": (lambda s: _traverse(s, HOOK, "/etc/passwd"), r"'/etc/passwd' is not a path inside"),
    "traversal-etc-passwd": (lambda s: _traverse(s, HOOK, "../../../../../../../../etc/passwd"),
                             r"points outside the directory"),
    "traversal-symlink": (lambda s: _symlink_out(s, HOOK), r"points outside the directory"),
    "traversal-index": (lambda s: edit_manifest(s, lambda m: m["index"].update(file="../../index.parquet")),
                        r"index file .* points outside"),
}


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


READERS = {
    "store-info": lambda s: ["store", "info", str(s)],
    "store-verify": lambda s: ["store", "verify", str(s)],
    "probe-train": lambda s: ["probe", "train", "--store", str(s), "--label", "superclass",
                              "--split-by", "template", "--no-erase", "--out", str(s.parent / "run")],
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_damaged_store(damage, stores, tmp_path, capsys):
    """Every reader refuses a damaged or hostile store with one line naming the file."""
    s = copy_store(stores["tiny"], tmp_path / "s")
    make, match = STORE_DAMAGE[damage]
    make(s)
    every = damage.startswith(("traversal", "manifest-wrong"))
    readers = READERS if every else {"store-info": READERS["store-info"]}
    for name, reader in readers.items():
        line = expect_error(capsys, reader(s), match, fresh=tmp_path / "run")
        assert "passwd" not in line or "traversal" in damage, (name, line)


def test_store_dir_missing_or_a_file(tmp_path, capsys):
    expect_error(capsys, ["store", "info", str(tmp_path / "nowhere")], r"no such store directory")
    (tmp_path / "f").write_text("x")
    expect_error(capsys, ["store", "info", str(tmp_path / "f")], r"is a file, not an activation store")


def test_flipped_bytes_and_verify_everywhere(stores, tmp_path, capsys):
    """Flipped bytes keep sizes and headers: plain reads cannot see them, --verify on every
    reading command does (store info, probe train, probe apply, plot)."""
    s = copy_store(stores["tiny"], tmp_path / "s")
    _flip(s)
    assert run_cli(["store", "info", str(s)], capsys)[0] == 0
    bad = rf"{re.escape(HOOK)}\.npy: checksum mismatch"
    expect_error(capsys, ["store", "verify", str(s)], bad)
    expect_error(capsys, ["store", "info", str(s), "--verify"], bad)
    expect_error(capsys, [*READERS["probe-train"](s), "--verify"], bad, fresh=tmp_path / "run")
    expect_error(capsys, ["plot", "pca", "--store", str(s), "--color", "superclass", "--verify",
                          "--out", str(tmp_path / "geo")], bad)


def test_corrupt_index(stores, tmp_path, capsys):
    s = copy_store(stores["tiny"], tmp_path / "s")
    (s / "index.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    reseal(s)
    expect_error(capsys, READERS["probe-train"](s), r"index\.parquet: unreadable index", fresh=tmp_path / "run")


# ------------------------------------------------------------------- NaN and inf
@pytest.mark.parametrize("args", [
    pytest.param(["probe", "train", "--label", "label"], id="probe-train-leace"),
    pytest.param(["probe", "train", "--label", "label", "--no-erase"], id="probe-train-no-erase"),
    pytest.param(["plot", "pca", "--color", "label"], id="plot-pca"),
    pytest.param(["plot", "cosine", "--color", "label"], id="plot-cosine"),
    pytest.param(["store", "verify"], id="store-verify"),
])
def test_nonfinite_store(args, stores, tmp_path, capsys):
    """NaN (or inf) activations with valid checksums: refused, naming the hook and the rows."""
    s = copy_store(stores["syn"], tmp_path / "s")
    poison(s, "blocks.1.hook_resid_post", [3, 17], np.nan)
    poison(s, "blocks.0.hook_resid_post", [5], np.inf)
    if args[0] == "store":
        full = [*args, str(s)]
    else:
        full = [*args, "--store", str(s), "--out", str(tmp_path / "run")]
    line = expect_error(capsys, full, r"blocks\.[01]\.hook_resid_post.*NaN or inf.*rows? [0-9]",
                        fresh=tmp_path / "run")
    assert "rows 3, 17" in line or "row 5" in line


def test_nonfinite_probe_apply(stores, tmp_path, capsys):
    s = stores["syn"]
    assert run_cli(["probe", "train", "--store", str(s), "--label", "label", "--no-erase",
                    "--no-controls", "--out", str(tmp_path / "run")], capsys)[0] == 0
    bad = copy_store(s, tmp_path / "bad")
    poison(bad, "blocks.1.hook_resid_post", [0], -np.inf)
    expect_error(capsys, ["probe", "apply", "--probe", str(tmp_path / "run"), "--store", str(bad)],
                 r"blocks\.1\.hook_resid_post.*NaN or inf.*row 0")


# -------------------------------------------------------------------- probe inputs
def _one_row_per_class(tmp):
    from replab.store.synthetic import write_synthetic_store

    write_synthetic_store(tmp / "three", n_rows=3, d=4, n_layers=1, n_classes=3, n_templates=1)
    return tmp / "three"


PROBE_CASES = {
    "unknown-label": (["--label", "nope"], r"label column 'nope' is not in the store"),
    "unknown-split-column": (["--label", "label", "--split-by", "nope"],
                             r"--split-by 'nope'.*choose another with --split-by COLUMN"),
    "one-group": (["--label", "label", "--split-by", "template", "--where", "template == 'template0'"],
                  r"at least 2 groups; the split column 'template' has 1; choose another with --split-by"),
    "layer-not-stored": (["--label", "label", "--layers", "7"], r"layer 7"),
    "folds-1": (["--label", "label", "--folds", "1"], r"--folds"),
    "unknown-kind": (["--label", "label", "--kind", "svm"], r"svm"),
    "rank-0": (["--label", "label", "--rank", "0"], r"rank"),
    "bad-where": (["--label", "label", "--where", "nope =="], r"bad --where query"),
    "unknown-hook": (["--label", "label", "--hook", "mlp_out"], r"no 'mlp_out' hooks"),
}


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_probe_input(case, stores, tmp_path, capsys):
    extra, match = PROBE_CASES[case]
    expect_error(capsys, ["probe", "train", "--store", str(stores["syn"]), *extra,
                          "--out", str(tmp_path / "run")], match, fresh=tmp_path / "run")


def test_one_row_per_class_split_by_row_is_an_error(tmp_path, capsys):
    """Before: accuracy 0.000 and a 'best layer'. Each class is only ever in its own test fold."""
    s = _one_row_per_class(tmp_path)
    expect_error(capsys, ["probe", "train", "--store", str(s), "--label", "label", "--split-by", "row",
                          "--out", str(tmp_path / "run")],
                 r"class 'class\d' cannot be scored: its 1 row\(s\) lie in 1 group\(s\) of the split column 'row'",
                 fresh=tmp_path / "run")


def test_probe_out_is_a_file(stores, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    expect_error(capsys, ["probe", "train", "--store", str(stores["syn"]), "--label", "label",
                          "--no-erase", "--no-controls", "--layers", "1", "--out", str(tmp_path / "f")],
                 r"is a file, not a directory")


def test_probe_apply_inputs(stores, tmp_path, capsys):
    expect_error(capsys, ["probe", "apply", "--probe", str(tmp_path / "nope"), "--store", str(stores["syn"])],
                 r"nope.*missing")
    run = tmp_path / "run"
    assert run_cli(["probe", "train", "--store", str(stores["syn"]), "--label", "label", "--no-erase",
                    "--no-controls", "--out", str(run)], capsys)[0] == 0
    weights = run / "probes" / "logistic.safetensors"
    shutil.copy(weights, tmp_path / "elsewhere.safetensors")
    weights.unlink()
    weights.symlink_to(tmp_path / "elsewhere.safetensors")
    expect_error(capsys, ["probe", "apply", "--probe", str(run), "--store", str(stores["syn"])],
                 r"logistic\.safetensors' points outside the directory")


# -------------------------------------------------------------------- patch inputs
def _pairs(tmp, rows):
    return write_jsonl(tmp / "pairs.jsonl", rows)


PAIR = {"prompt": "Today it is Monday so tomorrow it is", "answer": " Tuesday",
        "corrupt_prompt": "Today it is Friday so tomorrow it is", "corrupt_answer": " Saturday"}
PATCH_CASES = {
    "no-corrupt-prompt": ([{"prompt": "Today it is Monday so tomorrow it is", "answer": " Tuesday"}], [],
                          r"no row has a corrupt_prompt; patching needs clean/corrupt pairs"),
    "different-lengths": ([{**PAIR, "corrupt_prompt": "Today, as everyone knows, it is Friday so tomorrow it is"}],
                          [], r"token length"),
    "answer-equals-foil": ([{**PAIR, "corrupt_answer": " Tuesday"}], [], r"same"),
    "unknown-metric": ([PAIR], ["--metric", "nope"], r"nope"),
    "unknown-site": ([PAIR], ["--site", "nope"], r"nope"),
    "head-out-of-range": ([PAIR], ["--site", "z", "--by", "layer,head", "--heads", "99"], r"99"),
    "position-out-of-range": ([PAIR], ["--positions", "99"], r"99"),
}


@pytest.mark.parametrize("case", list(PATCH_CASES))
def test_patch_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows, extra, match = PATCH_CASES[case]
    data = _pairs(tmp_path, rows)
    expect_error(capsys, ["patch", "sweep", "--model", "tiny", "--dataset", str(data), "--layers", "0",
                          *extra, "--out", str(tmp_path / "run")], match, fresh=tmp_path / "run")


# ------------------------------------------------- concurrency, Ctrl-C and kill -9
def _slow_harvest(out: Path, data: Path, delay: float = 1.0):
    env = {**os.environ, "REPLAB_TEST_BATCH_DELAY": str(delay)}
    cmd = [sys.executable, "-m", "replab", "harvest", "--model", "tiny", "--dataset", str(data),
           "--batch-size", "1", "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cmd


def _wait_batches(proc, out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if json.loads((out / "_progress.json").read_text())["batches_done"] >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError("the harvest did not get going")


@pytest.mark.slow
def test_concurrent_writers_sigint_and_sigkill(stores, tmp_path, capsys):
    """Two harvests into one --out: the second gets one line saying a harvest is running
    there (and readers say the same). Ctrl-C: exit 130 and 'interrupted; rerun the same
    command to resume'. kill -9: readers say interrupted. Neither leaves a complete-looking
    directory, and rerunning the command finishes the store."""
    data = stores["people"]
    a, b = tmp_path / "a", tmp_path / "b"
    pa, cmd_a = _slow_harvest(a, data)
    pb, _ = _slow_harvest(b, data)
    try:
        _wait_batches(pa, a, 2)
        args, _ = _harvest(tmp_path, data, "--batch-size", "1", out=a)
        expect_error(capsys, args, r"a harvest is already running into this directory \(pid \d+\)", fresh=a)
        expect_error(capsys, ["store", "info", str(a)], r"a harvest is running into this directory")
        pa.send_signal(signal.SIGINT)
        _, err = pa.communicate(timeout=60)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert pa.returncode == 130 and errors == ["error: interrupted; rerun the same command to resume"], err
        assert "Traceback" not in err and not looks_complete(a)

        _wait_batches(pb, b, 2)
        pb.kill()
        pb.wait()
        assert not looks_complete(b)
        expect_error(capsys, ["store", "info", str(b)], r"harvest was interrupted.*rerun the same harvest command")
        expect_error(capsys, ["probe", "train", "--store", str(b), "--label", "superclass"],
                     r"harvest was interrupted")
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
                p.wait()
    for out in (a, b):          # rerunning the same command resumes and finishes
        args, _ = _harvest(tmp_path, data, "--batch-size", "1", out=out)
        assert run_cli(args, capsys)[0] == 0
        assert run_cli(["store", "verify", str(out)], capsys)[0] == 0
