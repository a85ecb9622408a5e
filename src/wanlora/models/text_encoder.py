"""The umT5-XXL text encoder and its tokenizer, as the official Wan pipelines run them.

The network is transformers' :class:`~transformers.UMT5EncoderModel`, which computes exactly what
the official ``wan/modules/t5.py: T5Encoder`` computes (no ``1/sqrt(d)`` attention scaling, one
relative-position table per layer, gated tanh-GELU FFN, T5 RMS norm; ``wan_numerics.md`` §1.4-1.5).
This module only reads the weights into it and reproduces the official calling convention
(``wan/modules/t5.py: T5EncoderModel.__call__`` and ``wan/modules/tokenizers.py``):

1. clean each prompt: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse every
   whitespace run to one space, strip (:func:`clean_text`);
2. tokenize to exactly 512 ids, right-padded with ``<pad>`` (0), ``</s>`` (1) appended,
   truncated to 511 content tokens + ``</s>`` (:func:`tokenize`);
3. run the encoder on all 512 positions with the attention mask;
4. trim each output to its real length ``n_i = mask_i.sum()`` (``</s>`` included).

Accepted weight files (:func:`load_text_encoder`):

* the official ``models_t5_umt5-xxl-enc-bf16.pth`` (keys ``token_embedding.weight``,
  ``blocks.N.attn.q.weight``, ...), renamed with :func:`official_to_hf_key`;
* a transformers-layout ``.safetensors`` such as ComfyUI's ``umt5_xxl_fp16.safetensors`` or
  ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (keys ``encoder.block.N.layer.0.SelfAttention.q.weight``
  or the same without ``encoder.``, ``shared.weight``). Entries that are not weights
  (``spiece_model``, ``scaled_fp8``, ``*.scale_input``, ``*.comfy_quant``) are ignored; the
  per-tensor or per-row scales of scaled-fp8 files (``*.scale_weight`` / ``*.weight_scale``) are
  applied (``weight * scale`` in float32), or kept beside the stored fp8 values with ``fp8=True``.

fp8 storage (``fp8=True``, ``--fp8_t5``) is the DiT's (:mod:`wanlora.models.fp8`): the block
Linears become :class:`~wanlora.models.fp8.Fp8Linear`, dequantized per call into the compute dtype.

With transformers' ``"eager"`` attention (the default here) the outputs are bit-identical to the
official ``T5Encoder`` + ``HuggingfaceTokenizer`` on CPU, in float32 and in bfloat16 (checked on
random tiny weights); ``"sdpa"`` differs by float rounding only.

The architecture (``d_model``, heads, ``d_kv``, ``d_ff``, layers, vocabulary, buckets) is read from
the weight shapes; the model is built on the meta device and its parameters are assigned from the
memory-mapped checkpoint, so no second copy of the 11 GB encoder is ever made in RAM.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from pathlib import Path

import torch
from torch import nn

from wanlora.models.fp8 import FP8_DTYPE, Fp8Linear, convert_to_fp8_linears, dequantize_weight, quantize_weight
from wanlora.models.loading import CheckpointError, describe_checkpoint, load_state_dict
from wanlora.tasks import T5_FILE, TOKENIZER_DIR

__all__ = [
    "TextEncoder",
    "TokenizerNotFoundError",
    "load_text_encoder",
    "load_tokenizer",
    "clean_text",
    "tokenize",
    "official_to_hf_key",
    "umt5_config_from_state_dict",
    "TEXT_LEN",
    "T5_CHECKPOINT_NAME",
    "TOKENIZER_NAME",
]

#: Token count every prompt is padded/truncated to (``wan_shared_cfg.text_len``).
TEXT_LEN = 512
#: File name of the official encoder weights in every Wan release folder.
T5_CHECKPOINT_NAME = T5_FILE
#: Hub id of the tokenizer, and the sub-folder of the official release that holds it.
TOKENIZER_NAME = TOKENIZER_DIR
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Official (wan/modules/t5.py T5Encoder) key -> key relative to transformers' UMT5 encoder stack.
_OFFICIAL_TO_HF = [
    (re.compile(r"^token_embedding\.weight$"), "embed_tokens.weight"),
    (re.compile(r"^norm\.weight$"), "final_layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.weight$"), r"block.\1.layer.0.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$"), r"block.\1.layer.0.SelfAttention.\2.weight"),
    (
        re.compile(r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$"),
        r"block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (re.compile(r"^blocks\.(\d+)\.norm2\.weight$"), r"block.\1.layer.1.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$"), r"block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc1\.weight$"), r"block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc2\.weight$"), r"block.\1.layer.1.DenseReluDense.wo.weight"),
]
# A transformers-layout key, with any prefix (``encoder.``, ``text_encoders.t5xxl.transformer.encoder.``).
_HF_KEY = re.compile(
    r"^(?:(?P<prefix>.*)\.)?(?P<name>block\.\d+\.layer\.[01]\..+|final_layer_norm\.weight|"
    r"embed_tokens\.weight|shared\.weight)$"
)
# Entries of ComfyUI files that are not encoder weights.
_IGNORED = re.compile(r"(^|\.)(spiece_model|scaled_fp8|scale_input|input_scale|comfy_quant)$")
# The decoder half and LM head of a full encoder-decoder (transformers ``UMT5Model``) checkpoint.
_DECODER = re.compile(r"(^|\.)(decoder\.|lm_head\.weight$)")
# Per-tensor scales of scaled-fp8 files (``<layer>.scale_weight``, newer ``<layer>.weight_scale``).
_SCALES = ("scale_weight", "weight_scale")

# The Linear layers of one block (stored in float8 with fp8=True).
_LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
            "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


def _is_fp8_linear(name: str) -> bool:
    """Whether the encoder-stack module ``name`` (``block.3.layer.1.DenseReluDense.wo``) is one of
    the block Linears that ``fp8=True`` stores in float8."""
    return name.startswith("block.") and name.endswith(tuple("." + n for n in _LINEARS))


class TokenizerNotFoundError(CheckpointError):
    """No umT5 tokenizer files where they were looked for (the message says where to put them)."""


# ------------------------------------------------------------------------------------------------
# Tokenizer


def clean_text(text: str) -> str:
    """Clean a prompt as the official pipeline does before tokenizing.

    ``wan/modules/tokenizers.py: HuggingfaceTokenizer._clean`` with ``clean='whitespace'``:
    ``ftfy.fix_text``, ``html.unescape`` twice, strip, every whitespace run -> one space, strip.
    Case and punctuation are kept.
    """
    import ftfy
    import regex  # the official code uses `regex`, whose \\s is Unicode White_Space

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _tokenizer_folder_ok(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _from_folder(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError):
        if not (folder / "spiece.model").is_file():
            raise
    # A bare folder with only spiece.model (no tokenizer_config.json): it is a T5 tokenizer.
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0, local_files_only=True)


def load_tokenizer(source: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None):
    """Find and load the umT5 tokenizer, offline.

    Args:
        source: a folder holding ``spiece.model`` and/or ``tokenizer.json`` (the official
            release's ``google/umt5-xxl/``), one of those files, or a hub id (``google/umt5-xxl``)
            resolved from the local Hugging Face cache only (never downloaded).
        checkpoint: the encoder weights' path; with ``source=None`` the tokenizer is looked for
            beside it (``<folder>/google/umt5-xxl/``, then ``<folder>/``), then in the HF cache.

    Returns:
        a transformers tokenizer (``<pad>`` 0, ``</s>`` 1 as umT5).

    Raises:
        TokenizerNotFoundError: nothing found; the message lists the places tried and the files
            to put there.
    """
    # Candidates in order: folders (Path) and hub ids (str, local cache only).
    candidates: list[Path | str] = []
    if source is not None:
        p = Path(source)
        p = p.parent if p.is_file() else p
        hub_id = not p.exists() and _HUB_ID.match(str(source))
        candidates.append(str(source) if hub_id else p)
    else:
        if checkpoint is not None:
            base = Path(checkpoint)
            base = base if base.is_dir() else base.parent
            candidates += [base / TOKENIZER_NAME, base]
        candidates.append(TOKENIZER_NAME)
    tried: list[str] = []
    for c in candidates:
        if isinstance(c, Path):
            if _tokenizer_folder_ok(c):
                return _from_folder(c)
            tried.append(f"{c} ({'no spiece.model or tokenizer.json there' if c.exists() else 'does not exist'})")
            continue
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(c, local_files_only=True)
        except Exception as e:  # not in the local cache (offline): OSError and relatives
            tried.append(f"hub id {c!r} in the local Hugging Face cache ({type(e).__name__})")
    base = Path(checkpoint) if checkpoint is not None else Path(".")
    where = (base if base.is_dir() else base.parent) / TOKENIZER_NAME
    raise TokenizerNotFoundError(
        "umT5 tokenizer not found; tried: " + "; ".join(tried) + ". "
        f"Fix: copy the official release's `{TOKENIZER_NAME}/` folder (files `spiece.model`, and when "
        "present `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) to "
        f"`{where}` or any folder you pass as --t5_tokenizer FOLDER; or, with network access, fill the "
        f"cache with `huggingface-cli download {TOKENIZER_NAME} spiece.model tokenizer.json "
        "tokenizer_config.json special_tokens_map.json`."
    )


def tokenize(tokenizer, texts: list[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenize prompts as ``T5EncoderModel.__call__`` does.

    Args:
        tokenizer: a transformers umT5 tokenizer (:func:`load_tokenizer`).
        texts: prompts (a single string is accepted as a list of one), cleaned with
            :func:`clean_text` first.
        text_len: padded length (512, ``wan_numerics.md`` §1.1).

    Returns:
        ``(ids, mask)``, both ``[B, text_len]`` int64: ids right-padded with ``<pad>``, ``</s>``
        appended after at most ``text_len - 1`` content tokens; mask 1 on real tokens (``</s>``
        included), 0 on padding.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = tokenizer(
        [clean_text(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return out.input_ids.long(), out.attention_mask.long()


def _tokenizer_identity(tokenizer) -> str:
    probe = "A cat, 一只猫 <b>&amp; 123 …</b> Zürich"
    ids = tokenizer(probe, add_special_tokens=True).input_ids
    return f"{len(tokenizer)}:" + ",".join(map(str, ids))


# ------------------------------------------------------------------------------------------------
# Weights


def official_to_hf_key(key: str) -> str | None:
    """The transformers encoder-stack name (``block.0.layer.0.SelfAttention.q.weight``) of an
    official ``T5Encoder`` key (``blocks.0.attn.q.weight``), or ``None`` for an unknown key.
    Table: ``wan_numerics.md`` §1.5."""
    for pattern, repl in _OFFICIAL_TO_HF:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def _find_scale(sd: dict[str, torch.Tensor], key: str, t: torch.Tensor, path) -> torch.Tensor | None:
    """The scale of a scaled-fp8 weight as ``[out, 1]`` float32 (:func:`~wanlora.models.fp8.row_scale`),
    ``None`` for a plain weight."""
    from wanlora.models.fp8 import fp8_scale_key, row_scale

    scale_key = fp8_scale_key(key, sd)
    if scale_key is None:
        return None
    try:
        return row_scale(sd[scale_key], t.shape[0])
    except ValueError as e:
        raise CheckpointError(f"{path}: {key}: {e} — use the fp16/bf16 umT5 file instead") from None


def _other_model(raw: dict[str, torch.Tensor]) -> str | None:
    """What a file given as ``--t5`` holds instead, with the flag that takes it (a Wan DiT, a VAE, a
    LoRA, CLIP, a diffusers transformer: :func:`wanlora.models.loading.describe_checkpoint`), or
    ``None`` when it looks like a T5 encoder or nothing known."""
    what = describe_checkpoint(raw)
    if what is None:
        return "a Wan DiT (diffusion model) checkpoint; pass it as --dit (or --dit_high_noise)"
    if "umT5" in what or what.startswith("not a Wan DiT"):
        return None
    return what.replace(", not a diffusion model;", ";")


def _normalize_state_dict(raw: dict[str, torch.Tensor], path):
    """Map a raw checkpoint to transformers encoder-stack names (``embed_tokens.weight``, ``block.N...``).

    Returns:
        ``(tensors, scales)``: the stored tensors (still memory-mapped) and, for scaled-fp8
        weights, their scales (applied one tensor at a time while loading, never all at once).

    Raises:
        CheckpointError: unknown weight keys (a DiT, VAE or LoRA file is named, with its flag), or
            neither layout recognized.
    """
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    official = "token_embedding.weight" in raw or any(k.startswith("blocks.") for k in raw)
    for key, t in raw.items():
        if _IGNORED.search(key) or key.endswith(tuple("." + x for x in _SCALES)):
            continue
        if official:
            name = official_to_hf_key(key)
        elif _DECODER.search(key):
            continue  # a full encoder-decoder checkpoint: the decoder is not needed
        else:
            m = _HF_KEY.match(key)
            if m is None:
                name = None
            elif m.group("name") in ("shared.weight", "embed_tokens.weight"):
                if "embed_tokens.weight" in out:
                    continue  # shared and encoder.embed_tokens are the same tied table
                name = "embed_tokens.weight"
            else:
                name = m.group("name")
        if name is None:
            unknown.append(key)
            continue
        out[name] = t
        scale = _find_scale(raw, key, t, path)
        if scale is not None:
            scales[name] = scale
    if unknown:
        other = _other_model(raw)
        if other is not None:
            raise CheckpointError(
                f"{path}: --t5 expects the umT5-XXL encoder ({T5_CHECKPOINT_NAME}), but this file is {other}")
        raise CheckpointError(
            f"{path}: {len(unknown)} keys are not umT5 encoder weights (e.g. {unknown[:4]}); "
            f"expected the official {T5_CHECKPOINT_NAME} layout (token_embedding.weight, "
            "blocks.N.attn.q.weight, ...) or the transformers layout "
            "(encoder.block.N.layer.0.SelfAttention.q.weight, shared.weight, ...)"
        )
    if "embed_tokens.weight" not in out:
        raise CheckpointError(
            f"{path}: no token embedding (token_embedding.weight / shared.weight) — not a umT5 "
            "encoder checkpoint"
        )
    return out, scales


def umt5_config_from_state_dict(sd: dict[str, torch.Tensor], path="checkpoint"):
    """A ``transformers.UMT5Config`` read from weight shapes (transformers encoder-stack names).

    vocab and ``d_model`` from the embedding ``[V, D]``; layers from the block indices; heads
    from the relative-attention table ``[buckets, heads]``; ``d_kv = q.rows / heads``; ``d_ff``
    from ``wi_0`` ``[d_ff, D]``. Max distance 128, eps 1e-6, gated-gelu (official ``umt5_xxl``).

    Raises:
        CheckpointError: missing tables, or a plain-T5 checkpoint (one shared position table).
    """
    from transformers import UMT5Config

    vocab, d_model = sd["embed_tokens.weight"].shape
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("block.")})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{path}: encoder blocks missing or not numbered 0..N-1 ({layers[:5]}...)")
    bias_key = "block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    no_table = [i for i in layers if bias_key.format(i) not in sd]
    if no_table:
        raise CheckpointError(
            f"{path}: layers {no_table[:5]} have no relative-position table; umT5 has one per layer "
            "(plain T5 shares layer 0's) — this is not the umT5-XXL encoder Wan uses"
        )
    buckets, heads = sd[bias_key.format(0)].shape
    q_rows = sd["block.0.layer.0.SelfAttention.q.weight"].shape[0]
    d_ff = sd["block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    if q_rows % heads:
        raise CheckpointError(f"{path}: q has {q_rows} rows, not a multiple of {heads} heads")
    cfg = UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=q_rows // heads,
        d_ff=d_ff,
        num_layers=len(layers),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return cfg


def _fp8_gated_ffn_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # transformers' forward casts the activations to wo's weight dtype (float8 here), which would
    # round them to fp8; keep them in the compute dtype instead. Same formula:
    # wo(gelu_tanh(wi_0 x) * wi_1 x).
    h = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    return self.wo(self.dropout(h))


def _identity(sd: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], cfg) -> str:
    """``umt5-<d_model>x<layers>-<12 hex>``: sizes plus a hash of a few weight slices."""
    h = hashlib.sha256()
    last = cfg.num_layers - 1
    for key in ("embed_tokens.weight", "block.0.layer.0.SelfAttention.q.weight",
                f"block.{last}.layer.1.DenseReluDense.wo.weight", "final_layer_norm.weight"):
        rows = -(-8192 // max(1, sd[key][0].numel())) if sd[key].dim() > 1 else None
        t, scale = sd[key][:rows], scales.get(key)
        t = dequantize_weight(t, None if scale is None else scale[: t.shape[0]], torch.float32)
        t = t.reshape(-1)[:8192]
        # rounded to bfloat16: the official bf16 .pth and an fp16 copy of it share an identity
        t = t.to(torch.bfloat16).contiguous().view(torch.int16)
        h.update(key.encode())
        h.update(t.numpy().tobytes())
    return f"umt5-{cfg.d_model}x{cfg.num_layers}-{h.hexdigest()[:12]}"


# ------------------------------------------------------------------------------------------------
# The encoder


class TextEncoder:
    """umT5 encoder + tokenizer with the official calling convention.

    Attributes:
        model: the ``transformers.UMT5EncoderModel`` (eval mode, no grad).
        tokenizer: the umT5 tokenizer.
        text_len: 512.
        identity: short string naming the weights (``umt5-<d_model>x<layers>-<hash>``, plus the
            tokenizer's hash and ``-fp8`` when stored in float8); a text cache made with another
            identity is stale.
        fp8: Linear weights stored in float8_e4m3fn, computed in :attr:`dtype`.
    """

    def __init__(self, model, tokenizer, identity: str, fp8: bool = False, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.fp8 = fp8
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        """Device of the weights (the embedding table's)."""
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding's dtype; float8 Linear weights are upcast to it)."""
        return self.model.shared.weight.dtype

    @property
    def d_model(self) -> int:
        """Output width (4096 for umT5-XXL): the DiT's ``text_dim``."""
        return self.model.config.d_model

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextEncoder":
        """Move (and, without fp8, cast) the model in place; returns ``self``."""
        if dtype is not None and self.fp8:
            for p in self.model.parameters():
                if p.dtype != FP8_DTYPE:
                    p.data = p.data.to(dtype)
            for m in self.model.modules():
                if isinstance(m, Fp8Linear):
                    m.compute_dtype = dtype
        elif dtype is not None:
            self.model.to(dtype=dtype)
        if device is not None:
            self.model.to(device=device)
        return self

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` ``[B, 512]`` (see :func:`tokenize`)."""
        return tokenize(self.tokenizer, texts, self.text_len)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Encode prompts; ``T5EncoderModel.__call__`` of the official code.

        Args:
            texts: prompts (a single string is accepted as a list of one).

        Returns:
            one ``[L_i, d_model]`` tensor per prompt in the model's dtype and on its device,
            ``L_i`` = the prompt's real token count including ``</s>`` (<= 512). The encoder runs
            on all 512 padded positions with the mask; padding outputs are dropped.

        Raises:
            ValueError: a token id beyond the embedding table (the tokenizer belongs to another
                model; the message names the tokenizer folder to use).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        ids, mask = self.tokenize(texts)
        vocab = self.model.config.vocab_size
        if int(ids.max()) >= vocab:
            raise ValueError(
                f"token id {int(ids.max())} is outside the encoder's {vocab}-row embedding table: the "
                f"tokenizer does not belong to these weights (use the release's {TOKENIZER_NAME}/ folder)"
            )
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lens = mask.sum(dim=1).tolist()
        return [h[:n].clone() for h, n in zip(hidden, lens)]  # own storage: padding rows freed

    __call__ = encode

    def __repr__(self) -> str:
        c = self.model.config
        return (f"TextEncoder(d_model={c.d_model}, layers={c.num_layers}, heads={c.num_heads}, "
                f"vocab={c.vocab_size}, dtype={self.dtype}, fp8={self.fp8}, device={self.device}, "
                f"identity={self.identity!r})")


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8: bool = False,
    attn_implementation: str = "eager",
) -> TextEncoder:
    """Load the umT5 encoder from an official ``.pth`` or a transformers-layout ``.safetensors``.

    Args:
        path: ``models_t5_umt5-xxl-enc-bf16.pth``, or a ``.safetensors`` file / shard set in the
            transformers layout (ComfyUI ``umt5_xxl_fp16.safetensors``, ...).
        tokenizer: a tokenizer object, a folder with ``spiece.model`` / ``tokenizer.json``, a hub
            id from the local cache, or ``None`` to look beside ``path`` (``google/umt5-xxl/``)
            and then in the HF cache (:func:`load_tokenizer`).
        dtype: compute dtype; default float32, or bfloat16 with ``fp8`` (the official
            inference dtype is bfloat16).
        device: where the model lives.
        fp8: store the Linear weights in float8_e4m3fn (half of bf16's memory), upcast to
            ``dtype`` at each call (the ``--fp8_t5`` option). Embedding, norms and position tables
            stay in ``dtype``.
        attn_implementation: transformers attention backend. ``"eager"`` (default) is
            bit-identical to the official ``T5Attention`` on CPU in float32 and bfloat16
            (``q·k + bias``, softmax, ``·v``); ``"sdpa"`` is faster and differs by float rounding.

    Returns:
        a :class:`TextEncoder` in eval mode with gradients off.

    Raises:
        CheckpointError: unreadable file, unknown keys, missing or misshapen weights, a
            tokenizer larger than the embedding table.
        TokenizerNotFoundError: no tokenizer found (the message says which files to put where).
        ValueError: ``dtype=torch.float8_e4m3fn`` (fp8 is a storage option; pass ``fp8=True``
            with a bfloat16 compute dtype).
    """
    from transformers import UMT5EncoderModel

    if dtype is None:
        dtype = torch.bfloat16 if fp8 else torch.float32
    if fp8 and dtype == torch.float8_e4m3fn:
        raise ValueError("load_text_encoder: dtype is the compute dtype with fp8=True; pass "
                         "dtype=torch.bfloat16 (or leave it None)")
    raw = load_state_dict(path)
    sd, scales = _normalize_state_dict(raw, path)
    cfg = umt5_config_from_state_dict(sd, path)
    identity = _identity(sd, scales, cfg)

    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, checkpoint=path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding table only "
            f"{cfg.vocab_size} rows; the tokenizer belongs to another model — use the release's "
            f"{TOKENIZER_NAME}/ folder"
        )

    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    if fp8:
        # A scaled-fp8 file keeps its stored values and scales; other weights are cast (--fp8_base's
        # plain saturating cast): the Linears are wanlora.models.fp8.Fp8Linear, as the DiT's.
        stored = {k.rpartition(".")[0] for k, t in sd.items() if t.dtype == FP8_DTYPE and k in scales}
        convert_to_fp8_linears(model.encoder, scaled=False, compute_dtype=dtype, scaled_layers=stored,
                               select=_is_fp8_linear)
        for block in model.encoder.block:
            ffn = block.layer[1].DenseReluDense
            ffn.forward = _fp8_gated_ffn_forward.__get__(ffn)

    expected = {k[len("encoder."):]: v for k, v in model.state_dict().items()
                if k.startswith("encoder.") and not k.endswith(".weight_scale")}
    missing = sorted(expected.keys() - sd.keys())
    if missing:
        raise CheckpointError(f"{path}: umT5 weights missing: {missing[:5]} ({len(missing)} in all)")
    extra = sorted(sd.keys() - expected.keys())
    if extra:
        raise CheckpointError(f"{path}: weights that the umT5 encoder does not have: {extra[:5]}")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: umT5 weights of unexpected shape: {wrong[:3]}")

    for key in expected:
        module_path, _, attr = key.rpartition(".")
        module = model.encoder.get_submodule(module_path)
        t, scale = sd[key], scales.get(key)
        if isinstance(module, Fp8Linear):
            if t.dtype == FP8_DTYPE:  # stored in fp8: kept, with its scale when it has one
                if module.scaled:
                    module.weight_scale = scale.to(device)
            else:
                t, _ = quantize_weight(t, scaled=False)
        else:
            t = dequantize_weight(t, scale, dtype)  # only casts an unscaled tensor
        setattr(module, attr, nn.Parameter(t.to(device), requires_grad=False))
    model.shared.weight = model.encoder.embed_tokens.weight  # the tied table, one tensor
    del raw, sd
    model.eval().requires_grad_(False)

    identity = identity + "-tok" + hashlib.sha256(_tokenizer_identity(tokenizer).encode()).hexdigest()[:8]
    if fp8:
        identity += "-fp8"
    return TextEncoder(model, tokenizer, identity, fp8=fp8)
