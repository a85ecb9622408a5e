"""umT5 text encoder: parity with transformers' UMT5EncoderModel on random tiny weights, the
official calling convention (cleaning, 512-token padding, EOS, truncation, trimming) and the
accepted checkpoint layouts (official .pth, transformers/ComfyUI .safetensors)."""

from __future__ import annotations

import re

import pytest
import torch

torch.set_num_threads(1)

from wanlora.io_utils import save_safetensors  # noqa: E402
from wanlora.models import load_text_encoder  # noqa: E402
from wanlora.models.loading import CheckpointError  # noqa: E402
from wanlora.models.text_encoder import (  # noqa: E402
    TokenizerNotFoundError,
    clean_text,
    load_tokenizer,
)
from wanlora.tools.tiny import write_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

D, LAYERS, HEADS, DKV, DFF = 32, 2, 4, 8, 48

PROMPTS = [
    "A white cat wearing orange sunglasses sits on a surfboard.",
    "色调艳丽，过曝，静态，细节模糊不清",
    "x",
    "A dancer spins on a stage under a single spotlight, her white dress flowing around her, "
    "while rain falls on a quiet street at night and neon signs reflect in the puddles.",
]

# Independent statement of wan_numerics.md §1.5: transformers key -> official key.
HF_TO_OFFICIAL = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
]


def to_official(hf_sd):
    out = {}
    for k, v in hf_sd.items():
        if k == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        for pat, rep in HF_TO_OFFICIAL:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v.clone()
                break
        else:
            raise AssertionError(f"unmapped key {k}")
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "google" / "umt5-xxl"
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def ref(tokenizer):
    """A transformers UMT5EncoderModel with random weights (bf16-representable values)."""
    cfg = transformers.UMT5Config(
        vocab_size=len(tokenizer) + 7, d_model=D, d_kv=DKV, d_ff=DFF, num_layers=LAYERS,
        num_heads=HEADS, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if "norm" in name or "shared" in name else p.shape[-1] ** -0.5))
            p.copy_(p.to(torch.bfloat16).float())  # so the bf16 .pth holds the same values
    return model


@pytest.fixture(scope="module")
def pth_path(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("pth") / "models_t5_umt5-xxl-enc-bf16.pth"
    sd = {k: v.to(torch.bfloat16) for k, v in to_official(ref.state_dict()).items()}
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def te(pth_path, tok_dir):
    return load_text_encoder(pth_path, tokenizer=tok_dir)


def ref_encode(ref, tokenizer, prompts):
    enc = tokenizer([clean_text(p) for p in prompts], padding="max_length", truncation=True,
                    max_length=512, return_tensors="pt")
    with torch.no_grad():
        out = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    return [o[: int(n)] for o, n in zip(out, enc.attention_mask.sum(1))], enc


def assert_parity(a_list, b_list, tol=1e-5):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert a.shape == b.shape
        assert (a.float() - b.float()).abs().max().item() < tol


def test_official_pth_matches_transformers(te, ref, tokenizer):
    assert te.dtype == torch.float32 and te.d_model == D
    cfg = te.model.config
    assert (cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.vocab_size) == (
        HEADS, DKV, DFF, LAYERS, len(tokenizer) + 7)
    got = te.encode(PROMPTS)
    want, enc = ref_encode(ref, tokenizer, PROMPTS)
    assert_parity(got, want)
    # trimmed length == mask sum == cleaned token count + </s>
    lens = [len(tokenizer(clean_text(p)).input_ids) for p in PROMPTS]
    assert [g.shape[0] for g in got] == enc.attention_mask.sum(1).tolist() == lens
    # the embedding table is one tensor (tied)
    assert te.model.shared.weight is te.model.encoder.embed_tokens.weight


def test_padding_never_leaks(te):
    ids, mask = te.tokenize(PROMPTS[:2])
    assert ids.shape == mask.shape == (2, 512)
    n = mask.sum(1)
    for i in range(2):
        assert mask[i, : n[i]].all() and not mask[i, n[i]:].any()  # right padding
        assert ids[i, n[i] - 1] == 1 and (ids[i, n[i]:] == 0).all()  # </s> then <pad>
    garbage = ids.clone()
    garbage[mask == 0] = torch.randint(3, te.model.config.vocab_size, (int((mask == 0).sum()),))
    with torch.no_grad():
        a = te.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = te.model(input_ids=garbage, attention_mask=mask).last_hidden_state
    for i in range(2):
        assert torch.allclose(a[i, : n[i]], b[i, : n[i]], atol=1e-6)
        assert not torch.allclose(a[i, n[i]:], b[i, n[i]:])  # padding rows do change: never used


def test_batch_equals_one_by_one(te):
    batched = te.encode(PROMPTS)
    single = [te.encode([p])[0] for p in PROMPTS]
    assert_parity(batched, single, tol=1e-6)
    assert te.encode("x")[0].shape == single[2].shape and te.encode([]) == []


def test_text_cleaning(te):
    assert clean_text("  a\n\t  b  ") == "a b"
    assert clean_text("Tom &amp;amp; Jerry") == "Tom & Jerry"  # html.unescape twice
    assert clean_text("&lt;b&gt;") == "<b>"
    assert clean_text("caf\u00c3\u00a9") == "café"  # ftfy repairs mojibake
    assert clean_text("x\u3000y\u00a0z") == "x y z"
    a, b = te.encode(["A  cat\n\nwith &amp;amp; hat ", "A cat with & hat"])
    assert torch.equal(a, b)


def test_truncation_keeps_511_tokens_and_eos(te, tokenizer):
    long = " ".join(["a golden retriever runs across a green meadow"] * 150)
    full = tokenizer(clean_text(long)).input_ids
    assert len(full) > 600
    ids, mask = te.tokenize([long])
    assert mask.sum() == 512
    assert ids[0, :511].tolist() == full[:511] and ids[0, 511] == 1
    assert te.encode([long])[0].shape == (512, D)


def test_safetensors_layouts_and_extras(ref, tokenizer, tok_dir, tmp_path, te):
    want, _ = ref_encode(ref, tokenizer, PROMPTS[:2])
    hf = {k: v.clone() for k, v in ref.state_dict().items()}
    extras = {"spiece_model": torch.arange(16, dtype=torch.uint8), "scaled_fp8": torch.zeros(0)}
    # ComfyUI-style: encoder. prefix, shared.weight only, extra non-weight entries
    comfy = {k: v for k, v in hf.items() if k != "encoder.embed_tokens.weight"} | extras
    save_safetensors(comfy, tmp_path / "umt5_xxl_fp32.safetensors")
    # bare: no encoder. prefix, only embed_tokens
    bare = {k.removeprefix("encoder."): v for k, v in hf.items() if k != "shared.weight"}
    save_safetensors(bare, tmp_path / "bare.safetensors")
    # a full encoder-decoder checkpoint (transformers UMT5Model): decoder (its FFN is layer.2)
    # and LM head are skipped
    d = hf["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    full = hf | {"decoder.block.0.layer.2.DenseReluDense.wi_0.weight": d.clone(),
                 "decoder.final_layer_norm.weight": hf["encoder.final_layer_norm.weight"].clone(),
                 "lm_head.weight": hf["shared.weight"].clone()}
    save_safetensors(full, tmp_path / "full.safetensors")
    for name in ("umt5_xxl_fp32.safetensors", "bare.safetensors", "full.safetensors"):
        enc = load_text_encoder(tmp_path / name, tokenizer=tok_dir)
        assert_parity(enc.encode(PROMPTS[:2]), want)
        assert enc.identity == te.identity  # same weights, same tokenizer -> same identity
    # fp16 storage (ComfyUI's umt5_xxl_fp16): loads and stays close
    save_safetensors({k: v.half() for k, v in comfy.items() if v.is_floating_point()},
                     tmp_path / "umt5_xxl_fp16.safetensors")
    enc = load_text_encoder(tmp_path / "umt5_xxl_fp16.safetensors", tokenizer=tok_dir)
    assert_parity(enc.encode(PROMPTS[:2]), want, tol=1e-2)


@pytest.mark.parametrize("scale_name, per_row", [("scale_weight", False), ("weight_scale", True)])
def test_scaled_fp8_safetensors_dequantized(ref, tok_dir, tmp_path, scale_name, per_row):
    hf = {k: v.clone() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    qkey = "encoder.block.0.layer.0.SelfAttention.q.weight"
    scale = torch.rand(hf[qkey].shape[0], 1) + 0.1 if per_row else torch.tensor(0.25)
    hf[qkey] = (hf[qkey] / scale).to(torch.float8_e4m3fn)
    hf[qkey.replace("weight", scale_name)] = scale
    hf[qkey.replace("weight", "scale_input")] = torch.tensor(1.0)
    save_safetensors(hf, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    enc = load_text_encoder(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tokenizer=tok_dir)
    got = enc.model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert got.dtype == torch.float32
    assert torch.equal(got, hf[qkey].float() * scale)
    hf[qkey.replace("weight", scale_name)] = torch.ones(2, 2)  # block-wise: not supported
    save_safetensors(hf, tmp_path / "blockwise.safetensors")
    with pytest.raises(CheckpointError, match="block-wise"):
        load_text_encoder(tmp_path / "blockwise.safetensors", tokenizer=tok_dir)


def test_fp8_storage_bf16_compute(pth_path, tok_dir, te):
    enc = load_text_encoder(pth_path, tokenizer=tok_dir, fp8=True)
    assert enc.dtype == torch.bfloat16 and enc.fp8 and enc.identity.endswith("-fp8")
    attn = enc.model.encoder.block[0].layer[0].SelfAttention
    ffn = enc.model.encoder.block[0].layer[1].DenseReluDense
    assert attn.q.weight.dtype == ffn.wo.weight.dtype == torch.float8_e4m3fn
    assert attn.relative_attention_bias.weight.dtype == torch.bfloat16
    got, want = enc.encode(PROMPTS), te.encode(PROMPTS)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and g.shape == w.shape
        rel = (g.float() - w).norm() / w.norm()
        assert rel < 0.1  # float8 weights: a few percent, not garbage


def test_fp8_is_the_dit_fp8_path_and_exact(pth_path, tok_dir, ref, tmp_path):
    """fp8=True stores the block Linears as the DiT's Fp8Linear (one fp8 code path): the output
    equals, bit for bit, the bf16 encoder whose Linear weights are rounded to fp8 beforehand, and
    a scaled-fp8 file keeps its stored fp8 values and scales unchanged."""
    from wanlora.models.fp8 import Fp8Linear, dequantize_weight, quantize_weight

    enc = load_text_encoder(pth_path, tokenizer=tok_dir, fp8=True)
    lins = [m for m in enc.model.modules() if isinstance(m, Fp8Linear)]
    assert len(lins) == 7 * LAYERS and not any(m.scaled for m in lins)
    rounded = load_text_encoder(pth_path, tokenizer=tok_dir, dtype=torch.bfloat16)
    for name, m in rounded.model.encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("block."):
            m.weight.data = dequantize_weight(quantize_weight(m.weight, scaled=False)[0], None, torch.bfloat16)
    for g, w in zip(enc.encode(PROMPTS), rounded.encode(PROMPTS)):
        assert torch.equal(g, w)
    assert enc.to(dtype=torch.float32) is enc and all(m.compute_dtype == torch.float32 for m in lins)
    assert enc.encode(PROMPTS[:1])[0].dtype == torch.float32

    hf = {k: v.clone() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    qkey = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    scale = torch.rand(hf[qkey].shape[0], 1) + 0.1
    hf[qkey] = (hf[qkey] / scale).to(torch.float8_e4m3fn)
    hf[qkey.replace("weight", "weight_scale")] = scale
    save_safetensors(hf, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    enc = load_text_encoder(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tokenizer=tok_dir, fp8=True)
    wo = enc.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, Fp8Linear) and wo.scaled
    assert torch.equal(wo.weight.view(torch.uint8), hf[qkey].view(torch.uint8))
    assert torch.equal(wo.weight_scale, scale)
    assert not enc.model.encoder.block[0].layer[0].SelfAttention.q.scaled  # cast, no scale
    assert all(torch.isfinite(o).all() for o in enc.encode(PROMPTS[:2]))


def test_to_and_dtype(pth_path, tok_dir):
    enc = load_text_encoder(pth_path, tokenizer=tok_dir, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.device == torch.device("cpu")
    assert enc.encode(["x"])[0].dtype == torch.bfloat16
    assert enc.to(dtype=torch.float32) is enc and enc.dtype == torch.float32


def test_missing_tokenizer_error_names_files_and_place(pth_path, tmp_path):
    try:  # a machine whose HF cache holds the real tokenizer would find it: nothing to test then
        transformers.AutoTokenizer.from_pretrained("google/umt5-xxl", local_files_only=True)
        pytest.skip("google/umt5-xxl is in the local Hugging Face cache")
    except Exception:
        pass
    lonely = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    lonely.write_bytes(pth_path.read_bytes())
    with pytest.raises(TokenizerNotFoundError) as e:
        load_text_encoder(lonely)
    msg = str(e.value)
    assert "spiece.model" in msg and "tokenizer.json" in msg and "--t5_tokenizer" in msg
    assert str(tmp_path / "google" / "umt5-xxl") in msg
    with pytest.raises(TokenizerNotFoundError, match="spiece.model"):
        load_text_encoder(lonely, tokenizer=tmp_path)  # a folder without tokenizer files


def test_tokenizer_sources(tok_dir, tokenizer, tmp_path):
    bare = tmp_path / "bare"  # only spiece.model, no config files: still a T5 tokenizer
    bare.mkdir()
    (bare / "spiece.model").write_bytes((tok_dir / "spiece.model").read_bytes())
    text = "A cat, 一只猫"
    assert load_tokenizer(bare)(text).input_ids == tokenizer(text).input_ids
    assert load_tokenizer(bare / "spiece.model")(text).input_ids == tokenizer(text).input_ids
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere" / "umt5")
    with pytest.raises(TokenizerNotFoundError, match="local Hugging Face cache"):
        load_tokenizer("wanlora-tests/no-such-tokenizer")


def test_tokenizer_found_beside_checkpoint(pth_path, tok_dir, tmp_path, te):
    (tmp_path / "google").mkdir()
    (tmp_path / "google" / "umt5-xxl").symlink_to(tok_dir, target_is_directory=True)
    ckpt = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    ckpt.symlink_to(pth_path)
    assert load_text_encoder(ckpt).identity == te.identity


def test_bad_checkpoints_are_named(ref, tok_dir, tokenizer, tmp_path):
    sd = to_official(ref.state_dict())
    bad = dict(sd, **{"blocks.0.attn.extra.weight": torch.zeros(2)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth.*blocks\.0\.attn\.extra\.weight"):
        load_text_encoder(tmp_path / "bad.pth", tokenizer=tok_dir)
    plain = {k: v for k, v in sd.items() if k != "blocks.1.pos_embedding.embedding.weight"}
    torch.save(plain, tmp_path / "plain_t5.pth")
    with pytest.raises(CheckpointError, match="relative-position"):
        load_text_encoder(tmp_path / "plain_t5.pth", tokenizer=tok_dir)
    hf_extra = {k: v.clone() for k, v in ref.state_dict().items()}
    hf_extra["encoder.block.0.layer.0.SelfAttention.x.weight"] = torch.zeros(2)
    save_safetensors(hf_extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="does not have"):
        load_text_encoder(tmp_path / "extra.safetensors", tokenizer=tok_dir)
    exact = dict(sd, **{"token_embedding.weight": sd["token_embedding.weight"][: len(tokenizer)]})
    torch.save(exact, tmp_path / "exact_vocab.pth")
    grown = load_tokenizer(tok_dir)
    grown.add_tokens(["zzqxw"])  # an added token beyond the embedding table
    enc = load_text_encoder(tmp_path / "exact_vocab.pth", tokenizer=grown)
    assert enc.encode(["a cat"])[0].shape[0] == 3
    with pytest.raises(ValueError, match="outside the encoder"):
        enc.encode(["zzqxw"])
    small = dict(sd, **{"token_embedding.weight": sd["token_embedding.weight"][:10]})
    torch.save(small, tmp_path / "small_vocab.pth")
    with pytest.raises(CheckpointError, match="tokenizer has"):
        load_text_encoder(tmp_path / "small_vocab.pth", tokenizer=tok_dir)


@pytest.mark.parametrize("kind, keys, flag", [
    ("dit", {"patch_embedding.weight": (4, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (4, 4),
             "head.head.weight": (64, 4)}, "pass it as --dit"),
    ("vae", {"encoder.conv1.weight": (4, 3, 3, 3, 3), "decoder.conv1.weight": (4, 16, 3, 3, 3),
             "conv2.weight": (16, 16, 1, 1, 1)}, "Wan2.1 VAE (Wan2.1_VAE.pth); pass it as --vae"),
    ("lora", {"lora_unet_blocks_0_self_attn_q.lora_down.weight": (2, 4),
              "lora_unet_blocks_0_self_attn_q.lora_up.weight": (4, 2)}, "--lora_weight"),
])
def test_other_model_given_as_t5_is_named(kind, keys, flag, tok_dir, tmp_path):
    """A DiT / VAE / LoRA passed as --t5 is named with the flag that takes it, not as N unknown keys."""
    f = tmp_path / f"{kind}.safetensors"
    save_safetensors({k: torch.zeros(s) for k, s in keys.items()}, f)
    with pytest.raises(CheckpointError) as info:
        load_text_encoder(f, tokenizer=tok_dir)
    msg = str(info.value)
    assert msg.startswith(f"{f}: --t5 expects the umT5-XXL encoder") and flag in msg, msg
    assert "keys are not umT5" not in msg and "not a diffusion model" not in msg
