"""Tests for the timm ViT families ivit quantizes (``ivit.models.vit``, ``vit_relpos``, ``eva``, ``support``).

For every supported family a tiny random-init instance (32x32 or so, width 32, depth 1-2) is quantized,
calibrated, frozen, and the engine's integers are compared with the PyTorch integer model's
(``torch.equal``) on both backends at batch 1 and 3; its float logits must track the float timm model's.
Refused families give one ``IvitError`` line before any work (the same line ``support`` reports from a
meta-device model).  ``support`` / ``list_supported`` decide from meta-device models and cache the table;
a sample of timm names runs end to end at tiny sizes, and (``-m slow``) every listed name does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos
from torch import nn

import ivit
from conftest import random_pixels, sqnr_db
from ivit.backends.compiled import build as compiled_build
from ivit.models import support as S
from ivit.models.factory import CUSTOM_MODELS
from ivit.models.vit import QViT
from ivit.training.trainer import FloatWrapper

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
ROPE = dict(attn_type="rope", use_abs_pos_emb=False, use_rot_pos_emb=True, class_token=True, global_pool="token")


def _vit(cls: type = VisionTransformer, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = cls(**{**SMALL, **kw})
        m.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        return m
    return build


#: case -> (tiny float model builder, expected family, minimum SQNR in dB of the integer vs float output)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, float]] = {
    "vit": (_vit(), "vit", 28.0),
    # CLIP: norm_pre on the 16-bit stream, QuickGELU, no patch-embedding bias
    "vit_clip": (_vit(pre_norm=True, act_layer="quick_gelu"), "vit", 28.0),
    # DINOv2-like: LayerScale, register tokens, no classifier (the pooled int8 embedding is the output)
    "vit_dinov2_embedding": (_vit(num_classes=0, reg_tokens=4, init_values=1e-1), "vit", 28.0),
    # patch 14 on a 30x30 image: timm's conv drops the last 2 pixels, so does the integer model (a crop)
    "vit_patch14_crop": (_vit(img_size=30, patch_size=14, depth=1), "vit", 28.0),
    "vit_no_pos_dynamic": (_vit(pos_embed="none", dynamic_img_size=True), "vit", 25.0),
    "vit_gap": (_vit(global_pool="avg", class_token=False), "vit_gap", 25.0),
    "vit_gap_reg_no_embed_class": (_vit(global_pool="avg", reg_tokens=4, no_embed_class=True, init_values=1e-1),
                                   "vit_gap", 25.0),
    # SigLIP: attention-pool (MAP) head, tanh GELU (run as ShiftGELU)
    "vit_map": (_vit(global_pool="map", class_token=False, act_layer="gelu_tanh"), "vit_map", 22.0),
    "vit_map_reg": (_vit(global_pool="map", class_token=False, reg_tokens=2, num_classes=0), "vit_map", 20.0),
    "deit_distilled": (_vit(VisionTransformerDistilled), "deit_distilled", 28.0),
    "vit_relpos_mlp": (_vit(VisionTransformerRelPos, fc_norm=True), "vit_relpos", 25.0),
    "vit_relpos_bias_cls": (_vit(VisionTransformerRelPos, rel_pos_type="bias", class_token=True,
                                 global_pool="token"), "vit_relpos", 28.0),
    "vit_srelpos_swin": (_vit(VisionTransformerRelPos, rel_pos_type="mlp_swin", shared_rel_pos=True),
                         "vit_relpos", 25.0),
    "vit_rope": (_vit(Eva, **ROPE, rope_grid_indexing="xy", rope_temperature=100.0, init_values=1e-1),
                 "vit_rope", 28.0),
    "vit_rope_half_ape": (_vit(Eva, **{**ROPE, "use_abs_pos_emb": True}, no_embed_class=True,
                               rope_rotate_half=True), "vit_rope", 28.0),
    "vit_rope_mixed": (_vit(Eva, **ROPE, rope_type="mixed"), "vit_rope", 28.0),
    "vit_dinov3": (_vit(Eva, num_classes=0, qkv_fused=False, num_reg_tokens=4, use_abs_pos_emb=False,
                        use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, init_values=1e-1,
                        dynamic_img_size=True, use_fc_norm=False), "vit_rope", 25.0),
    # Perception Encoder: RoPE + norm_pre + MAP head over every token (class token included)
    "vit_pe_map": (_vit(Eva, attn_type="rope", global_pool="map", use_pre_transformer_norm=True,
                        use_rot_pos_emb=True, use_fc_norm=False, head_init_scale=1.0), "vit_rope", 15.0),
    "eva": (_vit(Eva, head_init_scale=1.0), "eva", 20.0),
}


def _calibrated(build: Callable[[], nn.Module], config: ivit.QuantConfig | None = None,
                seed: int = 0) -> tuple[nn.Module, QViT]:
    torch.manual_seed(seed)
    model = build().eval()
    q = ivit.quantize(model, config)
    ivit.calibrate(q, [random_pixels(4, q.img_size, seed=seed + i) for i in range(2)])
    return model, q


def _check_engines(q: ivit.models.QModel, prog: ivit.Program) -> None:
    for backend in ("reference", "cpu", *(["compiled"] if compiled_build.available() else [])):
        engine = ivit.Engine(prog, backend=backend)
        for batch in (1, 3):
            x = random_pixels(batch, q.img_size, seed=10 + batch)
            assert torch.equal(engine(x), q.logits(x)), (backend, batch)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_family_quantizes_freezes_and_runs_bitexact(case: str) -> None:
    build, family, min_sqnr = FAMILIES[case]
    model, q = _calibrated(build)
    assert q.family == family
    prog = ivit.freeze(q, name=case)
    assert prog.meta["family"] == family and prog.meta["num_classes"] == q.num_classes
    _check_engines(q, prog)
    x = random_pixels(3, q.img_size, seed=21)
    out = q.logits(x)
    if q.num_classes:
        assert out.dtype == torch.int32 and out.shape == (3, q.num_classes)
    else:  # the pooled integer embedding, at the program's logit_scale
        assert out.dtype in (torch.int8, torch.int16) and out.shape == (3, model.embed_dim)
        assert prog.meta["logit_scale"] == float(q(x).scale)
    with torch.no_grad():
        f = FloatWrapper(model).eval()(x)
    assert sqnr_db(f, q(x).dequantize()) > min_sqnr


def test_swin_family_is_bitexact() -> None:
    _, q = _calibrated(lambda: ivit.create_model("swin_test"))
    _check_engines(q, ivit.freeze(q))


@pytest.mark.parametrize("probs", ["rel8", "shiftmax8"])
def test_attention_pool_both_probability_modes(probs: str) -> None:
    """The MAP head's rel8 path zero-pads its L probability rows to a square for ``attn_normalize``."""
    model, q = _calibrated(FAMILIES["vit_map"][0], ivit.QuantConfig(probs=probs))
    _check_engines(q, ivit.freeze(q))
    ops = [n.op for n in ivit.freeze(q).nodes]
    assert ("pad" in ops) == (probs == "rel8")


def test_distilled_output_is_the_exact_mean_of_both_heads() -> None:
    model, q = _calibrated(FAMILIES["deit_distilled"][0])
    x = random_pixels(3, 32, seed=4)
    with torch.no_grad():
        acc = q.head(q.features(x).slice(1, 0, 2))  # (B, 2, 2K): both heads, one weight scale
        k = q.num_classes
        cls_logits, dist_logits = acc.q[:, 0, :k].to(torch.int64), acc.q[:, 1, k:].to(torch.int64)
        out = q(x)
    assert torch.equal(out.q.to(torch.int64), cls_logits + dist_logits)
    mean = (cls_logits + dist_logits).to(torch.float64) * float(acc.scale) / 2
    assert torch.equal(out.q.to(torch.float64) * float(out.scale), mean)
    with torch.no_grad():
        f = FloatWrapper(model).eval()(x)  # timm: (head(x_cls) + head_dist(x_dist)) / 2
    assert sqnr_db(f, out.dequantize()) > 28


def test_rope_tables_rotate_patch_tokens_only() -> None:
    _, q = _calibrated(FAMILIES["vit_rope"][0])
    sin, cos = q.rope_tables()[0]
    assert torch.equal(sin[0], torch.zeros_like(sin[0])) and torch.equal(cos[0], torch.ones_like(cos[0]))
    assert sin.shape == (1 + 16, 16)  # class token + 4x4 patches, head_dim 16


@pytest.mark.parametrize("case", ["vit_map", "deit_distilled", "vit_relpos_mlp", "vit_rope_mixed", "vit_dinov3"])
def test_training_forward_is_the_integer_result_and_grads_flow(case: str) -> None:
    _, q = _calibrated(FAMILIES[case][0], seed=1)
    ivit.freeze_ranges(q)
    x = random_pixels(4, q.img_size, seed=7)
    q.train()
    out = q(x)
    assert torch.equal(out.value, out.q.to(torch.float32) * out.scale.to(torch.float32))
    assert torch.equal(out.q, q.eval().logits(x))
    q.train()
    F.mse_loss(q(x).value, torch.zeros_like(out.value)).backward()
    for name, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
            assert float(p.grad.abs().sum()) > 0, name


# ---------------------------------------------------------------------------------------------
# Refusals: one line, before any work, the same line the meta-device check gives


def _tiny_hybrid() -> nn.Module:
    return ivit.create_model("vit_small_r26_s32_224", img_size=64, embed_dim=32, depth=1, num_heads=2)


REFUSED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "hybrid": (_tiny_hybrid, "hybrid CNN-backbone patch embedding"),
    "swiglu": (_vit(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=2.0), "SwiGLU"),
    "eva_swiglu": (_vit(Eva, swiglu_mlp=True), "GluMlp"),
    "rmsnorm": (_vit(norm_layer="rmsnorm"), "RmsNorm"),
    "respost": (_vit(block_fn=ResPostBlock), "ResPostBlock"),
    "relpos_respost": (_vit(VisionTransformerRelPos, block_fn=ResPostRelPosBlock), "ResPostRelPosBlock"),
    "qk_norm": (_vit(qk_norm=True), "q/k norm"),
    "scale_attn_norm": (_vit(scale_attn_norm=True), "scale_attn_norm"),
    "eva_scale_attn_inner": (_vit(Eva, scale_attn_inner=True), "scale_attn_inner"),
    "eva_post_norm": (_vit(Eva, use_post_norm=True), "EvaBlockPostNorm"),
    "gqa": (_vit(Eva, **ROPE, qkv_fused=False, num_kv_heads=1), "grouped-query"),
    "max_pool": (_vit(global_pool="max", class_token=False), "max pooling"),
    "avgmax_pool": (_vit(global_pool="avgmax"), "max pooling"),
    "no_pool": (_vit(global_pool="", num_classes=0), "no pooling"),
    "relu": (_vit(act_layer="relu"), "activation ReLU"),
    "dynamic_pad": (_vit(img_size=30, dynamic_img_pad=True), "dynamic padding"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_variants_give_one_line(case: str) -> None:
    build, match = REFUSED[case]
    torch.manual_seed(0)
    model = build()
    family, reason = S.classify(model)
    assert reason is not None and match in reason and "\n" not in reason
    with pytest.raises(ivit.IvitError, match=match) as e:
        ivit.quantize(model)
    assert str(e.value) == reason


def test_hybrid_name_is_refused_by_support() -> None:
    ok, family, reason = S.support("vit_small_r26_s32_224")
    assert not ok and family == "vit" and reason.startswith("hybrid CNN-backbone patch embedding")


# ---------------------------------------------------------------------------------------------
# support / list_supported


#: the issue's names -> expected family (every one quantizes now, except the hybrid)
ISSUE_NAMES = {
    "vit_medium_patch16_reg4_gap_256": "vit_gap",
    "vit_base_patch16_siglip_224": "vit_map",
    "deit_tiny_distilled_patch16_224": "deit_distilled",
    "vit_small_patch14_dinov2": "vit",
    "vit_base_patch16_clip_224": "vit",
    "vit_relpos_small_patch16_224": "vit_relpos",
    "vit_small_patch16_rope_224": "vit_rope",
    "vit_small_patch16_dinov3": "vit_rope",
    "deit_small_patch16_224": "vit",
    "swin_tiny_patch4_window7_224": "swin",
}


@pytest.mark.parametrize("name", sorted(ISSUE_NAMES))
def test_support_decides_from_the_meta_device(name: str) -> None:
    assert S.support(name) == (True, ISSUE_NAMES[name], None)


def test_support_refusals_and_unknown_names() -> None:
    ok, family, reason = S.support("eva02_tiny_patch14_224")
    assert not ok and family == "vit_rope" and "SwiGLU" in reason
    assert S.support("no_such_model") == (False, "", "unknown model 'no_such_model'")
    assert S.support("vit_test") == (True, "vit", None)


def test_list_supported_groups_and_caches(tmp_path, monkeypatch) -> None:
    names = ["vit_test", "swin_test", "vit_small_r26_s32_224", "deit_tiny_distilled_patch16_224"]
    monkeypatch.setattr(S, "_names", lambda: names)
    calls: list[str] = []
    real = S.support

    def decide(name: str) -> tuple[bool, str, str | None]:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(S, "support", decide)
    groups = S.list_supported(cache_dir=tmp_path)
    assert groups == {"vit": ["vit_test"], "deit_distilled": ["deit_tiny_distilled_patch16_224"],
                      "swin": ["swin_test"]}
    assert list(groups) == [f for f in S.FAMILIES if f in groups]  # FAMILIES order
    assert sorted(calls) == sorted(names)
    cached = json.loads(S.cache_path(tmp_path).read_text())["models"]
    assert set(cached) == set(names)
    assert S.refused(cache_dir=tmp_path) == {"vit_small_r26_s32_224": real("vit_small_r26_s32_224")[2]}
    calls.clear()
    assert S.list_supported(cache_dir=tmp_path) == groups and calls == []  # from the cache
    S.cache_path(tmp_path).write_text("{not json")
    assert S.list_supported(cache_dir=tmp_path) == groups and sorted(calls) == sorted(names)  # rebuilt


def tiny_kwargs(name: str) -> dict:
    """``create_model`` overrides that shrink timm model ``name`` (width 32 / depth 1, a 2x2 patch grid)."""
    if name in CUSTOM_MODELS:
        return {}
    meta = S._meta_model(name)
    p = meta.patch_embed.proj.kernel_size[0]
    if type(meta).__name__ == "SwinTransformer":
        n = len(meta.layers)
        return dict(img_size=4 * p * 2 ** (n - 1), embed_dim=16, depths=(1,) * n, num_heads=(1,) * n)
    return dict(img_size=2 * p, embed_dim=32, depth=1, num_heads=2)


def _end_to_end(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        q = ivit.quantize(ivit.create_model(name, **tiny_kwargs(name)))
    ivit.calibrate(q, [random_pixels(2, q.img_size, seed=0)])
    prog = ivit.freeze(q, name=name)
    x = random_pixels(2, q.img_size, seed=3)
    assert torch.equal(ivit.Engine(prog, backend="cpu")(x), q.logits(x)), name


#: one timm name per supported family and feature, run end to end at tiny sizes in the default run
SAMPLE = ["deit3_small_patch16_224", "vit_base_patch16_siglip_256", "vit_small_patch14_reg4_dinov2",
          "vit_base_patch16_clip_quickgelu_224", "vit_betwixt_patch16_reg4_gap_256", "deit_small_distilled_patch16_224",
          "vit_srelpos_small_patch16_224", "vit_small_patch16_rope_mixed_ape_224", "vit_pe_core_tiny_patch16_384",
          "swin_tiny_patch4_window7_224"]


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_of_timm_names_end_to_end(name: str) -> None:
    assert S.support(name)[0], name
    _end_to_end(name)


@pytest.mark.slow
def test_every_listed_name_quantizes_and_freezes(tmp_path) -> None:
    """Every name ``ivit models`` lists: tiny real build, quantize, calibrate, freeze, engine bit-exact."""
    names = [n for group in S.list_supported(progress=True, cache_dir=tmp_path).values() for n in group]
    assert len(names) > 150
    failures = []
    for name in names:
        try:
            _end_to_end(name)
        except Exception as e:  # noqa: BLE001 - collect them all
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [
    ("vit_base_patch16_siglip_224", {}), ("vit_small_patch14_dinov2", {"img_size": 224}),
    ("vit_small_patch16_dinov3", {}), ("vit_relpos_small_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch16_rope_mixed_224", {})])
def test_full_size_names_bitexact(name: str, kw: dict) -> None:
    """The issue's names at full size (random init; DINOv2 at 224 instead of 518 to keep it minutes)."""
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model(name, **kw))
    ivit.calibrate(q, [random_pixels(2, q.img_size, seed=0)])
    x = random_pixels(1, q.img_size, seed=3)
    assert torch.equal(ivit.Engine(ivit.freeze(q), backend="cpu")(x), q.logits(x))
