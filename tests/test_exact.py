"Exact-teacher testbed (opd.exact): closed-form velocity, sampler fidelity, zero self-distillation loss, metrics."
import math

import pytest
import torch

from opd.config import DistillConfig, OpdError, load_config
from opd.exact import (ExactGMMTeacher, ExactPair, GMMSpec, build_exact_pair, category_of, exact_config, latent_preview, mc_velocity,
                       mode_coverage, nll_per_dim, parse_exact_spec, prompt_batch, sample_prompts)
from opd.losses import RewardComputer
from opd.prompts import generate_prompts
from opd.rollout import GaussianVelocity, RolloutEngine

PROMPTS = [r["prompt"] for r in generate_prompts(24, seed=0)]


@pytest.fixture(scope="module")
def small():
    return ExactGMMTeacher(GMMSpec(latent_shape=(16, 4, 4)))


def test_deterministic_and_categories(small):
    again = ExactGMMTeacher(GMMSpec(latent_shape=(16, 4, 4)))
    assert torch.equal(small.means, again.means)
    assert torch.equal(small.log_weights(PROMPTS), again.log_weights(PROMPTS))
    for r in generate_prompts(48, seed=5): assert category_of(r["prompt"]) == r["category"]
    w = small.log_weights(PROMPTS[:3]).exp()
    assert torch.allclose(w.sum(1), torch.ones(3, dtype=torch.float64))
    assert ((w > 0).sum(1) == small.spec.modes_per_category).all()          # only the prompt's category
    assert (w[w > 0] >= small.spec.floor / small.spec.modes_per_category - 1e-12).all()
    unc = small.log_weights([""]).exp()                                     # the empty prompt: every component
    assert (unc > 0).all() and math.isclose(float(unc.sum()), 1.0)


def test_velocity_matches_monte_carlo():
    t = ExactGMMTeacher(GMMSpec(latent_shape=(2, 2, 1), modes_per_category=3, std=0.3, seed=2))
    g = torch.Generator().manual_seed(0)
    for s in (0.25, 0.6, 0.9):
        x0, _ = t.sample([PROMPTS[0]], generator=g)
        x = (1 - s) * x0.double() + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        mc, ess = mc_velocity(t, x, s, PROMPTS[0], n=100_000, seed=int(10 * s))
        assert ess > 1000
        assert torch.allclose(t.velocity(x, s, [PROMPTS[0]]), mc, atol=0.05), (s, t.velocity(x, s, [PROMPTS[0]]), mc)


def test_limits_stability_and_single_gaussian(small):
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    P = PROMPTS[:3]
    mean = (small.log_weights(P).exp() @ small.means).reshape(x.shape)
    assert torch.allclose(small.velocity(x, 1.0, P), x - mean, atol=1e-10)
    assert torch.allclose(small.velocity(x, 0.0, P), -x, atol=1e-10)
    for s in (0.0, 1e-7, 0.5, 1 - 1e-7, 1.0):
        assert torch.isfinite(small.velocity(10 * x.float(), s, P)).all()
    one = ExactGMMTeacher(GMMSpec(latent_shape=(2, 2, 2), modes_per_category=1, categories=("solo",), std=0.4))
    m = one.means.reshape(2, 2, 2)
    xs = torch.randn(5, 2, 2, 2, dtype=torch.float64)
    for s in (0.1, 0.5, 0.9):
        assert torch.allclose(one.velocity(xs, s, ["x"] * 5), GaussianVelocity(m, 0.4).velocity(xs, s), atol=1e-6)


def test_cfg_uses_the_unconditional_mixture(small):
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    P = PROMPTS[:2]
    v_c, v_u = small.velocity(x, 0.4, P), small.velocity(x, 0.4, ["", ""])
    assert torch.allclose(small.velocity(x, 0.4, P, guidance=3.0), v_u + 3 * (v_c - v_u), atol=1e-10)


@pytest.mark.parametrize("a", [0.0, 0.7])
def test_sampler_reproduces_the_mixture(small, a):
    P = [PROMPTS[0]] * 150 + [PROMPTS[1]] * 150
    x_true, _ = small.sample(P, torch.Generator().manual_seed(0))
    ref = nll_per_dim(small, x_true, P, n_boot=50)["nll"]
    xs = sample_prompts(ExactPair(small), P, list(range(len(P))), num_steps=200, noise_level=a, shift=1.0)
    nll, cov = nll_per_dim(small, xs, P, n_boot=50)["nll"], mode_coverage(small, xs, P)
    assert abs(nll - ref) < 0.02, (nll, ref)
    assert cov["tv"] < 0.1 and cov["dropped"] == 0 and cov["off_mode"] == 0, cov


def test_self_distillation_has_zero_loss(small):
    twin = ExactPair(small, student=ExactGMMTeacher(small.spec))
    b = prompt_batch(twin, PROMPTS[:3], [1, 2, 3])
    for mode in ("on_policy", "teacher", "forward"):
        dc = DistillConfig(mode=mode, num_steps=6, noise_level=0.7, mse_weight=1.0)
        lb = RewardComputer(twin.student, dc).compute(RolloutEngine(twin, dc).rollout(b))
        assert float(lb.kl_nats.abs().max()) < 1e-6 and lb.mse_loss < 1e-10


def test_metrics_flag_a_collapsed_set(small):
    P = [PROMPTS[0]] * 300 + [PROMPTS[1]] * 300
    x_true, comp = small.sample(P, torch.Generator().manual_seed(1))
    ok = mode_coverage(small, x_true, P)
    assert torch.equal(ok["assignment"], comp) and ok["dropped"] == 0 and ok["tv"] < 0.08 and abs(ok["spread"] - 1) < 0.03
    top = small.log_weights(P).exp().argmax(1)
    x_one = small.means[top].reshape(x_true.shape).float() + 0.2 * torch.randn(x_true.shape, generator=torch.Generator().manual_seed(2))
    bad = mode_coverage(small, x_one, P)
    assert bad["dropped"] == bad["judged"] - 2 and bad["judged"] >= 4
    assert bad["collapse"] > 0.5 and bad["kl_true_emp"] > 1
    blur = mode_coverage(small, x_true + 0.3 * torch.randn(x_true.shape), P)
    assert blur["off_mode"] > 0.99 and blur["spread"] > 2


def test_spec_parsing_and_preview():
    assert parse_exact_spec("exact:gmm:modes=3,std=0.1,seed=4") == GMMSpec(modes_per_category=3, std=0.1, seed=4)
    with pytest.raises(OpdError, match="allowed"): parse_exact_spec("exact:gmm:colour=red")
    img = latent_preview(torch.randn(2, 16, 4, 4))
    assert img.shape == (2, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_exact_pair_from_the_tiny_stage():
    pair = build_exact_pair(load_config("tiny", overrides=["model.teacher=exact:gmm:modes=3", "model.device=cpu"]))
    assert pair.teacher.spec.modes_per_category == 3 and pair.teacher.spec.latent_shape == (16, 16, 16)
    with pytest.raises(OpdError, match="prune"):
        build_exact_pair(load_config("tiny", overrides=["model.teacher=exact:gmm", "model.student=prune:teacher"]))


def test_exact_pair_trains_with_distill_trainer(tmp_path):
    from opd.train import DistillTrainer
    cfg = exact_config("train.max_steps=2", "prompts.n_prompts=12")
    assert cfg.model.teacher.startswith("exact:gmm") and cfg.model.student == "random:tiny-exact-student"
    pair = build_exact_pair(cfg, cache_dir=tmp_path / "tc")
    assert pair.student.config.caption_projection_dim == 128      # the wide testbed student
    assert isinstance(pair.teacher, ExactGMMTeacher) and pair.teacher.spec.latent_shape == tuple(pair.latent_shape)
    tr = DistillTrainer(cfg, tmp_path / "run", pair=pair, progress=False)
    before = [p.detach().clone() for p in pair.student.trainable_parameters()]
    m = tr.step(tr.stream.batch(0))
    assert math.isfinite(m.total_loss) and m.total_loss > 0 and not m.skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, pair.student.trainable_parameters()))


def test_one_ablation_runner_on_the_tiny_stage(tmp_path, capsys):
    "`opd-pipeline --ablation` on a non-exact stage: same file, the metrics that stage has, forwards counted per step."
    import pandas as pd
    from opd.pipeline import ablation_forwards, main
    sets = ["train.max_steps=2", "ablation.arms=[on_policy,mixed]", "ablation.seeds=2", "ablation.seeds_per_prompt=2", "prompts.n_prompts=12"]
    rc = main(["--stage", "tiny", "--steps", "prompts", "--ablation", "--out", str(tmp_path), *[a for s in sets for a in ("--set", s)]])
    assert rc in (None, 0)
    out = capsys.readouterr().out
    assert "Equal compute" in out and str(tmp_path / "ablation" / "ablation.csv") in out
    df = pd.read_csv(tmp_path / "ablation" / "ablation.csv")
    assert list(df.columns[:5]) == ["arm", "seed", "step", "teacher_forwards", "student_forwards"]
    assert {"latent_mse", "path_kl"} <= set(df.columns) and "nll" not in df.columns      # no ground truth on a random teacher
    assert len(df) == 2 * 2 * 2 and set(df.arm) == {"on_policy", "mixed"} and set(df.seed) == {0, 1}
    cfg = load_config("tiny")
    on = df[(df.arm == "on_policy") & (df.step == 2)]
    assert (on.teacher_forwards == 2 * cfg.train.batch_size * ablation_forwards(cfg, "on_policy")[0]).all()
    first = df[df.step == 0].groupby("seed").latent_mse.nunique()
    assert (first == 1).all()                          # one evaluation set and one initial student per seed, shared by the arms
    assert (tmp_path / "ablation" / "ablation_compute.png").stat().st_size > 0
