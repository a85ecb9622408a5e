"""``--ckpt_dir``: name a model once and get the file of every role a command needs.

A ``--ckpt_dir`` is one of

* a local **official** folder, as the Wan code's own ``--ckpt_dir``: ``high_noise_model/`` and
  ``low_noise_model/`` (A14B) or the DiT shards / single file at the top, ``Wan2.1_VAE.pth`` or
  ``Wan2.2_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``;
* a local **diffusers** folder: ``transformer/`` (A14B: the high-noise expert), ``transformer_2/``
  (A14B: the low-noise expert), ``vae/``, ``text_encoder/``, ``tokenizer/``;
* a **Hugging Face repo id** (``Wan-AI/Wan2.2-T2V-A14B``, ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``, ...;
  a name ending in ``-Diffusers`` is read in the diffusers layout). Files come from the local
  cache first (``HF_HUB_CACHE`` / ``HF_HOME``); only the missing files of the roles asked for are
  downloaded (``huggingface_hub``: resumable, progress bars, written to a temporary name and moved
  into place). With ``HF_HUB_OFFLINE=1`` or no network a missing file is one
  :class:`MissingModelFileError` line naming the repository, the file and the command that
  fetches it.

The roles are named after the flags they fill: ``dit_high_noise`` / ``dit_low_noise`` (the A14B
experts), ``dit`` (a single-DiT task), ``vae``, ``t5``, ``t5_tokenizer`` and, for the Wan2.1
image tasks (``i2v-14B``, ``flf2v-14B``), ``clip`` (the CLIP image encoder; diffusers:
``image_encoder/``) (:data:`ROLES`). The
file names come from the task table (:class:`wanlora.tasks.Release`). A flag given explicitly
wins: the command asks here only for the roles it still lacks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from wanlora.models.loading import CheckpointError
from wanlora.tasks import VAE_FILES, Release, Task, get_task, release_task

__all__ = [
    "ROLES",
    "ResolvedFiles",
    "MissingModelFileError",
    "is_repo_id",
    "layout_of_folder",
    "resolve_ckpt_dir",
    "roles_for",
    "download_command",
    "fill_flags",
    "role_field",
]

logger = logging.getLogger(__name__)

#: Every role a ``--ckpt_dir`` can fill, in the order they are printed.
ROLES = ("dit_high_noise", "dit_low_noise", "dit", "vae", "t5", "t5_tokenizer", "clip")
#: The role groups ``wanlora-download --only`` takes (``clip``: only the tasks that use CLIP).
GROUPS = {"dit": ("dit_high_noise", "dit_low_noise", "dit"), "vae": ("vae",), "t5": ("t5", "t5_tokenizer"),
          "clip": ("clip",)}

_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SINGLE = "diffusion_pytorch_model.safetensors"
#: A tokenizer folder holds the SentencePiece model and/or transformers' ``tokenizer.json``
#: (either loads); the configs come along when the repository has them.
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: diffusers sub-folder of each DiT role (``WanPipeline``: ``transformer`` runs t >= boundary).
_DIFFUSERS_DIT = {"dit_high_noise": "transformer", "dit_low_noise": "transformer_2", "dit": "transformer"}


class MissingModelFileError(CheckpointError):
    """A file of a Hugging Face repository that is neither cached nor downloadable now."""


@dataclass(frozen=True)
class _Entry:
    """The files of one role in one layout.

    ``weights`` are candidate names, the official repositories' first; an ``*.index.json`` pulls
    the shards it names. ``companions`` must exist beside them (``config.json``), ``optional``
    files are fetched when the repository has them. The role's path is its ``folder`` when
    ``as_folder``, else the weight file.
    """

    role: str
    folder: str
    weights: tuple[str, ...]
    companions: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    as_folder: bool = False

    def repo_path(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name


@dataclass(frozen=True)
class ResolvedFiles:
    """What a ``--ckpt_dir`` resolved to.

    Attributes:
        source: the ``--ckpt_dir`` as given.
        layout: ``"official"`` or ``"diffusers"``.
        paths: role -> local path (a file, or a folder for shard folders and tokenizers).
        repo_id: the Hugging Face repository, ``None`` for a local folder.
        revision: the commit of the cached snapshot the files come from (``None`` when unknown).
    """

    source: str
    layout: str
    paths: dict[str, Path] = field(default_factory=dict)
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        """Several lines: where the files come from, then ``role: path`` per role."""
        where = f"Hugging Face {self.repo_id}" if self.repo_id else "folder"
        rev = f", revision {self.revision}" if self.revision else ""
        head = f"--ckpt_dir {self.source} ({where}, {self.layout} layout{rev}):"
        return "\n".join([head] + [f"  {r}: {self.paths[r]}" for r in ROLES if r in self.paths])

    def metadata(self) -> dict[str, str]:
        """Flat strings for a run's metadata: ``ckpt_dir``, ``ckpt_layout``, ``ckpt_revision``
        (when known) and one ``ckpt_<role>`` path per role."""
        out = {"ckpt_dir": self.source, "ckpt_layout": self.layout}
        if self.revision:
            out["ckpt_revision"] = self.revision
        out.update({f"ckpt_{r}": str(self.paths[r]) for r in ROLES if r in self.paths})
        return out


def is_repo_id(value: str | os.PathLike) -> bool:
    """Whether ``value`` reads as a Hugging Face repo id (``ORG/NAME``) and is no existing path."""
    s = str(value)
    return bool(_REPO_ID.match(s)) and not Path(s).exists()


def layout_of_folder(folder: str | os.PathLike) -> str:
    """``"diffusers"`` when the folder has ``model_index.json`` or a diffusers sub-folder
    (``transformer/``, ``transformer_2/``, ``text_encoder/``, ``vae/config.json``), else
    ``"official"``."""
    f = Path(folder)
    if (f / "model_index.json").is_file() or (f / "vae" / "config.json").is_file():
        return "diffusers"
    return "diffusers" if any((f / d).is_dir() for d in ("transformer", "transformer_2", "text_encoder")) else "official"


def roles_for(task: str | Task, groups: Iterable[str] = ("dit", "vae", "t5", "clip"),
              expert: str | None = None) -> tuple[str, ...]:
    """The roles of ``task`` in the given groups (``dit``, ``vae``, ``t5``, ``clip``; ``clip`` gives
    nothing for a task without the CLIP image encoder); ``expert`` (``high_noise`` / ``low_noise``, or
    ``high`` / ``low``) keeps one A14B expert.

    Raises:
        ValueError: an unknown group, or an expert for a single-DiT task.
    """
    task = get_task(task)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown model file group(s) {bad}; use {', '.join(GROUPS)}")
    dit_roles = task.dit_roles
    if expert is not None:
        expert = expert if expert.endswith("_noise") else f"{expert}_noise"
        if not task.has_experts:
            raise ValueError(f"--expert {expert}: task {task.name} has a single DiT, no experts")
        dit_roles = (f"dit_{expert}",)
    wanted = set(groups)
    roles = [r for r in dit_roles if "dit" in wanted]
    roles += [r for g in ("vae", "t5") if g in wanted for r in GROUPS[g]]
    if "clip" in wanted and task.uses_clip:
        roles.append("clip")
    return tuple(r for r in ROLES if r in roles)


def download_command(task: str | Task, roles: Iterable[str], repo_id: str | None = None,
                     local_dir: str | os.PathLike | None = None) -> str:
    """The ``wanlora-download`` line that fetches exactly ``roles`` of ``task``."""
    task = get_task(task)
    roles = set(roles)
    parts = ["wanlora-download", "--task", task.name]
    if repo_id and (task.release is None or repo_id != task.release.repo):
        parts += ["--repo", repo_id]
    dits = [r for r in task.dit_roles if r in roles]
    if task.has_experts and len(dits) == 1:
        parts += ["--expert", dits[0][len("dit_"):-len("_noise")]]
    groups = [g for g, rs in GROUPS.items() if roles & set(rs)]
    if set(groups) != {g for g in GROUPS if g != "clip" or task.uses_clip}:
        parts += ["--only", *groups]
    if local_dir is not None:
        parts += ["--dir", str(local_dir)]
    return " ".join(parts)


def _release_of(task: Task) -> Release:
    if task.release is not None:
        return task.release
    folders = tuple((f"dit_{e}", f"{e}_model") for e in task.experts) or (("dit", ""),)
    return Release(repo="", diffusers_repo="", dit_folders=folders, dit_weights=_INDEX,
                   vae_file=VAE_FILES[task.vae])


def _entries(task: Task, layout: str, roles: Iterable[str]) -> list[_Entry]:
    """The files of ``roles`` of ``task`` in ``layout``, in :data:`ROLES` order."""
    rel = _release_of(task)
    out: list[_Entry] = []
    for role in [r for r in ROLES if r in set(roles)]:
        if role.startswith("dit"):
            if layout == "diffusers":
                out.append(_Entry(role, _DIFFUSERS_DIT[role], (_INDEX, _SINGLE), ("config.json",), as_folder=True))
                continue
            folder = dict(rel.dit_folders)[role]
            weights = (rel.dit_weights,) + tuple(w for w in (_INDEX, _SINGLE) if w != rel.dit_weights)
            out.append(_Entry(role, folder, weights, ("config.json",), as_folder=bool(folder)))
        elif role == "vae":
            out.append(_Entry("vae", "vae", (_SINGLE, _INDEX), optional=("config.json",)) if layout == "diffusers"
                       else _Entry("vae", "", (rel.vae_file,)))
        elif role == "t5":
            out.append(_Entry("t5", "text_encoder", ("model.safetensors.index.json", "model.safetensors"),
                              optional=("config.json",), as_folder=True) if layout == "diffusers"
                       else _Entry("t5", "", (rel.t5_file,)))
        elif role == "clip":  # transformers CLIPVisionModel weights in diffusers' image_encoder/
            out.append(_Entry("clip", "image_encoder", ("model.safetensors",), optional=("config.json",))
                       if layout == "diffusers" else _Entry("clip", "", (rel.clip_file,)))
        else:  # t5_tokenizer
            folder = "tokenizer" if layout == "diffusers" else rel.tokenizer_dir
            out.append(_Entry("t5_tokenizer", folder, _TOKENIZER_FILES, optional=_TOKENIZER_FILES + _TOKENIZER_EXTRAS,
                              as_folder=True))
    return out


def _check_roles(task: Task, roles: Iterable[str]) -> tuple[str, ...]:
    roles = tuple(roles)
    allowed = set(task.dit_roles) | {"vae", "t5", "t5_tokenizer"} | ({"clip"} if task.uses_clip else set())
    bad = [r for r in roles if r not in allowed]
    if bad:
        raise ValueError(f"task {task.name} has no model file role(s) {bad}; its roles: {sorted(allowed)}")
    return roles


def resolve_ckpt_dir(
    ckpt_dir: str | os.PathLike,
    task: str | Task,
    roles: Iterable[str],
    *,
    download: bool = True,
    local_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> ResolvedFiles:
    """Resolve ``roles`` of ``task`` from a ``--ckpt_dir`` (see the module docstring).

    Args:
        ckpt_dir: a local official or diffusers folder, or a Hugging Face repo id.
        task: the ``--task`` (its :class:`~wanlora.tasks.Release` names the files).
        roles: the roles still needed (a subset of :data:`ROLES` valid for the task); the
            roles of explicitly given flags are left out by the caller.
        download: allow downloading missing files of a repo id (``HF_HUB_OFFLINE=1`` forbids
            it as well).
        local_dir: for a repo id, keep the files in this folder (``hf download --local-dir``)
            instead of the Hugging Face cache.
        revision: branch, tag or commit of a repo id (default ``main``).

    Returns:
        :class:`ResolvedFiles` with one local path per role: a DiT expert folder or weight file, the
        VAE file, the umT5 file (diffusers: the ``text_encoder/`` folder) and the tokenizer folder.

    Raises:
        MissingModelFileError: a repo file neither cached nor downloadable (one line: repository,
            file, the command that fetches it).
        CheckpointError: a folder that lacks files of the roles (the message names them and the
            flags that take them), a path that is neither a folder nor a repo id, a repository of
            another task, a repository without the file.
        ValueError: a role the task does not have.
    """
    task = get_task(task)
    roles = _check_roles(task, roles)
    source = str(ckpt_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_folder(source, path, task, roles)
    if path.exists():
        raise CheckpointError(
            f"--ckpt_dir {source}: a file, not a folder; --ckpt_dir takes a model folder or a Hugging Face "
            "repo id — pass a single file with its own flag (--dit, --dit_high_noise, --vae, --t5)")
    if not is_repo_id(source):
        raise CheckpointError(
            f"--ckpt_dir {source}: no such folder, and not a Hugging Face repo id (ORG/NAME such as "
            f"{(task.release.repo if task.release else 'Wan-AI/Wan2.2-T2V-A14B')})")
    other = release_task(source)
    text_only = set(roles) <= {"t5", "t5_tokenizer"}  # umT5 is the same in every release
    if other is not None and other.name != task.name and not text_only:
        raise CheckpointError(
            f"--ckpt_dir {source} holds the {other.name} model, not {task.name}; pass --task {other.name}"
            + (f" or --ckpt_dir {task.release.repo}" if task.release else ""))
    if task.release is None and other is None:
        logger.info("task %s has no published repository in the table; reading %s in the official layout",
                    task.name, source)
    layout = "diffusers" if source.lower().endswith("-diffusers") else "official"
    return _resolve_hub(source, layout, task, roles, download=download, local_dir=local_dir, revision=revision)


def _resolve_folder(source: str, root: Path, task: Task, roles: tuple[str, ...]) -> ResolvedFiles:
    layout = layout_of_folder(root)
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for e in _entries(task, layout, roles):
        folder = root / e.folder
        found = next((folder / w for w in e.weights if (folder / w).is_file()), None)
        if found is None:
            missing.append(f"{e.repo_path(e.weights[0])} (--{e.role})")
        else:
            paths[e.role] = folder if e.as_folder else found
    if missing:
        raise CheckpointError(
            f"--ckpt_dir {source} ({layout} layout) has no {', '.join(missing)} for --task {task.name}; "
            "put the files there or pass each with its flag")
    return ResolvedFiles(source=source, layout=layout, paths=paths)


class _HubFiles:
    """Files of one repository: cache (or ``local_dir``) first, then a download when allowed."""

    def __init__(self, repo_id: str, task: Task, roles, revision, local_dir, download: bool):
        from huggingface_hub import constants

        self.repo_id, self.revision = repo_id, revision
        self.local_dir = Path(local_dir) if local_dir is not None else None
        self.offline = constants.is_offline_mode()
        self.download = download and not self.offline
        self.cache = self.local_dir or Path(constants.HF_HUB_CACHE)
        self.fix = download_command(task, roles, repo_id, local_dir)
        self.absent: set[str] = set()  # names the repository answered 404 for

    def cached(self, name: str) -> Path | None:
        if self.local_dir is not None:
            p = self.local_dir / name
            return p if p.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(self.repo_id, name, revision=self.revision)
        return Path(p) if isinstance(p, str) else None

    def missing(self, name: str, why: str) -> MissingModelFileError:
        where = (f"in {self.local_dir}" if self.local_dir is not None
                 else f"in the Hugging Face cache ({self.cache})")
        return MissingModelFileError(
            f"{self.repo_id}: {name} is not {where} and {why}; fetch it with `{self.fix}` where the "
            "network is reachable, then run again")

    def _why_not(self) -> str:
        return "downloads are off (HF_HUB_OFFLINE=1)" if self.offline else "downloading was not allowed"

    def fetch(self, name: str) -> Path | None:
        """Download ``name``; ``None`` when the repository has no such file.

        Raises:
            MissingModelFileError: the download failed (no network, server error).
            CheckpointError: the repository or revision does not exist, or is gated.
        """
        import huggingface_hub as hub
        from huggingface_hub import errors

        if name in self.absent:
            return None
        try:
            return Path(hub.hf_hub_download(self.repo_id, name, revision=self.revision, local_dir=self.local_dir))
        except errors.EntryNotFoundError:
            self.absent.add(name)
            return None
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"--ckpt_dir {self.repo_id}: {first}") from None
        except Exception as e:  # network and HTTP failures of every kind (httpx, OSError, hub errors)
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            msg = " ".join(str(e).split())[:200] or "no message"
            raise self.missing(name, f"could not be downloaded ({type(e).__name__}: {msg})") from None

    def get(self, name: str, required: bool = True) -> Path | None:
        p = self.cached(name)
        if p is not None:
            return p
        if not self.download:
            if required:
                raise self.missing(name, self._why_not())
            return None
        p = self.fetch(name)
        if p is None and required:
            raise CheckpointError(f"--ckpt_dir {self.repo_id}: the repository has no {name}")
        return p

    def first(self, names: tuple[str, ...]) -> Path:
        for n in names:
            p = self.cached(n)
            if p is not None:
                return p
        if not self.download:
            raise self.missing(names[0], self._why_not())
        for n in names:
            p = self.fetch(n)
            if p is not None:
                return p
        raise CheckpointError(f"--ckpt_dir {self.repo_id}: the repository has none of {list(names)}")


def _resolve_hub(repo_id: str, layout: str, task: Task, roles, *, download, local_dir, revision) -> ResolvedFiles:
    files = _HubFiles(repo_id, task, roles, revision, local_dir, download)
    if layout == "diffusers":
        files.get("model_index.json", required=False)  # marks a --dir download as diffusers
    paths: dict[str, Path] = {}
    commits: set[str] = set()
    for e in _entries(task, layout, roles):
        weights = files.first(tuple(e.repo_path(w) for w in e.weights))
        for c in e.companions:
            files.get(e.repo_path(c))
        if weights.name.endswith(".index.json"):
            try:
                shards = dict.fromkeys(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values())
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{weights}: not a safetensors shard index ({err})") from None
            for shard in shards:
                files.get(e.repo_path(shard))
        for o in e.optional:
            files.get(e.repo_path(o), required=False)
        paths[e.role] = weights.parent if e.as_folder else weights
        if local_dir is None and "snapshots" in weights.parts:
            commits.add(weights.parts[weights.parts.index("snapshots") + 1])
    revision_seen = commits.pop() if len(commits) == 1 else revision
    return ResolvedFiles(source=repo_id, layout=layout, paths=paths, repo_id=repo_id, revision=revision_seen)


def role_field(role: str, expert: str | None = None) -> str:
    """The flag (run-config field) a role fills: ``dit_low_noise`` -> ``dit``, ``dit_high_noise``
    -> ``dit_high_noise`` (but ``dit`` when one ``expert`` is named: then ``--dit`` is that
    expert, as ``--expert`` reads it), every other role -> its own name."""
    if role == "dit_low_noise" or (expert is not None and role == f"dit_{_expert_name(expert)}"):
        return "dit"
    return role


def _expert_name(expert: str) -> str:
    return expert if expert.endswith("_noise") else f"{expert}_noise"


def fill_flags(ckpt_dir: str | os.PathLike, task: str | Task, given: dict[str, str | None],
               groups: Iterable[str], *, expert: str | None = None, download: bool = True):
    """The model-file flags a ``--ckpt_dir`` fills for one command.

    Args:
        ckpt_dir: the ``--ckpt_dir`` value (:func:`resolve_ckpt_dir`).
        task: the ``--task``.
        given: the command's model-file flags (``dit``, ``dit_high_noise``, ``vae``, ``t5``,
            ``t5_tokenizer``; a command has some of them) and their values, ``None`` = not given.
        groups: what the command needs: ``dit``, ``vae``, ``t5`` (:func:`roles_for`).
        expert: one A14B expert (``high``/``low``/``high_noise``/``low_noise``) whose DiT goes
            to ``dit``; ``None`` takes every expert of the task.
        download: allow downloads for a repo id.

    Returns:
        ``(values, resolved)``: ``{flag: path}`` for every needed flag that was not given (a flag
        given explicitly wins), and the :class:`ResolvedFiles` (``None`` when nothing was missing).

    Raises:
        ValueError: an A14B task for a command that takes one DiT (``--dit`` only) without
            ``expert``; everything :func:`resolve_ckpt_dir` raises.
    """
    task = get_task(task)
    roles = roles_for(task, groups, expert)
    lost = [r for r in roles if role_field(r, expert) not in given]
    if any(r.startswith("dit") for r in lost):
        raise ValueError(f"--ckpt_dir with --task {task.name}: this command takes one DiT; say which "
                         "expert with --expert high_noise or --expert low_noise")
    todo = [r for r in roles if r not in lost and not given[role_field(r, expert)]]
    if not todo:
        return {}, None
    resolved = resolve_ckpt_dir(ckpt_dir, task, todo, download=download)
    return {role_field(r, expert): str(p) for r, p in resolved.paths.items()}, resolved
