"""Official checkpoint conversion: whole-tokenizer oracle, key tables both ways, configs, checkpoint files.

Run: .venv/bin/python -m pytest tests/unit/test_convert.py -q

`official_tok_small.npz` holds the official tokenizer's answers at docs/method.md, restok §5.1 "tiny-parity" (official
"small" ViTs and fixed pixel CNNs, 93M parameters) for weights that `official_fill` regenerates from each key's
name, so no state dict is stored (tests/data/README.md, last section). The tokenizer tests share one model built
through the user-facing importer (module fixture); that oracle costs ~15 s on 2 cores, the rest is milliseconds.
"""

import copy
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from restok.convert.checkpoint import export_official_checkpoint, import_official_checkpoint
from restok.convert.official import export_official_generator_config, official_generator_config
from restok.convert.tokenizer import (
    TOKENIZER_SKIP,
    check_official_layout,
    export_official_tokenizer_config,
    export_official_tokenizer_state,
    load_official_tokenizer_state,
    official_tokenizer_config,
)
from restok.models.generator import generator_config
from restok.models.tokenizer import PRESETS, TokenizerConfig

# The paper's L tokenizer config (official configs/training/ResTok/restok_l_128.yaml, model.vq_model).
L_VQ = dict(
    codebook_size=8192,
    token_size=8,
    use_l2_norm=True,
    commitment_cost=0.25,
    entropy_loss_ratio=0.0,
    vit_enc_model_size="large",
    vit_dec_model_size="large",
    vit_enc_patch_size=16,
    vit_dec_patch_size=16,
    rope_base_len=10_000,
    num_latent_tokens=128,
    num_min_tokens=4,
    test_num_latent_tokens=128,
    merge_tokens=True,
    hierarchy_stages=4,
    reduction_ratio=0.5,
    residual_image_tokens=True,
    residual_latent_tokens=True,
    learnable_latent_tokens=False,
    learnable_dec_image_tokens=True,
    multi_quant=True,
    vae_encoder=True,
    drop_latent_tokens=True,
    drop_prob=0.2,
    latent_hierarchy=True,
    encoder_feature_supervision=True,
    decoder_feature_supervision=True,
    learnable_dec_feat_tokens=True,
    use_vf="dinov3",
    reverse_proj=True,
)
L_TREE = {"model": {"vq_model": L_VQ}, "dataset": {"preprocessing": {"crop_size": 256}}}
# The tiny HAR of har_tiny_gpt.npz as the hub's config.json (the official ModelArgs fields).
TINY_GPT_ARGS = dict(
    dim=64,
    n_layer=2,
    n_head=4,
    n_kv_head=None,
    multiple_of=256,
    ffn_dim_multiplier=None,
    rope_base=10000,
    norm_eps=1e-5,
    initializer_range=0.02,
    token_dropout_p=0.0,
    attn_dropout_p=0.0,
    resid_dropout_p=0.0,
    ffn_dropout_p=0.0,
    drop_path_rate=0.0,
    num_classes=10,
    caption_dim=2048,
    class_dropout_prob=0.1,
    model_type="c2i",
    vocab_size=64,
    cls_token_num=1,
    block_size=16,
    max_batch_size=32,
    max_seq_len=2048,
    ar_token_num=4,
    spe_token_num=15,
)


def official_fill(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The deterministic weight of an official key: randn from a generator seeded by sha256(seed:key), scaled
    1/sqrt(fan_in) for >= 2-D tensors, 1 + 0.1 x for 1-D weights and layer scales, 0.1 x for biases."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) >= 2:
        return x / float(np.prod(shape[1:])) ** 0.5
    if key.endswith(".weight") or key.rsplit(".", 1)[-1].startswith("gamma"):
        return 1 + 0.1 * x
    return 0.1 * x


def _shape(row) -> tuple[int, ...]:
    return tuple(int(s) for s in row if s >= 0)


@pytest.fixture(scope="module")
def official_small():
    """(the regenerated official state dict, the npz, our model built by the importer, its provenance)."""
    d = np.load("tests/data/official_tok_small.npz")
    seed = int(d["fill_seed"][0])
    state = {str(k): official_fill(str(k), _shape(row), seed) for k, row in zip(d["keys"], d["key_shapes"])}
    # The frozen DINOv3 the official module carries: only its names matter (skipped), so no memory is spent.
    state.update(
        {str(k): torch.zeros(()).expand(*_shape(row)) for k, row in zip(d["teacher_keys"], d["teacher_key_shapes"])}
    )
    model, cfg, provenance = import_official_checkpoint(state, "tokenizer", config=json.loads(str(d["config"])))
    return state, d, model, provenance


def test_official_tokenizer_outputs_reproduced(official_small):
    _, d, model, provenance = official_small
    img = torch.from_numpy(d["images_u8"]).float() / 255
    captured = []
    hook = model.encoder.register_forward_hook(lambda module, args, out: captured.append(out[0]))  # z (B, L, 8)
    with torch.no_grad():
        codes = model.encode(img)
        hook.remove()
        z = captured[0]
        recon, recon4 = model.decode(codes), model.decode(codes, n_tokens=4)
    assert d["min_code_margin"][0] > 1e-3  # codes cannot flip on fp32 noise
    np.testing.assert_array_equal(codes.numpy(), d["codes"][:, 0])
    np.testing.assert_allclose(z.numpy(), d["z"][:, :, 0].transpose(0, 2, 1), atol=1e-5)
    np.testing.assert_allclose(recon.numpy(), d["recon"], atol=1e-4)
    np.testing.assert_allclose(recon4.numpy(), d["recon_n4"], atol=1e-4)
    assert np.abs(d["recon"] - d["recon_n4"]).max() > 0.1  # the prefix case really differs
    assert provenance["skipped_keys"] == sorted(str(k) for k in d["teacher_keys"])


def test_official_to_ours_to_official_is_identity(official_small):
    state, d, model, _ = official_small
    exported = export_official_tokenizer_state(model)
    assert set(exported) == {str(k) for k in d["keys"]}  # everything but the skipped teacher
    for key, value in exported.items():
        assert value.shape == state[key].shape and torch.equal(value, state[key]), key
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.data.zero_()
    load_official_tokenizer_state(twin, exported)
    for (key, ours), theirs in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(ours, theirs), key


def test_mismatches_are_listed_and_nothing_is_loaded(official_small):
    state, _, model, _ = official_small
    bad = {k: torch.zeros(()).expand(v.shape) for k, v in state.items() if not k.startswith("foundation_model.")}
    bad.pop("encoder.level_embedding.2")
    bad["encoder.conv_out.0.weight"] = torch.zeros(8, 511, 1, 1)
    bad["decoder.extra_token"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_official_tokenizer_state(model, bad)
    for needle in (
        "encoder.level_embedding.2 (-> encoder.image_level_emb)",
        "decoder.extra_token",
        "encoder.conv_out.0.weight -> encoder.proj.linears.0.weight: official (8, 511, 1, 1) vs ours "
        "(8, 512) (expected official (8, 512, 1, 1))",
    ):
        assert needle in str(err.value)
    with pytest.raises(ValueError, match=r"unexpected .*foundation_model\.model\.cls_token"):
        load_official_tokenizer_state(model, state, skip=())  # the teacher is refused without the allow-list
    for key, value in model.state_dict().items():  # a partial load would have zeroed something (weights are randn)
        assert value.abs().sum() > 0, key
    assert TOKENIZER_SKIP == ("foundation_model.*",)


def test_official_l_configs_translate():
    assert official_tokenizer_config(L_TREE) == PRESETS["restok-L/128"]
    inference = {
        **L_VQ,
        "drop_latent_tokens": False,
        "drop_prob": 0.0,
        "encoder_feature_supervision": False,
        "decoder_feature_supervision": False,
    }
    inference.pop("use_vf")
    cfg = official_tokenizer_config({"config": {**L_TREE, "model": {"vq_model": inference}}})
    assert (cfg.vf_align, cfg.vf_dim, cfg.drop_prob) == (False, None, 0.0)
    variant = {**L_VQ, "residual_latent_tokens": False, "learnable_dec_image_tokens": False, "merge_tokens": False}
    cfg = official_tokenizer_config({**L_TREE, "model": {"vq_model": variant}})
    assert (cfg.latent_init, cfg.image_queries, cfg.hierarchy_stages) == ("pool", "latent_maps", 1)
    for ours in (PRESETS["restok-L/128"], cfg, dataclasses.replace(cfg, vf_align=False, vf_dim=None)):
        assert official_tokenizer_config(export_official_tokenizer_config(ours)) == ours


@pytest.mark.parametrize(
    "key, value",
    [
        ("learnable_latent_tokens", True),
        ("vae_encoder", False),
        ("multi_quant", False),
        ("is_legacy", False),
        ("vit_enc_model_size", "huge"),
        ("reduction_ratio", 0.25),
        ("reverse_proj", False),
        ("num_latent_tokens", 96),
        ("decoder_feature_supervision", False),
        ("latent_hierarchy", False),
        ("use_l2_norm", False),
    ],
)
def test_unsupported_official_tokenizer_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=key.split("_feature")[0]):
        official_tokenizer_config({**L_TREE, "model": {"vq_model": {**L_VQ, key: value}}})


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(merge_op="avgpool"), "merge_op"),
        (dict(legacy_head=False), "legacy_head"),
        (dict(latent_init="learned"), "latent_init"),
        (dict(latent_init="learned", latent_queries="flat"), "latent_init"),
        (dict(pixel_res_blocks=1), "pixel_res_blocks"),
        (dict(enc_depth=12), "enc_width/depth/heads"),
        (dict(dec_heads=8), "dec_width/depth/heads"),
    ],
)
def test_export_names_the_blocking_switch(change, field):
    cfg = dataclasses.replace(TokenizerConfig(), **change)
    with pytest.raises(ValueError, match=f"tokenizer.{field}="):
        check_official_layout(cfg)
    with pytest.raises(ValueError, match="tokenizer.pixel_channels="):
        check_official_layout(PRESETS["restok-tiny/32"])


def test_official_generator_configs_translate():
    yaml_tree = {
        "model": {
            "vq_model": {"codebook_size": 8192, "num_latent_tokens": 128, "num_min_tokens": 4},
            "generator": {
                "model_type": "GPT-L",
                "ar_token_num": "${model.vq_model.num_min_tokens}",
                "spe_token_num": 127,
                "vocab_size": "${model.vq_model.codebook_size}",
                "block_size": "${model.vq_model.num_latent_tokens}",
                "num_classes": 1000,
                "cls_token_num": 1,
                "gpt_type": "c2i",
                "dropout_p": 0.1,
                "token_dropout_p": 0.1,
                "drop_path_rate": 0.0,
                "rope": True,
                "har": True,
            },
        }
    }
    cfg = official_generator_config(yaml_tree)
    assert cfg == generator_config("har-L", spe_token_num=127)
    assert official_generator_config(export_official_generator_config(cfg)) == cfg
    plain = official_generator_config(
        {**yaml_tree, "model": {**yaml_tree["model"], "generator": {**yaml_tree["model"]["generator"], "har": False}}}
    )
    assert (plain.mode, plain.num_special) == ("ar", 0)
    assert official_generator_config({**TINY_GPT_ARGS, "ffn_dim_multiplier": 2.0}).ffn_hidden_dim == 512
    for key, value in (("model_type", "t2i"), ("cls_token_num", 2), ("drop_path_rate", 0.1), ("n_kv_head", 2)):
        with pytest.raises(ValueError, match=key):
            official_generator_config({**TINY_GPT_ARGS, key: value})
    with pytest.raises(ValueError, match="needs model.generator"):
        official_generator_config(L_TREE)
    with pytest.raises(ValueError, match=r"lacks \['block_size'\]"):
        official_generator_config({k: v for k, v in TINY_GPT_ARGS.items() if k != "block_size"})


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_generator_hub_folder_through_the_importer(fmt, tmp_path, vectors):
    d = vectors("har_tiny_gpt")
    official = {k[3:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd.")}
    folder = tmp_path / "hub"
    folder.mkdir()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(official, str(folder / "model.safetensors"))
    else:  # a training-run file: nested under "model", torch.compile prefix
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in official.items()}}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(TINY_GPT_ARGS))
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(TINY_GPT_ARGS))
    config = None if fmt == "safetensors" else tmp_path / "args.yaml"  # default: config.json next to the weights
    model, cfg, provenance = import_official_checkpoint(folder, "generator", config=config)
    codes, labels = torch.from_numpy(d["codes"]).long(), torch.from_numpy(d["labels"]).long()
    with torch.no_grad():
        logits, _ = model(codes, labels)
    np.testing.assert_allclose(logits.numpy(), d["logits"], atol=1e-5)
    weights = next(folder.iterdir()) if fmt == "safetensors" else folder / "pytorch_model.bin"
    assert provenance["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["stripped_prefix"] == (None if fmt == "safetensors" else "_orig_mod.")
    assert (cfg.mode, cfg.num_special, provenance["skipped_keys"]) == ("har", 15, [])

    out = export_official_checkpoint(model, tmp_path / "export")
    again, cfg_again, _ = import_official_checkpoint(out, "generator")
    assert cfg_again == cfg
    for (key, ours), theirs in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(ours, theirs), key


def test_importer_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="kind="):
        import_official_checkpoint({}, "vae")
    with pytest.raises(ValueError, match="pass config="):
        import_official_checkpoint({"w": torch.zeros(1)}, "generator")
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        import_official_checkpoint(tmp_path, "tokenizer")
    with pytest.raises(ValueError, match="not a state dict"):
        import_official_checkpoint({"optimizer": 3}, "generator", config=TINY_GPT_ARGS)
