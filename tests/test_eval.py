"Integration tests of `opd-eval` and `opd.compare` on a tiny run (the CLIs run as subprocesses)."
import os, subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from opd.config import LATEST, EvalConfig, eval_key, latest_dir, load_config
from opd.eval import (SAMPLE_COLUMNS, bootstrap_ci, image_mse, load_clip, load_student_weights, pairwise_rms, paired_delta_ci,
                      resolve_ckpt)
from opd.compare import grid_size, make_grids

# A shared 2-core CPU: one OpenMP thread per process avoids oversubscription (10x slowdowns when busy).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--stage", "tiny", "--set", "train.max_steps=3"]

def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=900)


def test_metrics_on_known_inputs():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_mse(x, x), torch.zeros(4))
    assert torch.allclose(image_mse(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)), torch.ones(1))
    clip = load_clip(EvalConfig(clip_model="tiny-random"))
    e = clip.embed_images(x)
    assert torch.allclose(clip.similarity(e, e), torch.ones(4), atol=1e-5)      # identical images → similarity 1
    assert pairwise_rms(x[:1].repeat(3, 1, 1, 1)) == 0.0                         # identical seeds → no diversity


def test_bootstrap_ci_covers_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    hits = [(c := bootstrap_ci(rng.exponential(2.0, 40), 300, seed=t)).lo <= 2.0 <= c.hi for t in range(150)]
    assert 0.85 <= np.mean(hits) <= 0.99                                         # ≈ 95% coverage (skewed data too)
    w = lambda n: np.mean([(c := bootstrap_ci(rng.normal(0, 1, n), 300, seed=t)).hi - c.lo for t in range(20)])
    assert w(400) < 0.35 * w(25)                                                 # ~1/sqrt(n)
    d = paired_delta_ci([1.0, 2, 3, 4], [0.5, 1.6, 2.4, 3.5], 500)
    assert d.hi < 0 and abs(d.mean + 0.5) < 1e-12


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval") / "run"
    r = run("opd-distill", *TINY, "--out", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    e = run("opd-eval", *TINY, "--ckpt", str(d), "--no-progress")
    assert e.returncode == 0, e.stderr[-3000:]
    return d, e.stdout


def test_report_files(tiny_run):
    d, out = tiny_run
    ev = latest_dir(d)
    assert ev == d / "eval" / eval_key(load_config("tiny", overrides=["train.max_steps=3"]))   # eval/<key>/, named by eval/LATEST
    for f in ("summary.csv", "summary_by_category.csv", "summary.md", "per_sample.csv", "kl_per_step.csv", "samples.csv",
              "training_curves.png", "kl_per_step.png", "metrics.png", "eval.json", "config.yaml"):
        assert (ev / f).is_file(), f
        assert str(ev / f) in out, f"{f} not printed"
    assert not list((d / "eval").glob(".*.tmp"))
    assert "heldout final-latent MSE: before" in out
    # the "before" student is rebuilt exactly as training started, the "after" weights load exactly (cross-process)
    assert out.count("— reproduced") == 2 and "DIFFERS" not in out, out
    s = pd.read_csv(ev / "summary.csv")
    assert list(s.columns[:4]) == ["split", "metric", "before", "after"]
    assert {"before_lo", "before_hi", "after_lo", "after_hi", "delta", "delta_lo", "delta_hi"} <= set(s.columns)
    assert set(s.split) == {"val", "heldout"}
    h = s[(s.split == "heldout") & (s.metric == "final_latent_mse")]
    assert len(h) == 1 and np.isfinite(h[["before", "after", "delta_lo", "delta_hi"]].to_numpy()).all()
    assert {"final_latent_mse", "image_mse", "kl_on_policy", "clip_score", "clip_image_sim", "diversity_latent"} <= set(s.metric)
    assert "Acceptance check" in (ev / "summary.md").read_text()                  # reported, not assumed
    # the samples contract read by the survey export
    smp = pd.read_csv(ev / "samples.csv")
    assert tuple(smp.columns) == SAMPLE_COLUMNS
    assert set(smp.arm) == {"teacher", "before", "after"}
    assert (smp.groupby(["prompt_id", "seed"]).arm.nunique() == 3).all()         # same (prompt, seed) = same noise in every arm
    for r in smp.itertuples():
        assert r.image_path == f"eval/{ev.name}/images/{r.arm}/{r.prompt_id}_s{r.seed}.png" and (d / r.image_path).is_file()
    assert Image.open(d / smp.image_path[0]).size == (32, 32)
    ps = pd.read_csv(ev / "per_sample.csv", dtype={"seed": "Int64"})
    assert set(ps.dropna(subset=["seed"]).seed) <= set(smp.seed)                 # exact 63-bit seeds


def test_checkpoint_and_bad_input(tiny_run, tmp_path):
    d, _ = tiny_run
    ck = d / "checkpoints" / "step-000003"
    final = latest_dir(d); before = (final / "summary.csv").read_bytes()
    e = run("opd-eval", *TINY, "--ckpt", str(ck), "--no-progress")          # a checkpoint of the finished run, into the run itself
    assert e.returncode == 0, e.stderr[-3000:]
    ck_dir = d / "eval" / eval_key(load_config("tiny", overrides=["train.max_steps=3"]), "step-000003")
    assert (ck_dir / "summary.csv").is_file() and "step 3" in (ck_dir / "summary.md").read_text()
    # the final student's evaluation is neither replaced nor displaced as the latest
    assert latest_dir(d) == final and (final / "summary.csv").read_bytes() == before and (d / "eval" / LATEST).read_text().startswith("final-")
    # bad input: one line, exit 2, nothing written
    empty = tmp_path / "empty"; empty.mkdir()
    for bad in (tmp_path / "missing", empty):
        r = run("opd-eval", *TINY, "--ckpt", str(bad), "--out", str(tmp_path / "never"))
        assert r.returncode == 2 and r.stderr.strip().startswith("error: --ckpt=") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "never").exists() and list(empty.iterdir()) == []


def test_checkpoint_weights_equal_final_student(tiny_run):
    "checkpoints/step-3 and student/ of a 3-step run hold the same weights, through both loaders."
    from opd.models import load_models
    d, _ = tiny_run
    cfg = load_config("tiny", overrides=["train.max_steps=3"])
    a, b = load_models(cfg, device="cpu"), load_models(cfg, device="cpu")
    before = {k: v.clone() for k, v in a.student.transformer.state_dict().items()}
    load_student_weights(a.student, resolve_ckpt(d / "checkpoints" / "step-000003"))
    load_student_weights(b.student, resolve_ckpt(d))
    sa, sb = a.student.transformer.state_dict(), b.student.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], before[k]) for k in sa)                    # and they are not the untrained student


def test_grids(tiny_run):
    d, _ = tiny_run
    paths = make_grids(d, rows_per_grid=4, cell=64)
    smp = pd.read_csv(latest_dir(d) / "samples.csv")
    n_units = smp[smp.split == "heldout"].drop_duplicates(["prompt_id", "seed"]).shape[0]
    held = sorted(p for p in paths if "grid_heldout" in p.name)
    assert len(held) == -(-n_units // 4)
    assert Image.open(held[0]).size == grid_size(4, 3, cell=64)
    assert all("grid" in p.name and p.parent == latest_dir(d) for p in paths)


WRITE_UP = ["pickscore", "hpsv2", "aesthetic", "fid", "kid"]

def test_write_up_metrics_offline(tiny_run, tmp_path):
    "Issue 15: `opd-eval --ckpt RUN --out NEW --set eval.metrics=[...]` on the run's own config, offline, with the tiny stand-ins."
    d, _ = tiny_run
    new = tmp_path / "new"
    # weights that cannot be had: one line naming the metric and how to provide them, before any sampling (nothing written)
    bad = run("opd-eval", "--ckpt", str(d), "--out", str(new), "--no-progress", "--set", "eval.metrics=[hpsv2]",
              "--set", "eval.weights.hpsv2=/nowhere/HPS_v2.1_compressed.pt")
    err = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert bad.returncode == 2 and len(err) == 1 and "eval.weights.hpsv2" in err[0] and "hpsv2" in err[0], bad.stderr
    assert not new.exists()
    r = run("opd-eval", "--ckpt", str(d), "--out", str(new), "--no-progress", "--set", f"eval.metrics=[{','.join(WRITE_UP)}]",
            "--set", "eval.n_prompts=4")                                        # 4 prompts per split, 2 seeds: 16 images per arm
    assert r.returncode == 0, r.stderr[-3000:]
    ev = latest_dir(new)
    s = pd.read_csv(ev / "summary.csv")
    assert set(WRITE_UP) <= set(s.metric) and {"gap_closed", "gap_closed_lo", "gap_closed_hi", "gap_status"} <= set(s.columns)
    for m in WRITE_UP:                                                          # every arm and split has a value
        rows = s[s.metric == m]
        assert set(rows.split) == {"val", "heldout"} and np.isfinite(rows[["teacher", "before", "after"]].to_numpy()).all(), m
    assert (s.loc[s.metric.isin(["fid", "kid"]), "teacher"] == 0).all()           # the teacher is the reference
    g = s[s.metric.isin(WRITE_UP)]
    assert (np.isfinite(g.gap_closed) | g.gap_status.isin(["no gap to close"])).all()   # a number, or the reason there is none
    assert set(WRITE_UP) <= set(pd.read_csv(ev / "summary_by_category.csv").metric)
    ps = pd.read_csv(ev / "per_sample.csv")
    assert (ps[ps.metric == "pickscore"].groupby("arm").size() == 16).all() and set(ps[ps.metric == "hpsv2"].arm) == {"teacher", "before", "after"}
    md = (ev / "summary.md").read_text()
    head = md.split("## Headline", 1)[1].split("\n\n")[1]
    assert head.startswith("heldout: share of the teacher–student gap closed") and all(m in head for m in WRITE_UP)
    assert (ev / "gap_closed.png").is_file() and "## Metric weights" in md
    w = __import__("json").loads((ev / "eval.json").read_text())["metric_weights"]
    assert {x["key"] for x in w} == {"pickscore", "pickscore_processor", "hpsv2", "aesthetic", "aesthetic_clip", "inception"}
    assert all(x["spec"] == "tiny-random" and len(x["sha256"]) == 64 for x in w)
