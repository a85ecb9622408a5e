"""docs/troubleshooting.md quotes the real error messages.

Every message block in the doc preceded by ``<!-- check: ID -->`` is an excerpt of an error that a
trigger below raises for real through the public functions; the test turns the excerpt into a
pattern (``<placeholder>`` and ``...`` match any text, the rest literally) and searches the actual
message for it. A reworded message, or a doc entry edited away from the code, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from wanlora.io_utils import save_safetensors, write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"

_BLOCK = re.compile(r"<!-- check: ([a-z0-9-]+) -->\n```text\n(.*?)\n```", re.S)
_PLACEHOLDER = re.compile(r"<[a-z_ ]+>")


def doc_excerpts() -> dict[str, str]:
    """``{id: excerpt}`` of the checked message blocks of the doc."""
    found: dict[str, str] = {}
    for m in _BLOCK.finditer(DOC.read_text(encoding="utf-8")):
        assert m.group(1) not in found, f"check id {m.group(1)} used twice in {DOC.name}"
        found[m.group(1)] = m.group(2)
    return found


def excerpt_pattern(excerpt: str) -> re.Pattern:
    """Literal text, with ``<placeholder>`` -> one or more characters on the line and
    ``...`` -> anything (also across lines)."""
    parts = [r"[^\n]+?".join(re.escape(p) for p in _PLACEHOLDER.split(chunk))
             for chunk in excerpt.split("...")]
    return re.compile(r"[\s\S]*?".join(parts))


def error_of(fn) -> str:
    """The message of the exception ``fn()`` raises (the test fails if it raises none)."""
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Triggers: id -> fn(tmp_path, tiny_dir) -> the actual message


def _unknown_task(tmp, tiny_dir):
    from wanlora.tasks import get_task

    return error_of(lambda: get_task("t2v-a14b"))


def _dit_given_vae(tmp, tiny_dir):
    from wanlora.models import load_dit

    return error_of(lambda: load_dit(tiny_dir("t2v-A14B") / "Wan2.1_VAE.pth", "t2v-A14B"))


def _vae_given_dit(tmp, tiny_dir):
    from wanlora.models import load_vae

    return error_of(lambda: load_vae(tiny_dir("t2v-A14B") / "low_noise_model"))


def _dit_wrong_task(tmp, tiny_dir):
    from wanlora.models import load_dit

    return error_of(lambda: load_dit(tiny_dir("t2v-A14B") / "low_noise_model", "i2v-A14B"))


def _dataset_typo(tmp, tiny_dir):
    from wanlora.dataset import DatasetConfigError, load_dataset_config

    (tmp / "clips").mkdir()
    toml = tmp / "dataset.toml"
    write_text(toml, '[general]\nresolution = [64, 64]\n\n[[datasets]]\nvideo_directory = "clips"\n'
                     "target_frame = [17]\n")
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(toml, "t2v-A14B")
    return str(info.value)


def _missing_caches(tmp, tiny_dir):
    from PIL import Image

    from wanlora.dataset import MissingCachesError, TrainingDataset

    (tmp / "images").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp / "images" / "red.png")
    write_text(tmp / "images" / "red.txt", "a red square")
    toml = tmp / "dataset.toml"
    write_text(toml, '[general]\nresolution = [64, 64]\n\n[[datasets]]\nimage_directory = "images"\n')
    with pytest.raises(MissingCachesError) as info:
        TrainingDataset(toml, task="t2v-A14B")
    return str(info.value)


def _video_length(tmp, tiny_dir):
    from wanlora.inference.pipeline import check_video_size
    from wanlora.tasks import get_task

    return error_of(lambda: check_video_size(get_task("t2v-A14B"), 480, 832, 80))


def _prompt_unknown_option(tmp, tiny_dir):
    from wanlora.inference.prompts import PromptFileError, read_prompt_file

    prompts = tmp / "prompts.txt"
    write_text(prompts, "# samples\na cat on a sofa --w 832 --x 3\n")
    with pytest.raises(PromptFileError) as info:
        read_prompt_file(prompts)
    assert f"{prompts}:2:" in str(info.value)  # the file and the line are named
    return str(info.value)


def _lycoris_ia3(tmp, tiny_dir):
    from wanlora.lora.layouts import LoraFormatError, load_lora_file

    name = "lora_unet_blocks_0_self_attn_q"
    path = tmp / "style_ia3.safetensors"
    save_safetensors({f"{name}.weight": torch.zeros(64), f"{name}.on_input": torch.tensor(False)}, path)
    with pytest.raises(LoraFormatError) as info:
        load_lora_file(path)
    return str(info.value)


def _merge_wrong_expert(tmp, tiny_dir):
    from wanlora.lora.merge import MergeError, merge_loras

    dit = tiny_dir("t2v-A14B") / "low_noise_model"
    lora = tmp / "style_high_noise.safetensors"
    tensors = {}
    for i in range(2):
        tensors[f"lora_unet_blocks_{i}_self_attn_q.lora_down.weight"] = torch.zeros(4, 64)
        tensors[f"lora_unet_blocks_{i}_self_attn_q.lora_up.weight"] = torch.zeros(64, 4)
        tensors[f"lora_unet_blocks_{i}_self_attn_q.alpha"] = torch.tensor(4.0)
    save_safetensors(tensors, lora, metadata={"wan.task": "t2v-A14B", "wan.expert": "high_noise"})
    out = tmp / "merged.safetensors"
    with pytest.raises(MergeError) as info:
        merge_loras(dit, [(lora, 1.0)], out, "t2v-A14B")
    assert not out.exists()
    return str(info.value)


def _attn_unknown(tmp, tiny_dir):
    from wanlora.models.attention import check_attn_mode

    return error_of(lambda: check_attn_mode("flash_attn"))


def _attn_sage_training(tmp, tiny_dir):
    from wanlora.models.attention import check_attn_mode

    return error_of(lambda: check_attn_mode("sage", training=True))


def _pth_pickle(tmp, tiny_dir):
    from wanlora.models.loading import load_state_dict

    class Planted:
        def __reduce__(self):
            return (open, (str(tmp / "PWNED"), "w"))

    torch.save({"w": Planted()}, tmp / "evil.pth")
    msg = error_of(lambda: load_state_dict(tmp / "evil.pth"))
    assert not (tmp / "PWNED").exists()
    return msg


def _jsonl_duplicate(tmp, tiny_dir):
    from wanlora.dataset.config import load_dataset_config
    from wanlora.dataset.items import list_items

    write_text(tmp / "m.jsonl", '{"image_path": "a.png", "caption": "x"}\n{"image_path": "a.png", "caption": "y"}\n')
    write_text(tmp / "d.toml", '[[datasets]]\nimage_jsonl_file = "m.jsonl"\ncache_directory = "c"\n')
    (item,) = [i for i in list_items(load_dataset_config(tmp / "d.toml", "t2v-A14B").datasets[0]) if i.problem]
    return item.problem


def _empty_dataset(tmp, tiny_dir):
    from wanlora.commands.preflight import preflight_cache_latents
    from wanlora.dataset.config import load_dataset_config
    from wanlora.tasks import get_task

    (tmp / "images").mkdir()
    write_text(tmp / "d.toml", '[[datasets]]\nimage_directory = "images"\n')
    config = load_dataset_config(tmp / "d.toml", "t2v-A14B")
    return error_of(lambda: preflight_cache_latents(config, get_task("t2v-A14B"), None))


def _vae_kind(tmp, tiny_dir):
    from wanlora.commands.preflight import check_vae_for_task
    from wanlora.tasks import get_task

    vae = tiny_dir("t2v-A14B") / "Wan2.1_VAE.pth"
    return error_of(lambda: check_vae_for_task(vae, get_task("ti2v-5B"), purpose="for the samples during training"))


def _one_cached_image(tmp, latents: torch.Tensor, resolution: int = 64):
    """A dataset of one image with hand-made caches (``latents`` as its latent cache) made under
    ``resolution``; returns the TOML path and its text with a ``{}`` for the resolution."""
    from PIL import Image

    from wanlora.dataset import caches as C
    from wanlora.dataset.config import load_dataset_config

    (tmp / "images").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp / "images" / "red.png")
    write_text(tmp / "images" / "red.txt", "a red square")
    body = '[general]\nresolution = [{0}, {0}]\n\n[[datasets]]\nimage_directory = "images"\ncache_directory = "c"\n'
    write_text(tmp / "dataset.toml", body.format(resolution))
    ds = load_dataset_config(tmp / "dataset.toml", "t2v-A14B").datasets[0]
    save_safetensors({"latents": latents}, tmp / "c" / C.latent_cache_name("red", 0, 1, 64, 64, "wan2.1"),
                     {"format": C.LATENT_FORMAT, "has_y": "0", "options": C.dumps(ds.shaping_options())})
    save_safetensors({"context": torch.zeros(3, 8)}, tmp / "c" / C.text_cache_name("red"),
                     {"format": C.TEXT_FORMAT, "caption": "a red square"})
    return tmp / "dataset.toml", body


def _stale_options(tmp, tiny_dir):
    """Caches whose recorded options say 64x64, under a TOML that now says 96x96."""
    from wanlora.dataset import MissingCachesError, TrainingDataset

    toml, body = _one_cached_image(tmp, torch.zeros(16, 1, 8, 8))
    TrainingDataset(toml, task="t2v-A14B")  # current: no error
    write_text(toml, body.format(96))
    with pytest.raises(MissingCachesError) as info:
        TrainingDataset(toml, task="t2v-A14B")
    return str(info.value)


def _nan_latent(tmp, tiny_dir):
    from wanlora.dataset import TrainingDataset

    toml, _ = _one_cached_image(tmp, torch.full((16, 1, 8, 8), float("nan")))
    ds = TrainingDataset(toml, task="t2v-A14B")
    return error_of(lambda: ds[0])


def _numbers(tmp, tiny_dir):
    from types import SimpleNamespace

    from wanlora.commands.preflight import check_train_numbers

    return error_of(lambda: check_train_numbers(SimpleNamespace(gradient_accumulation_steps=0, network_alpha=-1.0)))


def _output_unwritable(tmp, tiny_dir):
    import errno
    from unittest import mock

    from wanlora.commands import preflight

    with mock.patch.object(preflight.tempfile, "mkstemp", side_effect=PermissionError(errno.EACCES, "denied")):
        return error_of(lambda: preflight.check_output_dir(tmp / "out", "--output_dir"))


def _rank_too_wide(tmp, tiny_dir):
    from wanlora.commands.preflight import check_rank_fits, dit_widths

    dim = dit_widths(tiny_dir("t2v-A14B") / "low_noise_model")[0]
    return error_of(lambda: check_rank_fits(2 * dim, dim))


def _save_disk_full(tmp, tiny_dir):
    import errno

    from wanlora.io_utils import save_files

    out, spare = tmp / "out", tmp / "spare"
    out.mkdir()
    spare.mkdir()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    def ok(path):
        if "out" in path.parts:
            full(path)
        path.write_bytes(b"x")

    return error_of(lambda: save_files({out / "lora_high_noise.safetensors": ok,
                                        out / "lora_low_noise.safetensors": ok}, "LoRA weights", [spare]))


def _state(tmp):
    from wanlora.training.state_io import write_state_dir

    return write_state_dir(tmp / "lora-step00000004-state", {"lora": {"w": torch.zeros(2)}}, {"global_step": 4},
                           {"seed": 7, "loras": {"lora": {"rank": 8, "alpha": 8.0}}})


def _state_foreign_file(tmp, tiny_dir):
    from wanlora.training.state_io import read_state_dir

    folder = _state(tmp)
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"not read")
    return error_of(lambda: read_state_dir(folder))


def _state_old_format(tmp, tiny_dir):
    from wanlora.training.state_io import read_state_dir

    (tmp / "old").mkdir()
    write_text(tmp / "old" / "train_state.json", '{"global_step": 4}')
    return error_of(lambda: read_state_dir(tmp / "old"))


def _resume_layout(tmp, tiny_dir):
    from wanlora.training.state_io import read_state_dir

    folder = _state(tmp)
    return error_of(lambda: read_state_dir(folder, {"seed": 8, "loras": {"lora": {"rank": 16, "alpha": 8.0}}}))


def _generate_lora_task(tmp, tiny_dir):
    from types import SimpleNamespace

    from wanlora.commands.preflight import preflight_generate

    m = tiny_dir("t2v-A14B")
    lora = tmp / "ti2v_style.safetensors"
    save_safetensors({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 64),
                      "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(64, 4)}, lora,
                     {"wan.task": "ti2v-5B"})
    args = SimpleNamespace(task="t2v-A14B", dit=str(m / "low_noise_model"), dit_high_noise=str(m / "high_noise_model"),
                           vae=None, save_path=str(tmp / "out"), lora_weight=[str(lora)], lora_weight_high_noise=None)
    return error_of(lambda: preflight_generate(args))


def _lora_nan(tmp, tiny_dir):
    from wanlora.lora.layouts import load_lora_file

    path = tmp / "diverged.safetensors"
    save_safetensors({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.full((4, 64), float("nan")),
                      "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(64, 4)}, path)
    return error_of(lambda: load_lora_file(path))

def _ckpt_offline(tmp, tiny_dir):
    from huggingface_hub import constants

    from wanlora.models.checkpoints import resolve_ckpt_dir

    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(tmp / "empty-hub"), True
    try:
        return error_of(lambda: resolve_ckpt_dir("Wan-AI/Wan2.2-T2V-A14B", "t2v-A14B", ["vae"]))
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


def _ckpt_folder_missing(tmp, tiny_dir):
    from wanlora.models.checkpoints import resolve_ckpt_dir

    return error_of(lambda: resolve_ckpt_dir(tmp, "t2v-A14B", ["vae"]))


def _ckpt_other_task(tmp, tiny_dir):
    from wanlora.models.checkpoints import resolve_ckpt_dir

    return error_of(lambda: resolve_ckpt_dir("Wan-AI/Wan2.1-T2V-1.3B", "t2v-A14B", ["vae"]))


def _control_dataset(tmp, control_frames: int | None):
    """A Fun-Control dataset of one 9-frame clip; its control clip has ``control_frames`` frames
    (None: no control clip)."""
    import numpy as np

    from wanlora.dataset import load_dataset_config
    from wanlora.video_io import write_video

    for d in ("clips", "controls"):
        (tmp / d).mkdir()
    frames = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    write_video(tmp / "clips" / "a.mp4", frames, fps=16)
    write_text(tmp / "clips" / "a.txt", "a clip")
    if control_frames:
        write_video(tmp / "controls" / "a.mp4", frames[:control_frames], fps=16)
    write_text(tmp / "d.toml", '[[datasets]]\nvideo_directory = "clips"\ncontrol_directory = "controls"\n'
                               'resolution = [32, 32]\ntarget_frames = [9]\n')
    return load_dataset_config(tmp / "d.toml", "t2v-1.3B-FC")


def _control_missing(tmp, tiny_dir):
    from wanlora.dataset.items import list_items

    (item,) = list_items(_control_dataset(tmp, None).datasets[0])
    return item.problem


def _control_short(tmp, tiny_dir):
    from wanlora.dataset.latent_caching import plan_latent_caches

    ((_, why),) = plan_latent_caches(_control_dataset(tmp, 5), "vae", "wan2.1").failed
    return why


TRIGGERS = {
    "control-missing": _control_missing,
    "control-short": _control_short,
    "attn-unknown": _attn_unknown,
    "attn-sage-training": _attn_sage_training,
    "unknown-task": _unknown_task,
    "dit-given-vae": _dit_given_vae,
    "vae-given-dit": _vae_given_dit,
    "dit-wrong-task": _dit_wrong_task,
    "dataset-typo": _dataset_typo,
    "missing-caches": _missing_caches,
    "video-length": _video_length,
    "prompt-unknown-option": _prompt_unknown_option,
    "lycoris-ia3": _lycoris_ia3,
    "merge-wrong-expert": _merge_wrong_expert,
    "pth-pickle": _pth_pickle,
    "jsonl-duplicate": _jsonl_duplicate,
    "empty-dataset": _empty_dataset,
    "vae-kind": _vae_kind,
    "stale-options": _stale_options,
    "nan-latent": _nan_latent,
    "numbers": _numbers,
    "output-unwritable": _output_unwritable,
    "rank-too-wide": _rank_too_wide,
    "save-disk-full": _save_disk_full,
    "state-foreign-file": _state_foreign_file,
    "state-old-format": _state_old_format,
    "resume-layout": _resume_layout,
    "generate-lora-task": _generate_lora_task,
    "lora-nan": _lora_nan,
    "ckpt-offline": _ckpt_offline,
    "ckpt-folder-missing": _ckpt_folder_missing,
    "ckpt-other-task": _ckpt_other_task,
}


def test_every_checked_block_has_a_trigger():
    assert set(doc_excerpts()) == set(TRIGGERS)


def test_placeholders_match_only_what_they_stand_for():
    p = excerpt_pattern("unknown task '<name>'; --task must be one of: ...")
    assert p.search("unknown task 'x'; --task must be one of: a, b")
    assert not p.search("unknown task ''; --task must be one of: a")  # a placeholder is not empty
    assert not p.search("unknown task 'x'; --task is one of: a")  # the literal text must match


@pytest.mark.parametrize("check_id", sorted(TRIGGERS))
def test_doc_quotes_the_actual_message(check_id, tmp_path, tiny_dir):
    torch.set_num_threads(1)
    excerpt = doc_excerpts()[check_id]
    message = TRIGGERS[check_id](tmp_path, tiny_dir)
    assert excerpt_pattern(excerpt).search(message), (
        f"docs/troubleshooting.md ({check_id}) quotes\n{excerpt}\nbut the code says\n{message}")
