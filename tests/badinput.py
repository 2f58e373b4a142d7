"""The bad-input table's harness, shared by every `test_bad_inputs*.py`.

A row (`Case`) is: the command line (console script + args), the expected exit code, words the stderr must
contain, and the paths whose files (bytes and mtimes) and folders must be the same before and after.
Placeholders in args and paths: `{tmp}` the row's own empty folder, `{copy}` the row's copy of a finished
tiny run (made by `setup`), `{nbs}` the checkout's nbs/. Rows run in-process through the script's `main`
(`cli_main` turns failures into one line + SystemExit), or as a real subprocess with `proc=True`.
"""
from __future__ import annotations
import contextlib, hashlib, io, os, subprocess, sys, warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@dataclass
class Case:
    argv: list                     # ["opd-distill", "--set", "train.lr=inf", ...]
    code: int                      # expected exit code
    words: tuple = ()              # substrings of stderr
    watch: tuple = ("{tmp}",)      # paths that must be unchanged (files: bytes + mtime; folders: their listing)
    setup: Optional[Callable] = None   # setup(tmp: Path, run: Path) before the snapshot
    proc: bool = False             # run as a real subprocess
    one_line: bool = True          # stderr (minus warnings) is one line, no traceback
    id: str = ""

    def __post_init__(self):
        self.id = self.id or " ".join(self.argv)[:80]


def _main(script: str) -> Callable:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    return ep.load()


def fill(s: str, tmp: Path, run: Optional[Path]) -> str:
    return s.format(tmp=tmp, copy=tmp / "run", run=run, nbs=ROOT / "nbs")


def snapshot(paths) -> dict:
    "Every file under `paths` with its sha256 and mtime, every folder with its listing; absent paths as None."
    out = {}
    for p in map(Path, paths):
        if not p.exists(): out[str(p)] = None; continue
        for q in ([p] if p.is_file() else [p, *sorted(p.rglob("*"))]):
            if q.is_dir(): out[str(q)] = ("dir", tuple(sorted(x.name for x in q.iterdir())))
            elif q.is_file(): out[str(q)] = (hashlib.sha256(q.read_bytes()).hexdigest(), q.stat().st_mtime_ns)
    return out


def run_case(case: Case, tmp: Path, run: Optional[Path] = None, timeout: int = 300) -> tuple[int, str]:
    "Run the row; returns (exit code, stderr)."
    argv = [fill(a, tmp, run) for a in case.argv]
    if case.proc:
        r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)
        return r.returncode, r.stderr
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("always")            # printed to stderr, as a console script prints them (not to pytest's recorder)
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))
        try: code = _main(argv[0])(argv[1:]); code = 0 if code is None else code
        except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, err.getvalue()


def check_case(case: Case, tmp: Path, run: Optional[Path] = None):
    "The whole contract of one row: exit code, words, one line, nothing changed under `watch`."
    tmp.mkdir(parents=True, exist_ok=True)
    if case.setup: case.setup(tmp, run)
    watch = [fill(w, tmp, run) for w in case.watch]
    before = snapshot(watch)
    code, err = run_case(case, tmp, run)
    assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{err[-3000:]}"
    for w in case.words: assert w in err, f"{w!r} not in stderr:\n{err[-3000:]}"
    if case.one_line and case.code != 0:
        assert "Traceback" not in err, err[-3000:]
        lines = [l for l in err.splitlines() if l.strip() and "Warning" not in l and not l.startswith("  ")]
        assert len(lines) == 1, f"{len(lines)} lines:\n{err[-3000:]}"
    after = snapshot(watch)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed: {changed[:10]}"
    return code, err
