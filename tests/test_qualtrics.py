"""Integration tests for `opd-export-qualtrics` and `opd-analyze-survey` on a synthetic evaluated run:
blinding, integrity, counterbalancing, reproducibility, and one-line errors that write nothing."""
import csv, json, re, shutil, subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from opd.config import QualtricsConfig, latest_dir
from opd.qualtrics import (AdvancedFormatError, SURVEY_COLUMNS, TXT_NAME, analyze_main, binom_interval, check_export,
                           export_main, export_survey, html_text, make_fake_eval_run, make_fake_responses,
                           parse_advanced_format, survey_key, wilson)

CONDITION_WORDS = ("before", "after", "teacher", "student", "distill", "baseline", "random:tiny", "tiny-student")

def run(exe, *args, cwd=None):
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=120)

def tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}

def exit_2_one_line(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e: fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err

@pytest.fixture
def fake_run(tmp_path):
    return make_fake_eval_run(tmp_path / "tiny-fake", n_prompts=6, seeds=(0, 1))

def test_export_cli_blinded_and_complete(fake_run, tmp_path):
    r = run("opd-export-qualtrics", "--stage", "tiny", "--run-dir", str(fake_run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = latest_dir(fake_run, "survey")
    assert s.parent == fake_run / "survey" and s.name == survey_key(fake_run, QualtricsConfig(), 0)
    assert r.stdout.split() == [str(s / "survey.csv"), str(s / "private" / "key.csv"), str(s / "private" / "manifest.json"),
                                str(s / "public" / TXT_NAME), str(s / "public" / "images")]
    rep = check_export(fake_run)
    assert rep["comparisons"] == 12 and rep["attention_checks"] == 2
    # survey.csv: exactly the contract columns; every referenced image exists
    sv = pd.read_csv(s / "survey.csv", dtype=str, keep_default_na=False)
    assert tuple(sv.columns) == SURVEY_COLUMNS
    assert set(sv.randomized_label) == {"A", "B"}
    for p in pd.concat([sv.image_a_path, sv.image_b_path]): assert (fake_run / p).is_file()
    # independent blinding scan of everything public: names, texts (prompts removed), PNG metadata
    key = pd.read_csv(s / "private" / "key.csv", dtype=str, keep_default_na=False)
    prompts = [html_text(t) for t in key.prompt_text if t]
    for p in (s / "public").rglob("*"):
        rel = p.relative_to(s).as_posix().lower()
        assert not any(w in rel for w in CONDITION_WORDS + ("private", "key")), rel
        if p.suffix == ".png":
            assert re.fullmatch(r"[0-9a-f]{16}\.png", p.name)
            with Image.open(p) as im: assert not im.info and not getattr(im, "text", {}), (p, im.info)
        elif p.is_file():
            text = p.read_text()
            for t in sorted(prompts, key=len, reverse=True): text = text.replace(t, " ")
            assert not any(w in text.lower() for w in CONDITION_WORDS + ("key.csv", "private")), p
            assert "https://example.org/opd-study/" in text
    # the Advanced Format file parses strictly; IDs are opaque
    qs = [q for b in parse_advanced_format((s / "public" / TXT_NAME).read_text()) for q in b["questions"]]
    assert qs[0]["type"] == "Text" and all(q["type"] == "MC:SingleAnswer:Horizontal" and len(q["choices"]) == 2 for q in qs[1:])
    assert [q["id"] for q in qs[1:]] == [f"Q{i:03d}" for i in range(1, 15)]

def test_run_id_resolves_and_reexport_is_idempotent(tmp_path):
    rd = make_fake_eval_run(tmp_path / "outputs" / "runs" / "tiny-abc12345", n_prompts=3, seeds=(0,))
    r = run("opd-export-qualtrics", "--stage", "tiny", "--run-id", "tiny-abc12345", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = latest_dir(rd, "survey")
    before = tree(first)
    r2 = run("opd-export-qualtrics", "--stage", "tiny", "--run-id", "tiny-abc12345", cwd=tmp_path)
    assert r2.returncode == 0 and "unchanged" in r2.stderr, r2.stderr
    # other settings: a new export beside the first (never over it), and survey/LATEST names the new one
    r3 = run("opd-export-qualtrics", "--stage", "tiny", "--run-id", "tiny-abc12345", "--set", "seed=1", cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr
    assert tree(first) == before and latest_dir(rd, "survey") not in (first, rd / "survey")
    assert sorted(p.name for p in (rd / "survey").iterdir()) == sorted(["LATEST", first.name, latest_dir(rd, "survey").name])

def test_same_seed_identical_files_other_seed_differs(tmp_path):
    a = make_fake_eval_run(tmp_path / "a" / "tiny-x"); b = make_fake_eval_run(tmp_path / "b" / "tiny-x"); c = make_fake_eval_run(tmp_path / "c" / "tiny-x")
    export_survey(a, QualtricsConfig(), seed=7); export_survey(b, QualtricsConfig(), seed=7); export_survey(c, QualtricsConfig(), seed=8)
    assert tree(a / "survey") == tree(b / "survey")
    ka, kc = (pd.read_csv(latest_dir(d, "survey") / "private" / "key.csv") for d in (a, c))
    assert ka.prompt_id.tolist() != kc.prompt_id.tolist() or ka.distilled_slot.tolist() != kc.distilled_slot.tolist()

def test_balance_and_teacher_arm(tmp_path):
    rd = make_fake_eval_run(tmp_path / "tiny-big", n_prompts=30, seeds=(0, 1))
    ex = export_survey(rd, QualtricsConfig(teacher_arm=True, max_questions=60, attention_checks=4), seed=3)
    rep = check_export(rd)
    assert ex.questions == {"after_vs_before": 30, "after_vs_teacher": 30, "attention_check": 4}
    key = pd.read_csv(ex.key_csv, dtype=str, keep_default_na=False)
    for cond in ("after_vs_before", "after_vs_teacher"):
        sl = key.loc[key.condition == cond, "distilled_slot"]
        lo, hi = binom_interval(len(sl), 0.5, 0.99)
        assert lo <= (sl == "A").sum() <= hi and rep["balance"][cond]["n"] == 30
        arms = set(zip(key.loc[key.condition == cond, "arm_a"], key.loc[key.condition == cond, "arm_b"]))
        assert arms == ({("after", "before"), ("before", "after")} if cond == "after_vs_before" else {("after", "teacher"), ("teacher", "after")})
    comp = key[key.condition != "attention_check"]
    srcs = comp.source_a.tolist() + comp.source_b.tolist()
    assert len(srcs) == len(set(srcs))                       # no image shown twice
    assert key.condition.iloc[0] != "attention_check"       # never start with a check
    # the questions are not grouped by condition (shuffled order)
    first_half = comp.condition.iloc[:30]
    assert 5 < (first_half == "after_vs_teacher").sum() < 25

def test_strict_parser_rejects_broken_exports(fake_run):
    export_survey(fake_run, QualtricsConfig(), seed=0)
    txt = (latest_dir(fake_run, "survey") / "public" / TXT_NAME).read_text()
    assert parse_advanced_format(txt)
    for bad, why in [(txt.replace("[[PageBreak]]", "[[Pagebreak]]", 1), "unknown tag"),
                     (txt.replace("[[Choices]]\n", "", 1), "missing [[Choices]]"),
                     (txt.replace("[[ID:Q002]]", "[[ID:Q001]]"), "duplicate ID"),
                     (txt.replace("[[AdvancedFormat]]\n", ""), "[[AdvancedFormat]]")]:
        with pytest.raises(AdvancedFormatError, match=re.escape(why)): parse_advanced_format(bad)

def _no_eval(tmp_path):
    d = tmp_path / "tiny-empty"; d.mkdir(); return d

def _no_teacher(tmp_path):
    return make_fake_eval_run(tmp_path / "tiny-nt", n_prompts=2, seeds=(0,), arms=("before", "after"))

def _bad_arm(tmp_path):
    d = make_fake_eval_run(tmp_path / "tiny-ba", n_prompts=2, seeds=(0,))
    s = pd.read_csv(d / "eval" / "samples.csv"); s.loc[2, "arm"] = "distilled"; s.to_csv(d / "eval" / "samples.csv", index=False)
    return d

def _only_before(tmp_path):
    return make_fake_eval_run(tmp_path / "tiny-ob", n_prompts=2, seeds=(0,), arms=("before", "teacher"))

BAD_EXPORTS = [
    (lambda t: t / "missing", [], "--run-dir="),
    (_no_eval, [], "eval/samples.csv: no such file"),
    (_no_teacher, ["--set", "qualtrics.teacher_arm=true"], "qualtrics.teacher_arm=True is not allowed"),
    (_bad_arm, [], "arm='distilled' is not allowed; allowed: teacher, before, after"),
    (_only_before, [], "no (prompt_id, seed) has both"),
    (lambda t: make_fake_eval_run(t / "tiny-u", 2, (0,)), ["--set", "qualtrics.base_url=example.org/x"], "qualtrics.base_url="),
    (lambda t: make_fake_eval_run(t / "tiny-v", 2, (0,)), ["--set", "qualtrics.base_url=https://cdn.org/distilled"], "contains 'distill'"),
]

@pytest.mark.parametrize("make,extra,expect", BAD_EXPORTS)
def test_bad_export_exit_2_nothing_written(tmp_path, capsys, make, extra, expect):
    d = make(tmp_path)
    before = tree(tmp_path)
    err = exit_2_one_line(export_main, ["--stage", "tiny", "--run-dir", str(d), *extra], capsys)
    assert expect in err, err
    assert tree(tmp_path) == before and not (d / "survey").exists()

def test_export_needs_exactly_one_run(capsys):
    assert "--run-id: missing" in exit_2_one_line(export_main, ["--stage", "tiny"], capsys)
    assert "both name the run" in exit_2_one_line(export_main, ["--stage", "tiny", "--run-id", "a", "--run-dir", "b"], capsys)
    assert "--run-id='../a'" in exit_2_one_line(export_main, ["--stage", "tiny", "--run-id", "../a"], capsys)

@pytest.mark.parametrize("numeric", [True, False])
def test_analyze_recovers_known_preference(fake_run, tmp_path, numeric):
    ex = export_survey(fake_run, QualtricsConfig(), seed=0)
    resp = make_fake_responses(ex.key_csv, tmp_path / "resp.csv", n_participants=80, n_inattentive=8, n_unfinished=2,
                               p_distilled=0.7, numeric=numeric, seed=1)
    out = tmp_path / "analysis"
    r = run("opd-analyze-survey", "--responses", str(resp), "--key", str(ex.key_csv), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / n) for n in ("win_rates.csv", "win_rates.md", "win_rates.png", "participants.csv", "summary.json")]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["kept"] == 80 and summ["excluded"] == {"failed attention check": 8, "unfinished": 2}
    w = summ["win_rate"]["after_vs_before"]
    assert w["ci"][0] < 0.7 < w["ci"][1] and w["ci"][1] - w["ci"][0] < 0.12
    tab = pd.read_csv(out / "win_rates.csv")
    assert list(tab.category) == ["all", "automotive", "food", "pets"] and tab.n.iloc[1:].sum() == tab.n.iloc[0]
    lo, hi = wilson(int(tab.wins.iloc[0]), int(tab.n.iloc[0]))
    assert abs(lo - tab.ci_low.iloc[0]) < 1e-12 and abs(hi - tab.ci_high.iloc[0]) < 1e-12
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in (out / "win_rates.md").read_text().splitlines()]
    assert ["after_vs_before", "all", "80"] in [r[:3] for r in rows]
    with Image.open(out / "win_rates.png") as im: assert im.size[0] > 300
    parts = pd.read_csv(out / "participants.csv")
    assert parts.kept.sum() == 80 and (parts.checks_failed[parts.reason == "failed attention check"] > 0).all()

def _resp_cut(resp: Path, dst: Path) -> Path:
    raw = pd.read_csv(resp, dtype=str, header=None, keep_default_na=False); raw.drop(columns=[raw.columns[-2]]).to_csv(dst, index=False, header=False); return dst   # the last question (the last column is opd_export)

def _resp_value(resp: Path, dst: Path) -> Path:
    raw = pd.read_csv(resp, dtype=str, header=None, keep_default_na=False); raw.iloc[3, -2] = "Image C"; raw.to_csv(dst, index=False, header=False); return dst

def test_bad_analysis_exit_2_nothing_written(fake_run, tmp_path, capsys):
    ex = export_survey(fake_run, QualtricsConfig(), seed=0)
    resp = make_fake_responses(ex.key_csv, tmp_path / "resp.csv", seed=0)
    out = tmp_path / "out"
    cases = [
        (["--responses", str(tmp_path / "nope.csv"), "--key", str(ex.key_csv)], "--responses="),
        (["--responses", str(resp), "--key", str(tmp_path / "nokey.csv")], "--key="),
        (["--responses", str(resp), "--key", str(fake_run / "eval" / "samples.csv")], "missing column 'question_id'"),
        (["--responses", str(ex.key_csv), "--key", str(ex.key_csv)], "no ResponseId column"),
        (["--responses", str(_resp_cut(resp, tmp_path / "cut.csv")), "--key", str(ex.key_csv)], "no column 'Q014'"),
        (["--responses", str(_resp_value(resp, tmp_path / "val.csv")), "--key", str(ex.key_csv)], "Q014='Image C' is not allowed"),
        (["--key", str(ex.key_csv)], "--responses: missing"),
    ]
    for argv, expect in cases:
        err = exit_2_one_line(analyze_main, [*argv, "--out", str(out)], capsys)
        assert expect in err, (expect, err)
    assert not out.exists() and not (ex.key_csv.parent / "analysis").exists()

# --- real export layouts (issue 16): by position, any language, statuses, URL choices, export id ----------------

from opd.qualtrics import EMBEDDED_FIELD, read_key, read_qualtrics_csv, score_responses
from opd.samples import read_csv, write_csv

def _export_layouts(resp: Path, d: Path) -> dict:
    "The same responses as a German account exports them, without the ImportId row (legacy: 2 header rows), and with row 1 only."
    raw = pd.read_csv(resp, dtype=str, header=None, keep_default_na=False)
    out = {}
    out["de"] = d / "de.csv"; make = raw.copy(); make.iloc[1, 8] = "Antwort-ID"; make.iloc[1, 2] = "Antworttyp"; make.to_csv(out["de"], index=False, header=False)
    out["two_rows"] = d / "two.csv"; raw.drop(index=2).to_csv(out["two_rows"], index=False, header=False)
    out["one_row"] = d / "one.csv"; raw.drop(index=[1, 2]).to_csv(out["one_row"], index=False, header=False)
    return out

def test_real_export_layouts_read_by_position(fake_run, tmp_path):
    ex = export_survey(fake_run, QualtricsConfig(), seed=0)
    key = read_key(ex.key_csv)
    resp = make_fake_responses(ex.key_csv, tmp_path / "resp.csv", n_participants=30, seed=2)
    base, _ = score_responses(read_qualtrics_csv(resp), key)
    de = make_fake_responses(ex.key_csv, tmp_path / "resp_de.csv", n_participants=30, seed=2, language="DE")
    assert pd.read_csv(de, dtype=str, header=None).iloc[1, 8] == "Antwort-ID"
    layouts = _export_layouts(resp, tmp_path) | {"german_account": de}
    for name, path in layouts.items():
        df = read_qualtrics_csv(path)
        assert len(df) == 30 + 6 + 1, name
        trials, _ = score_responses(df, key)
        assert trials.equals(base), name
    assert [read_qualtrics_csv(layouts[n]).attrs["header_rows"] for n in ("de", "two_rows", "one_row")] == [3, 2, 1]

@pytest.mark.parametrize("choices", ["text", "url", "html"])
def test_choice_formats_decode_like_numeric(fake_run, tmp_path, choices):
    ex = export_survey(fake_run, QualtricsConfig(), seed=0)
    key = read_key(ex.key_csv)
    num, _ = score_responses(read_qualtrics_csv(make_fake_responses(ex.key_csv, tmp_path / "n.csv", seed=3)), key)
    other, _ = score_responses(read_qualtrics_csv(make_fake_responses(ex.key_csv, tmp_path / "o.csv", seed=3, choices=choices)), key)
    assert other.equals(num)

def test_status_codes_keep_only_real_participants(fake_run, tmp_path):
    ex = export_survey(fake_run, QualtricsConfig(), seed=0)
    statuses = ("1", "Survey Preview", "17", "Offline Preview", "Offline Survey Preview", "2", "Survey Test", "8", "9", "12", "40",
                "4", "Imported", "256", "99")
    real = ("16", "Offline", "32", "48")                    # offline app and EX responses are real participants
    resp = make_fake_responses(ex.key_csv, tmp_path / "resp.csv", n_participants=40, n_inattentive=2, n_unfinished=1,
                               numeric=False, statuses=statuses + real, seed=4)
    out = tmp_path / "analysis"
    r = run("opd-analyze-survey", "--responses", str(resp), "--key", str(ex.key_csv), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summ = json.loads((out / "summary.json").read_text())
    assert summ["kept"] == 40 + len(real)
    assert summ["excluded"] == {"preview": 5, "spam": 4, "test": 2, "imported": 2, "failed attention check": 2, "synthetic": 1,
                                "unfinished": 1, "unknown status '99'": 1}
    assert "dropped: 5 preview, 4 spam" in r.stderr and f"kept {40 + len(real)} of {40 + 3 + len(statuses) + len(real)}" in r.stderr
    parts = read_csv(out / "participants.csv")
    assert set(parts.status[parts.reason == "preview"]) == {"1", "Survey Preview", "17", "Offline Preview", "Offline Survey Preview"}

def test_export_id_ties_responses_to_their_key(tmp_path, capsys):
    rd = make_fake_eval_run(tmp_path / "tiny-seeds", n_prompts=6, seeds=(0, 1))
    ex0, ex1 = export_survey(rd, QualtricsConfig(), seed=0), export_survey(rd, QualtricsConfig(), seed=1)
    assert ex0.export_id != ex1.export_id and read_key(ex0.key_csv).question_id.tolist() == read_key(ex1.key_csv).question_id.tolist()
    resp = make_fake_responses(ex0.key_csv, tmp_path / "resp.csv", n_participants=60, p_distilled=0.7, seed=5)
    a = run("opd-analyze-survey", "--responses", str(resp), "--key", str(ex0.key_csv), "--out", str(tmp_path / "ok"))
    assert a.returncode == 0, a.stderr
    err = exit_2_one_line(analyze_main, ["--responses", str(resp), "--key", str(ex1.key_csv), "--out", str(tmp_path / "bad")], capsys)
    assert f"carry export id {ex0.export_id!r}, the key's is {ex1.export_id!r}" in err and not (tmp_path / "bad").exists()
    # the export id in the TXT is the embedded data Qualtrics records, and it is what check_export recomputes
    txt = ex0.txt.read_text()
    assert f"[[ED:{EMBEDDED_FIELD}:{ex0.export_id}]]" in txt and check_export(rd, key=ex0.dir.name)["export_id"] == ex0.export_id

def test_image_urls_export_and_analysis(fake_run, tmp_path):
    r = run("opd-export-qualtrics", "--stage", "tiny", "--run-dir", str(fake_run), cwd=tmp_path)
    assert r.returncode == 0 and "WARNING: qualtrics.base_url is the placeholder" in r.stderr, r.stderr
    first = latest_dir(fake_run, "survey")
    names = sorted(p.name for p in (first / "public" / "images").iterdir())
    urls = tmp_path / "urls.csv"
    pd.DataFrame(dict(image=names, url=[f"https://acme.qualtrics.com/ControlPanel/Graphic.php?IM=IM_{i:08d}" for i in range(len(names))])).to_csv(urls, index=False)
    r2 = run("opd-export-qualtrics", "--stage", "tiny", "--run-dir", str(fake_run), "--image-urls", str(urls), cwd=tmp_path)
    assert r2.returncode == 0 and "WARNING" not in r2.stderr, r2.stderr
    second = latest_dir(fake_run, "survey")
    assert second != first and tree(first)                    # a new export beside the first, which is kept
    rep = check_export(fake_run)
    key = read_key(second / "private" / "key.csv")
    assert key.url_a.str.startswith("https://acme.qualtrics.com/ControlPanel/Graphic.php?IM=IM_").all() and rep["export_id"] == key.export_id[0]
    assert "https://example.org" not in (second / "public" / TXT_NAME).read_text()
    resp = make_fake_responses(key, tmp_path / "resp.csv", choices="url", seed=6)
    r3 = run("opd-analyze-survey", "--responses", str(resp), "--key", str(second / "private" / "key.csv"), "--out", str(tmp_path / "a"))
    assert r3.returncode == 0, r3.stderr

def test_csv_cells_formula_safe_and_exact(tmp_path):
    rd = make_fake_eval_run(tmp_path / "tiny-formula", n_prompts=3, seeds=(0,))
    s = read_csv(rd / "eval" / "samples.csv")
    evil = {"p0000": '=HYPERLINK("http://evil.example/x","click")', "p0001": "+cmd|' /C calc'!A0", "p0002": "@SUM(1)"}
    s["prompt"] = s.prompt_id.map(evil); write_csv(rd / "eval" / "samples.csv", s)
    ex = export_survey(rd, QualtricsConfig(), seed=0)
    for f in (rd / "eval" / "samples.csv", ex.key_csv, ex.survey_csv):
        cells = [c for row in csv.reader(open(f, newline="")) for c in row]
        assert not any(c[:1] in "=+-@\t\r" and c[:1] and not re.fullmatch(r"[+-]?\d+(\.\d*)?", c) for c in cells), f
    assert set(read_key(ex.key_csv).prompt_text) >= set(evil.values())       # read back exactly
    assert html_text(evil["p0000"]) in ex.txt.read_text()
