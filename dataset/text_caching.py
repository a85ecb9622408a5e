"""Text caching: encode every item's caption with umT5 once and store it beside the latents.

One ``{stem}_wan_te.safetensors`` per item in its entry's ``cache_directory`` with ``context``
float32 ``[L, d_model]`` (the encoder output trimmed to the caption's tokens, ``L <= 512``).
Identical captions are encoded once. A cache is current when its recorded caption and
text-encoder identity match; otherwise it is rebuilt.
"""

from __future__ import annotations

import time

from wanlora.dataset import caches as C
from wanlora.dataset.config import DatasetGroupConfig
from wanlora.dataset.items import list_items
from wanlora.dataset.latent_caching import CacheReport
from wanlora.io_utils import save_safetensors

__all__ = ["cache_text"]


def cache_text(config: DatasetGroupConfig, text_encoder, batch_size: int = 8, force: bool = False,
               progress: bool = True) -> CacheReport:
    """Build every missing or stale text cache of ``config``.

    Args:
        text_encoder: a :class:`wanlora.models.text_encoder.TextEncoder` (``encode(list[str]) ->
            list[[L_i, d]]``, ``identity``).
        batch_size: distinct captions encoded together.
        force: rebuild up-to-date caches too.

    Returns:
        :class:`~wanlora.dataset.latent_caching.CacheReport` (items without a caption fail).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    report = CacheReport()
    todo: dict[str, list[tuple]] = {}  # caption -> [(path, metadata)]
    for ds in config.all_datasets:  # validation entries are cached alike
        for item in list_items(ds):
            report.items += 1
            if item.problem:
                report.failed.append((str(item.path), item.problem))
                continue
            path = ds.cache_directory / C.text_cache_name(item.stem)
            meta = {"format": C.TEXT_FORMAT, "caption": item.caption, "text_encoder": text_encoder.identity,
                    "source": str(item.path), "dataset": ds.name}
            if not force and C.stale_reason(path, meta, C.TEXT_CONTENT_KEYS) is None:
                report.skipped += 1
                continue
            todo.setdefault(item.caption, []).append((path, meta))
    captions = list(todo)
    bar = tqdm(total=len(captions), unit="caption", disable=not progress, desc="caching text", dynamic_ncols=True)
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        try:
            contexts = text_encoder.encode(batch)
        except Exception as e:  # noqa: BLE001 - report and go on with the next batch
            for cap in batch:
                for path, meta in todo[cap]:
                    report.failed.append((meta["source"], f"text encoding failed: {type(e).__name__}: {e}"))
            bar.update(len(batch))
            continue
        for cap, ctx in zip(batch, contexts):
            for path, meta in todo[cap]:
                save_safetensors({"context": ctx.float().cpu().clone()}, path, metadata=meta)
                report.cached += 1
        bar.update(len(batch))
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report
