"Integration tests for opd.models: the tiny offline pair, pruned/LoRA students, save/load round trips, the text cache, errors."
import json, os

import pytest
import torch

from opd.config import OpdError, load_config
from opd.models import (ARCHS, TINY_VAE, Arch, FlowModel, ModelPair, TextEmbeddings, arch_param_counts, load_models,
                        load_student_pipeline, register_arch)


def cfg_with(*overrides, stage="tiny"):
    return load_config(stage, overrides=list(overrides))


def xs(pair, n=2, seed=0):
    return torch.randn(n, *pair.latent_shape, generator=torch.Generator().manual_seed(seed))


def perturb(fm: FlowModel, scale=0.02, seed=0):
    "Stand-in for training: move every trainable weight."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fm.trainable_parameters(): p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def reload_velocities(path, pair, e):
    "Load the saved student back through diffusers; its velocity next to the live student's, on the same latents."
    pipe = load_student_pipeline(path)
    x = xs(pair)
    with torch.inference_mode(): return pipe, FlowModel(pipe.transformer).velocity(x, 0.5, e), pair.student.velocity(x, 0.5, e)


PROMPTS = ["a sleek red sports car, studio shot", "a cozy coffee mug on a wooden table"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    "The tiny teacher written as a plain diffusers pipeline folder: a *local* spec, offline."
    d = tmp_path_factory.mktemp("tiny_teacher")
    pair = load_models(cfg_with(), device="cpu")
    pair.save(d, "teacher")
    return d


def test_tiny_pipeline_generates_offline():
    pair = load_models(cfg_with(), device="cpu")
    pipe = pair.pipeline("teacher")
    out = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="pil",
               generator=torch.Generator().manual_seed(0)).images
    assert out[0].size == (32, 32)


def test_velocity_matches_diffusers_pipeline_embeddings():
    "pair.encode gives exactly what the pipeline's own encode_prompt gives."
    pair = load_models(cfg_with(), device="cpu")
    pe, _, pooled, _ = pair.pipeline("teacher").encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=8)
    e = pair.encode(PROMPTS)
    assert torch.equal(e.prompt_embeds, pe) and torch.equal(e.pooled, pooled)


def test_seeded_and_independent():
    a, b = load_models(cfg_with(), device="cpu"), load_models(cfg_with(), device="cpu")
    c = load_models(cfg_with("seed=1"), device="cpu")
    w = lambda p, m: getattr(p, m).transformer.proj_out.weight
    assert torch.equal(w(a, "teacher"), w(b, "teacher")) and not torch.equal(w(a, "teacher"), w(c, "teacher"))
    same = load_models(cfg_with("model.student=random:tiny"), device="cpu")   # same arch, other role: another network
    assert not torch.equal(w(same, "teacher"), w(same, "student"))


def test_text_cache_hit_calls_no_encoder(tmp_path):
    cfg = cfg_with()
    pair = load_models(cfg, device="cpu", cache_dir=tmp_path)
    assert pair.precompute(PROMPTS, progress=False) == 3          # two prompts + the empty one
    assert not pair.text.encoders.loaded
    ref = pair.encode(PROMPTS)
    again = load_models(cfg, device="cpu", cache_dir=tmp_path)
    again.text.encoders.loader = lambda: pytest.fail("encoder loaded on a cache hit")
    assert again.precompute(PROMPTS, progress=False) == 0
    assert torch.equal(again.encode(PROMPTS).prompt_embeds, ref.prompt_embeds)
    assert again.negative().prompt_embeds.shape == (1, 85, 32)
    assert again.text.encoders.calls == 0 and again.text.stats["disk"] == 3


def test_uncached_prompt_after_free_reloads_with_warning():
    pair = load_models(cfg_with(), device="cpu")
    pair.precompute(PROMPTS, progress=False)
    with pytest.warns(UserWarning, match="re-loading the text encoders"):
        e = pair.encode(["a brand new prompt"])
    assert len(e) == 1


def test_cfg_one_batched_forward_equals_two():
    pair = load_models(cfg_with(), device="cpu")
    e, n = pair.encode(PROMPTS), pair.negative()
    x = xs(pair)
    with torch.inference_mode():
        v_c = pair.teacher.velocity(x, 0.6, e)
        v_u = pair.teacher.velocity(x, 0.6, n.expand(2))
        torch.testing.assert_close(pair.teacher.velocity(x, 0.6, e, n, 3.0), v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_student_forward_has_grad_inside_inference_callers():
    "Embeddings produced while the caller is in inference mode still work in a training forward."
    pair = load_models(cfg_with(), device="cpu")
    with torch.inference_mode():
        e = pair.encode(PROMPTS)
    loss = pair.student.velocity(xs(pair), torch.tensor([0.3, 0.8]), e).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in pair.student.trainable_parameters())


def test_full_student_round_trip(tmp_path):
    pair = load_models(cfg_with(), device="cpu")
    perturb(pair.student)
    e = pair.encode(PROMPTS)
    pair.save_student(tmp_path)
    pipe, saved, live = reload_velocities(tmp_path, pair, e)
    assert torch.equal(saved, live)
    img = pipe(PROMPTS[1], num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_pruned_student_runs_and_round_trips(tmp_path):
    pair = load_models(cfg_with("model.student=prune:teacher", "model.student_keep=[0,3]"), device="cpu")
    t, s = pair.teacher.transformer, pair.student.transformer
    assert len(t.transformer_blocks) == 4 and s.config.num_layers == 2 and s.transformer_blocks[-1].context_pre_only
    assert pair.student.dtype == torch.float32 and not t.transformer_blocks[0].attn.to_q.weight.requires_grad
    perturb(pair.student)
    assert not torch.equal(s.transformer_blocks[0].attn.to_q.weight, t.transformer_blocks[0].attn.to_q.weight)  # a copy
    e = pair.encode(PROMPTS)
    pair.save_student(tmp_path)
    pipe, saved, live = reload_velocities(tmp_path, pair, e)
    assert pipe.transformer.config.num_layers == 2
    assert torch.equal(saved, live)


def test_prune_errors():
    with pytest.raises(OpdError, match="context_pre_only"):
        load_models(cfg_with("model.student=prune:teacher", "model.student_keep=[0,1]"), device="cpu")
    with pytest.raises(OpdError, match="model.student_keep is required"):
        load_models(cfg_with("model.student=prune:teacher"), device="cpu")


@pytest.mark.parametrize("targets", ["image", "text", "both"])
def test_lora_trains_only_lora(targets):
    pair = load_models(cfg_with("model.lora_rank=4", f"model.lora_targets={targets}"), device="cpu")
    tr = pair.student.transformer
    names = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert any(".add_q_proj." in n for n in names) == (targets != "image")
    assert any(".to_q." in n for n in names) == (targets != "text")
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    opt = torch.optim.AdamW(pair.student.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    pair.student.velocity(xs(pair), 0.5, pair.encode(PROMPTS)).square().mean().backward()
    opt.step()
    changed = {n for n, p in tr.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names


def test_lora_round_trip_random_base(tmp_path):
    "LoRA on a random base: the whole pipeline (base transformer) + adapters; alpha != rank survives."
    pair = load_models(cfg_with("model.lora_rank=4", "model.lora_alpha=8", "model.lora_targets=both"), device="cpu")
    perturb(pair.student)
    e = pair.encode(PROMPTS)
    pair.save_student(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "model_index.json").is_file()
    assert json.loads((tmp_path / "opd_student.json").read_text())["kind"] == "lora"
    _, saved, live = reload_velocities(tmp_path, pair, e)
    torch.testing.assert_close(saved, live, rtol=1e-5, atol=1e-6)


def test_local_teacher_pruned_lora_student(teacher_dir, tmp_path):
    "A local pipeline folder as teacher (the hub path, offline); pruned + LoRA student saved as base transformer + adapters."
    cfg = cfg_with(f"model.teacher={teacher_dir}", "model.student=prune:teacher", "model.student_keep=[1,3]", "model.lora_rank=2")
    pair = load_models(cfg, device="cpu", cache_dir=tmp_path / "cache")
    assert not pair.text.encoders.loaded                  # lazily
    e = pair.encode(PROMPTS)
    ref = load_models(cfg_with(), device="cpu").encode(PROMPTS)
    assert torch.equal(e.prompt_embeds, ref.prompt_embeds)   # same encoders, reloaded from disk
    perturb(pair.student)
    out = tmp_path / "student"
    pair.save_student(out)
    assert (out / "transformer" / "config.json").is_file() and not (out / "model_index.json").exists()
    assert json.loads((out / "opd_student.json").read_text())["base_pipeline"] == str(teacher_dir)
    _, saved, live = reload_velocities(out, pair, e)
    torch.testing.assert_close(saved, live, rtol=1e-5, atol=1e-6)


def test_local_student_folder(teacher_dir, tmp_path):
    "A saved full student (transformer/ only) is itself a valid student spec."
    pair = load_models(cfg_with(f"model.teacher={teacher_dir}", "model.student=prune:teacher", "model.student_keep=[0,3]"), device="cpu")
    perturb(pair.student)
    pair.save_student(tmp_path / "s")
    again = load_models(cfg_with(f"model.teacher={teacher_dir}", f"model.student={tmp_path / 's'}"), device="cpu")
    assert torch.equal(again.student.transformer.proj_out.weight, pair.student.transformer.proj_out.weight)
    with pytest.raises(OpdError, match="holds only a transformer"):
        load_models(cfg_with(f"model.teacher={tmp_path / 's'}"), device="cpu")


def test_mismatched_latent_space_is_a_clear_error():
    register_arch("tiny-sdxl-vae", Arch(ARCHS["tiny-student"].transformer, TINY_VAE | dict(scaling_factor=0.13025, shift_factor=None), ARCHS["tiny"].text))
    try:
        with pytest.raises(OpdError, match=r"scaling_factor 1\.5305 \(teacher\) vs 0\.13025 \(student\).*shift_factor"):
            load_models(cfg_with("model.student=random:tiny-sdxl-vae"), device="cpu")
    finally:
        ARCHS.pop("tiny-sdxl-vae")


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OpdError, match=r"model.teacher='stabilityai/stable-diffusion-3.5-medium'.*HF_HUB_OFFLINE=1 or no network.*hf download"):
        load_models(cfg_with("model.teacher=stabilityai/stable-diffusion-3.5-medium"), device="cpu")


def test_missing_local_path_error():
    with pytest.raises(OpdError, match="no such folder"):
        load_models(cfg_with("model.student=./outputs/no-such-student"), device="cpu")


def test_resolution_must_fit_pos_embed():
    with pytest.raises(OpdError, match="model.resolution"):
        load_models(cfg_with("model.resolution=144"), device="cpu")


def test_bf16_teacher_fp32_student_and_lora_base():
    pair = load_models(cfg_with("model.dtype=bfloat16"), device="cpu")
    assert pair.teacher.dtype == torch.bfloat16 and pair.student.dtype == torch.float32
    x = xs(pair)
    e = pair.encode(PROMPTS)
    assert e.dtype == torch.bfloat16
    assert pair.teacher.velocity(x, 0.5, e).dtype == torch.float32           # x's dtype
    lora = load_models(cfg_with("model.dtype=bfloat16", "model.lora_rank=2"), device="cpu")
    assert lora.student.dtype == torch.bfloat16
    assert {p.dtype for p in lora.student.trainable_parameters()} == {torch.float32}
    lora.student.velocity(x, 0.5, e).float().square().mean().backward()


def test_gradient_checkpointing_same_grads():
    grads = []
    for gc in (False, True):
        pair = load_models(cfg_with(f"model.gradient_checkpointing={gc}"), device="cpu")
        pair.student.velocity(xs(pair), 0.4, pair.encode(PROMPTS)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in pair.student.trainable_parameters()]))
        assert pair.student.transformer.gradient_checkpointing == gc
    torch.testing.assert_close(grads[0], grads[1])


def test_real_arch_shapes_on_meta():
    med, large = arch_param_counts("sd35-medium"), arch_param_counts("sd35-large")
    assert abs(med["transformer"] / 1e9 - 2.243) < 0.01 and abs(large["transformer"] / 1e9 - 8.057) < 0.01
    assert med["vae"] == large["vae"]
    assert ARCHS["sd35-medium"].transformer["dual_attention_layers"] == tuple(range(13))
