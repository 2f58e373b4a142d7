"Offline tests of `opd.metrics`: known answers of FID/KID/gap closed, and every scorer on its tiny stand-in loaded from local paths."
import numpy as np
import pytest
from PIL import Image

from opd.config import OpdError
from opd.metrics import (TINY, fid, gap_closed, kid, load_metrics, make_stand_in, sha256_of, set_metric_summary, score_images,
                         weight_spec)


def test_fid_kid_known_answers():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 16)), rng.normal(size=(90, 16)) * 1.5 + 0.3
    assert abs(fid(x, x)) < 1e-8                                                   # a set against itself
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    ref = fid_statistics_to_metric(dict(mu=x.mean(0), sigma=np.cov(x, rowvar=False)),
                                   dict(mu=y.mean(0), sigma=np.cov(y, rowvar=False)), False)["frechet_inception_distance"]
    assert abs(fid(x, y) - ref) < 1e-6 * ref                                       # the Gram-matrix form = torch-fidelity's sqrtm
    assert abs(fid(x, x + 1) - 16) < 1e-6                                          # mean shift of 1 in 16 dims
    x2, y2 = rng.normal(size=(120, 16)), rng.normal(size=(120, 16)) * 1.5 + 0.3
    from torch_fidelity.metric_kid import kernel_poly, mmd2
    assert abs(kid(x, y2) - mmd2(kernel_poly(x, x), kernel_poly(x, y2), kernel_poly(y2, y2), mmd_est="u-statistic")) < 1e-9
    assert kid(x, x) == 0                                                          # U-statistic: exactly 0 against itself
    assert abs(kid(x, x2)) < 0.05 * kid(x, y2)                                     # unbiased: ≈ 0 for one distribution


def test_gap_closed_known_answers():
    rng = np.random.default_rng(1)
    t, b = rng.normal(2, 0.2, 30), rng.normal(1, 0.2, 30)
    assert abs(gap_closed(t, b, t)["gap_closed"] - 1) < 1e-12                      # after = teacher
    assert abs(gap_closed(t, b, b)["gap_closed"]) < 1e-12                          # after = before
    g = gap_closed(t, b, b + 0.25 * (t - b), n_boot=300)
    assert abs(g["gap_closed"] - 0.25) < 1e-12 and g["gap_closed_lo"] <= 0.25 <= g["gap_closed_hi"]
    none = gap_closed(b + rng.normal(0, 1e-3, 30), b, t)
    assert none["gap_status"] == "no gap to close" and np.isnan(none["gap_closed"])  # denominator CI contains 0: no number
    assert gap_closed([np.nan] * 3, [1, 2, 3], [1, 2, 3])["gap_status"] == "no teacher arm"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    "The stand-ins built in a fresh cache, then named as local paths: the code path of published weights."
    d = tmp_path_factory.mktemp("metric-weights")
    keys = ("pickscore", "pickscore_processor", "hpsv2", "aesthetic", "aesthetic_clip", "inception")
    return d, {k: str(make_stand_in(k, d)) for k in keys}


def test_stand_ins_are_deterministic(stand_ins, tmp_path):
    d, paths = stand_ins
    for k in ("aesthetic", "pickscore"):
        assert sha256_of(make_stand_in(k, tmp_path)) == sha256_of(paths[k])       # same weights in another cache folder


def test_scorers_from_local_paths(stand_ins, tmp_path):
    d, paths = stand_ins
    import opd.metrics as M
    M.register_tiny_hps()                   # a published HPS file is ViT-H-14; the tiny one needs its own architecture name
    suite = load_metrics(["pickscore", "aesthetic", "fid", "kid"], {k: v for k, v in paths.items() if k != "hpsv2"}, "final")
    assert [w["spec"] for w in suite.weights] == [w["path"] for w in suite.weights]   # local paths, recorded with sha256
    assert all(len(w["sha256"]) == 64 for w in suite.weights)
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(paths["pickscore_processor"])
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(5)]
    assert tuple(proc(images=ims[:1], return_tensors="pt")["pixel_values"].shape) == (1, 3, 224, 224)   # the real input size
    prompts = ["a red car", "soup", "a cat", "a lamp", "a shoe"]
    s = suite.scorers["pickscore"]
    one = s.score(ims, prompts)
    s.batch = 2
    assert np.allclose(one, s.score(ims, prompts), atol=1e-5)                      # batching does not change a score
    assert not np.allclose(one, s.score(ims, prompts[::-1]), atol=1e-6)            # the prompt matters
    hps = M.load_hpsv2(paths["hpsv2"], M.TINY_HPS_ARCH)
    assert hps.score(ims[:2], prompts[:2]).shape == (2,)
    assert suite.inception.features(ims).shape == (5, 64)


def test_report_rows_on_synthetic_images(stand_ins, tmp_path):
    from types import SimpleNamespace
    d, paths = stand_ins
    suite = load_metrics(["aesthetic", "fid", "kid"], {}, "tiny", cache_dir=d)
    rng = np.random.default_rng(0)
    items = [SimpleNamespace(split="val", category=c, prompt_id=f"p{k}", seed=j, prompt=f"{c} {k}")
             for k, c in enumerate(["food", "food", "tech", "tech", "pets"]) for j in range(2)]
    teacher = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in items]
    files = {}
    for arm in ("teacher", "before", "after"):
        files[arm] = []
        for i, im in enumerate(teacher):
            im = rng.integers(0, 256, im.shape, dtype=np.uint8) if arm == "before" else im
            f = tmp_path / arm / f"{i}.png"; f.parent.mkdir(exist_ok=True); Image.fromarray(im).save(f); files[arm].append(f)
    ps = score_images(suite, items, files)
    assert list(ps.columns) == ["split", "category", "prompt_id", "seed", "arm", "metric", "value"] and len(ps) == 3 * len(items)
    rows, feats = set_metric_summary(suite, items, files, ("split",), n_boot=50)
    r = rows.set_index("metric")
    assert r.loc["fid", "after"] < 1e-9 and r.loc["fid", "before"] > 0                 # after = teacher's images
    assert abs(r.loc["fid", "gap_closed"] - 1) < 1e-9 and abs(r.loc["kid", "gap_closed"] - 1) < 1e-9
    cat, _ = set_metric_summary(suite, items, files, ("split", "category"), n_boot=50, feats=feats)
    assert set(cat.category) == {"food", "tech", "pets"}


def test_bad_names_and_missing_weights_fail_in_one_line():
    with pytest.raises(OpdError, match="eval.metrics='geneval'") as e: load_metrics(["geneval"], {}, "tiny")
    assert "\n" not in str(e.value)
    with pytest.raises(OpdError, match="timm==0.6.13"): load_metrics(["image_reward"], {}, "tiny")
    with pytest.raises(OpdError, match=r"eval.weights.hpsv2.*--set eval.weights.hpsv2=PATH") as e:
        load_metrics(["hpsv2"], {"hpsv2": "/nowhere/HPS_v2.1_compressed.pt"}, "final")
    assert "\n" not in str(e.value)
    with pytest.raises(OpdError, match="eval.weights.typo"): load_metrics(["fid"], {"typo": "x"}, "tiny")
    assert weight_spec({}, "pickscore", "final") == "yuvalkirstain/PickScore_v1" and weight_spec({}, "pickscore", "tiny") == TINY
