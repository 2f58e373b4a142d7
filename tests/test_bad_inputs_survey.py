"""Bad-input table for the survey and CSV-security half of issue 16: each row is a console-script call (run
in-process through `opd.config.cli_main`), the exit code and words its one-line stderr must hold, and the
promise that every file under the test folder is byte-identical afterwards (nothing written, nothing lost).

Self-contained harness with the shape of tests/test_bad_inputs.py (rows: command, argv, exit code, words);
a row's `setup` breaks one input in a fresh copy of a prepared survey folder before the files are hashed."""
import hashlib, shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pytest

from opd.compare import make_grids
from opd.config import QualtricsConfig, cli_main
from opd.qualtrics import EMBEDDED_FIELD, analyze_main, export_main, export_survey, make_fake_responses
from opd.samples import make_fake_eval_run, read_csv, write_csv

def grids_main(argv):
    "`make_grids` (the pipeline's grids step) as a console-script-like call: argv = [RUN_DIR]."
    cli_main(lambda a: make_grids(a[0]), argv)

@dataclass
class Row:
    id: str
    main: Callable                      # a console-script function (argv → exit via cli_main)
    argv: list                          # '{name}' placeholders: paths of the prepared folder
    code: int                           # expected exit code
    words: tuple                        # each must appear in stderr
    setup: Optional[Callable] = None    # (folder, paths) → None: break one input before hashing
    absent: tuple = ()                  # words that must NOT appear in stderr (e.g. a password)

def tree_hash(d: Path) -> dict:
    "sha256 of every file (and symlink target) under `d`, by relative path."
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_symlink(): out[rel] = "->" + str(p.readlink())
        elif p.is_file(): out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    "A fake evaluated run with the survey of seed 0 and of seed 1 exported, their responses, and an image-URL map."
    t = tmp_path_factory.mktemp("survey-template")
    run = make_fake_eval_run(t / "tiny-fake", n_prompts=3, seeds=(0,))
    ex0 = export_survey(run, QualtricsConfig(), seed=0)
    ex1 = export_survey(run, QualtricsConfig(), seed=1)
    make_fake_responses(ex0.key_csv, t / "resp0.csv", n_participants=12, n_inattentive=1, n_unfinished=0, seed=0)
    make_fake_responses(ex1.key_csv, t / "resp1.csv", n_participants=12, n_inattentive=1, n_unfinished=0, seed=0)
    names = sorted(p.name for p in ex0.images.iterdir())
    pd.DataFrame(dict(image=names, url=[f"https://acme.qualtrics.com/ControlPanel/Graphic.php?IM=IM_{i}" for i in range(len(names))])).to_csv(t / "urls.csv", index=False)
    rel = lambda p: Path(p).relative_to(t).as_posix()
    return t, dict(run=rel(run), key0=rel(ex0.key_csv), key1=rel(ex1.key_csv), resp0="resp0.csv", resp1="resp1.csv", urls="urls.csv")

def _samples(path_value):
    def setup(d, P):
        f = d / P["run"] / "eval" / "samples.csv"
        s = read_csv(f); s.loc[0, "image_path"] = path_value(d, P) if callable(path_value) else path_value; write_csv(f, s)
    return setup

def _symlink(d, P):
    (d / "secret.png").write_bytes(b"not for the survey")
    f = d / P["run"] / "eval" / "samples.csv"
    img = d / P["run"] / read_csv(f).image_path[0]
    img.unlink(); img.symlink_to(d / "secret.png")

def _urls(**change):
    def setup(d, P):
        m = pd.read_csv(d / P["urls"], dtype=str)
        for k, v in change.items(): m.loc[0, k] = v
        m.to_csv(d / P["urls"], index=False)
    return setup

def _urls_short(d, P): pd.read_csv(d / P["urls"], dtype=str).iloc[1:].to_csv(d / P["urls"], index=False)

def _resp(fn):
    def setup(d, P):
        raw = pd.read_csv(d / P["resp0"], dtype=str, header=None, keep_default_na=False)
        fn(raw); raw.to_csv(d / P["resp0"], index=False, header=False)
    return setup

def _no_ed(raw): del raw[raw.columns[-1]]
def _choice(raw): raw.iloc[3, raw.iloc[0].tolist().index("Q001")] = "Image C"
def _all_preview(raw): raw.iloc[3:, raw.iloc[0].tolist().index("Status")] = "Survey Preview"
def _offline_preview(raw): raw.iloc[3:, raw.iloc[0].tolist().index("Status")] = "Offline Survey Preview"
def _key_export_id(d, P):
    f = d / P["key0"]; k = read_csv(f); k.loc[2, "export_id"] = "0" * 16; write_csv(f, k)

EXPORT = lambda *a: ["--stage", "tiny", "--run-dir", "{run}", *a]
ANALYZE = lambda resp="{resp0}", key="{key0}", *a: ["--responses", resp, "--key", key, "--out", "{run}/analysis-out", *a]

ROWS = [
    # samples.csv: every image path confined to the run (export and grids)
    Row("samples-dotdot", export_main, EXPORT(), 2, ("samples.csv row 1 image_path='../../outside.png' is not allowed", "stays inside"), _samples("../../outside.png")),
    Row("samples-absolute", export_main, EXPORT(), 2, ("row 1 image_path=", "no absolute path"), _samples(lambda d, P: str(d / "secret.png"))),
    Row("samples-symlink", export_main, EXPORT(), 2, ("row 1 image_path=", "no symlink leaving the run"), _symlink),
    Row("samples-backslash", export_main, EXPORT(), 2, ("row 1 image_path='..\\\\x.png'",), _samples("..\\x.png")),
    Row("grids-dotdot", grids_main, ["{run}"], 2, ("samples.csv row 1 image_path='../../outside.png' is not allowed",), _samples("../../outside.png")),
    Row("grids-symlink", grids_main, ["{run}"], 2, ("row 1 image_path=", "symlink"), _symlink),
    # qualtrics.base_url: https, no credentials, no query; refused when the config is read
    Row("base-url-http", export_main, EXPORT("--set", "qualtrics.base_url=http://cdn.example.com/s"), 2, ("qualtrics.base_url='http://cdn.example.com/s'", "mixed content")),
    Row("base-url-credentials", export_main, EXPORT("--set", "qualtrics.base_url=https://bob:hunter2@cdn.example.com/s"), 2,
        ("qualtrics.base_url='https://***@cdn.example.com/s'", "user:password@"), absent=("hunter2", "bob")),
    Row("base-url-query", export_main, EXPORT("--set", "qualtrics.base_url=https://cdn.example.com/s?token=1"), 2, ("without ?query",)),
    Row("base-url-no-scheme", export_main, EXPORT("--set", "qualtrics.base_url=cdn.example.com/s"), 2, ("qualtrics.base_url=", "https://")),
    Row("base-url-reveals", export_main, EXPORT("--set", "qualtrics.base_url=https://cdn.example.com/distilled"), 2, ("contains 'distill'",)),
    # --image-urls: a map of public/images/ files to https URLs, complete
    Row("image-urls-missing-file", export_main, EXPORT("--image-urls", "{run}/nope.csv"), 2, ("--image-urls=", "no such file")),
    Row("image-urls-path", export_main, EXPORT("--image-urls", "{urls}"), 2, ("--image-urls row 1 image='../../private/key.csv'", "no folders"), _urls(image="../../private/key.csv")),
    Row("image-urls-http", export_main, EXPORT("--image-urls", "{urls}"), 2, ("--image-urls row 1 url=", "mixed content"), _urls(url="http://cdn.example.com/a.png")),
    Row("image-urls-credentials", export_main, EXPORT("--image-urls", "{urls}"), 2, ("user:password@",), _urls(url="https://me:s3cret@cdn.example.com/a.png"), absent=("s3cret",)),
    Row("image-urls-incomplete", export_main, EXPORT("--image-urls", "{urls}"), 2, ("--image-urls: no URL for public/images/",), _urls_short),
    Row("image-urls-no-columns", export_main, EXPORT("--image-urls", "{resp0}"), 2, ("no image,url rows",)),
    # opd-analyze-survey: the export id ties responses to their key
    Row("analyze-other-seed-key", analyze_main, ANALYZE(key="{key1}"), 2, ("carry export id", "the key's is", "another export")),
    Row("analyze-other-seed-responses", analyze_main, ANALYZE(resp="{resp1}"), 2, ("carry export id",)),
    Row("analyze-no-export-id", analyze_main, ANALYZE(), 2, (f"no {EMBEDDED_FIELD} column",), _resp(_no_ed)),
    Row("analyze-key-edited", analyze_main, ANALYZE(), 2, ("--key row 3 export_id='0000000000000000'",), _key_export_id),
    Row("analyze-bad-choice", analyze_main, ANALYZE(), 2, ("Q001='Image C' is not allowed", "URL of one of its two images"), _resp(_choice)),
    Row("analyze-only-previews", analyze_main, ANALYZE(), 2, ("no kept response", "'preview': 13"), _resp(_all_preview)),
    Row("analyze-only-offline-previews", analyze_main, ANALYZE(), 2, ("no kept response", "'preview': 13"), _resp(_offline_preview)),
    Row("analyze-samples-as-key", analyze_main, ANALYZE(key="{run}/eval/samples.csv"), 2, ("missing column 'question_id'",)),
]

@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, template, tmp_path, capsys):
    src, P = template
    d = tmp_path / "t"; shutil.copytree(src, d, symlinks=True)
    if row.setup: row.setup(d, P)
    argv = [a.format(**{k: str(d / v) for k, v in P.items()}) for a in row.argv]
    before = tree_hash(d)
    try: row.main(argv); code = 0
    except SystemExit as e: code = e.code
    err = capsys.readouterr().err.strip()
    assert code == row.code, (code, err)
    if row.code == 2: assert err.startswith("error: ") and "\n" not in err, err
    for w in row.words: assert w in err, (w, err)
    for w in row.absent: assert w not in err, (w, err)
    assert tree_hash(d) == before, "a refused command changed files"

def test_table_covers_every_rule():
    "At least 12 rows, and every rule of this half has at least one."
    assert len(ROWS) >= 12
    for prefix in ("samples-", "grids-", "base-url-", "image-urls-", "analyze-other-seed", "analyze-no-export-id", "analyze-only"):
        assert any(r.id.startswith(prefix) for r in ROWS), prefix
