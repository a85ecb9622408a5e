"""The files of one generation: video / PNG frames / latent, and the settings sidecar.

Used by ``wanlora-generate`` (:class:`wanlora.inference.session.GenerationSession`); the formats
are described in ``docs/generation.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OUTPUT_TYPES", "save_outputs"]

#: ``--output_type`` values: ``video`` (MP4, or a PNG for one frame), ``images`` (PNG frames),
#: ``latent`` (``.safetensors``), ``both`` (video + latent).
OUTPUT_TYPES = ("video", "images", "latent", "both")


def save_outputs(save_dir, stem: str, latent, video, request, task, output_type: str, fps: int,
                 extra: dict | None = None) -> list[Path]:
    """Write the outputs of one generation; returns the written paths.

    ``video`` (MP4 H.264, or a PNG for a single frame), ``images`` (a folder of PNG frames),
    ``latent`` (``.safetensors`` with ``latent`` ``[C, T, h, w]``), ``both`` (video + latent), and
    always a sidecar ``.json`` with the prompt, seed and settings (also put in the MP4's metadata).
    """
    from wanlora.io_utils import save_safetensors, write_json
    from wanlora.video_io import write_images, write_video

    save_dir = Path(save_dir)
    settings = {**request.settings(), "task": task.name, "fps": fps, **(extra or {})}
    meta = {"prompt": request.prompt, "negative_prompt": request.negative_prompt or "",
            "seed": str(request.seed), "comment": json.dumps(settings, ensure_ascii=False)}
    written = []
    if output_type in ("video", "both"):
        if video.shape[1] == 1:
            written += _rename(write_images(save_dir, video, prefix=stem), save_dir / f"{stem}.png")
        else:
            written.append(write_video(save_dir / f"{stem}.mp4", video, fps, metadata=meta))
    if output_type == "images":
        written += write_images(save_dir / stem, video, prefix="frame")
    if output_type in ("latent", "both"):
        p = save_dir / f"{stem}.safetensors"
        save_safetensors({"latent": latent.float().cpu()}, p,
                         metadata={k: str(v) for k, v in meta.items()})
        written.append(p)
    settings["files"] = [str(x) for x in written]
    write_json(save_dir / f"{stem}.json", settings)
    return written


def _rename(paths, target: Path) -> list[Path]:
    paths[0].replace(target)
    return [target]
