"""Write a trained VAE to disk: a diffusers folder plus one original-SD (ldm) single file beside it.

Both model kinds are written the same way. `AutoencoderKL`: `_class_name` "AutoencoderKL", and the ldm file is the
SD VAE layout that AUTOMATIC1111 and ComfyUI load. `VQModel`: `_class_name` "VQModel" (`diffusers.VQModel`
loads the folder), and the ldm file is the layout of CompVis latent-diffusion's `VQModel` checkpoints (vq-f4,
vq-f8: the same encoder/decoder names plus `quantize.embedding.weight`), which `load_vae` and latent-diffusion's
`init_from_ckpt` read; the SD tools have no use for a VQ first stage, but the file costs little and keeps one
export format for both kinds. `AutoencoderKLFlux2`: `_class_name` "AutoencoderKLFlux2" (`diffusers.AutoencoderKLFlux2`
loads the folder), and no single file: Black Forest Labs' FLUX.2 file layout is not established here (the installed
diffusers converts only the FLUX.2 transformer from BFL's files, not the VAE), so the extra metadata goes into the
diffusers weights file instead.

Layout written by `export_vae(model, "runs/faces-vae")`::

    runs/faces-vae/config.json                          diffusers config, every constructor key explicit
    runs/faces-vae/diffusion_pytorch_model.safetensors  diffusers key layout
    runs/faces-vae/faces-vae.safetensors                ldm key layout (AUTOMATIC1111 / ComfyUI / from_single_file),
                                                        the same config as JSON in its metadata under "config"
    runs/faces-vae/README.md                            the model card (Hugging Face format: latentvae.files.card)

Every file is written to a temporary file in the destination folder and moved into place with `os.replace`, so
a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from latentvae.files.card import (
    CARD_NAME,
    CARD_TAG,
    CardInfo,
    TrainingRecord,
    model_card,
    model_section,
    preview_card,
    replace_evaluation,
    replace_model_section,
)
from latentvae.files.convert import LDM, diffusers_to_ldm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# safetensors metadata keys of the ldm file: the model config as JSON, and a marker saying we wrote the file
# (a re-export replaces only files carrying it, never a user's own file).
CONFIG_METADATA_KEY = "config"
MARKER_METADATA_KEY = "latentvae_layout"
_DIFFUSERS_ONLY_KEYS = ("_name_or_path",)
EXPORTABLE_CLASSES = ("AutoencoderKL", "VQModel", "AutoencoderKLFlux2")
# The classes written in the ldm single-file layout as well (see the module docstring for the others).
LDM_LAYOUT_CLASSES = ("AutoencoderKL", "VQModel")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temporary file next to `path`, flush it to disk, then rename it over `path`."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_config(model: torch.nn.Module) -> dict:
    """The model's full diffusers config, with every constructor argument stated explicitly.

    Args:
        model: an `AutoencoderKL` or `VQModel` (ours or diffusers').

    Returns:
        A JSON-ready dict: `_class_name`, `_diffusers_version` and one entry per constructor argument. Arguments
        missing from `model.config` (e.g. a config saved by an older version) get their constructor default, so
        that loaders never fall back to a default of their own (diffusers' `force_upcast=True` bites otherwise).
    """
    config = json.loads(model.to_json_string())
    for key in _DIFFUSERS_ONLY_KEYS:
        config.pop(key, None)
    for name, param in inspect.signature(type(model).__init__).parameters.items():
        if name != "self" and param.kind is param.POSITIONAL_OR_KEYWORD and name not in config:
            config[name] = param.default if not isinstance(param.default, tuple) else list(param.default)
    return config


def _cpu_contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors sharing memory with each other.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(
            f"safetensors metadata must map str to str; not so for {bad}. Convert values with json.dumps."
        )
    reserved = sorted({CONFIG_METADATA_KEY, MARKER_METADATA_KEY} & set(extra))
    if reserved:
        raise ValueError(f"Metadata keys {reserved} are reserved: the exporter writes them itself.")
    return extra


def save_diffusers(
    model: torch.nn.Module, out_dir: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `config.json` and `diffusion_pytorch_model.safetensors`, for the model class's `from_pretrained`.

    Args:
        model: the `AutoencoderKL`, `AutoencoderKLFlux2` or `VQModel` to save, in the dtype it should be stored in.
        out_dir: destination folder, created if missing.
        metadata: extra safetensors metadata strings for the weights file; "config" and "latentvae_layout" are
            reserved.

    Returns:
        The folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {**_checked_metadata(metadata), "format": "pt"}
    tensors = _cpu_contiguous(model.state_dict())
    text = json.dumps(model_config(model), indent=2, sort_keys=True) + "\n"
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=extra))
    _atomic_write(out / CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def save_ldm(
    model: torch.nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write one `.safetensors` file in the original Stable Diffusion (ldm) key layout.

    Args:
        model: the `AutoencoderKL` or `VQModel` to save.
        path: the file to write (its folder is created if missing).
        metadata: extra safetensors metadata strings; "config" and "latentvae_layout" are reserved.

    Returns:
        The file written.
    """
    path = Path(path)
    extra = _checked_metadata(metadata)
    if type(model).__name__ not in LDM_LAYOUT_CLASSES:
        raise TypeError(
            f"{type(model).__name__} has no ldm single-file layout here (see latentvae.files.export)."
        )
    config = model_config(model)
    tensors = _cpu_contiguous(diffusers_to_ldm(model.state_dict(), len(config["block_out_channels"])))
    extra.update({"format": "pt", CONFIG_METADATA_KEY: json.dumps(config), MARKER_METADATA_KEY: "ldm"})
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=extra))
    return path


def save_single_file(
    model: torch.nn.Module,
    path: str | os.PathLike,
    layout: str = LDM,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one `.safetensors` file in the key layout `layout`: "ldm" (`save_ldm`), or "diffusers" (the diffusers
    keys, for a model that came as such a file), the config as JSON in its metadata under "config" either way, so
    that `load_vae` rebuilds the model from the file alone.

    Returns:
        The file written.
    """
    if layout == LDM:
        return save_ldm(model, path, metadata=metadata)
    path = Path(path)
    extra = {
        **_checked_metadata(metadata),
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(model_config(model)),
    }
    tensors = _cpu_contiguous(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=extra))
    return path


def _written_by_us(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get(MARKER_METADATA_KEY) == "ldm"
    except (OSError, SafetensorError):  # not a readable safetensors file: certainly not ours, leave it alone
        return False


def ldm_files_in(folder: str | os.PathLike) -> list[Path]:
    """The ldm single files that we wrote in `folder` (marked in their metadata), in name order."""
    return sorted(
        p for p in Path(folder).glob("*.safetensors") if p.name != WEIGHTS_NAME and _written_by_us(p)
    )


def _card_is_ours(path: Path) -> bool:
    """Whether `path` is absent or a card we wrote (tagged `CARD_TAG`): the cards a re-export may replace."""
    if not path.exists():
        return True
    try:
        return CARD_TAG in (ModelCard.load(path).data.tags or [])
    except (OSError, ValueError):  # not a readable card: a user's own README, leave it alone
        return False


def write_model_card(
    model: torch.nn.Module, out_dir: str | os.PathLike, ldm_filename: str | None, info: CardInfo | None = None
) -> Path | None:
    """Write `out_dir/README.md`, the model card (`latentvae.files.card.model_card`; `ldm_filename`: the single file
    beside it, if any), unless the folder holds a README.md that we did not write (it is left as it is, and None
    returned)."""
    out = Path(out_dir)
    path = out / CARD_NAME
    if not _card_is_ours(path):
        return None
    text = str(model_card(model, model_config(model), out.resolve().name, ldm_filename, info))
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def update_model_card(
    model: torch.nn.Module, out_dir: str | os.PathLike, ldm_filename: str | None, info: CardInfo
) -> Path | None:
    """Bring `out_dir/README.md` up to date with `model`: a card we wrote gets a new "## Model" section (the
    constants, and how they were found: `info.normalisation`) and keeps the rest (training, evaluation, usage); a
    folder without a card gets a fresh one; a README.md we did not write is left alone (None returned)."""
    path = Path(out_dir) / CARD_NAME
    if not path.exists():
        return write_model_card(model, out_dir, ldm_filename, info)
    if not _card_is_ours(path):
        return None
    try:
        text = replace_model_section(
            path.read_text(encoding="utf-8"), model_section(model, model_config(model), info)
        )
    except ValueError:  # a card of ours without a model section (edited by hand): write it afresh
        return write_model_card(model, out_dir, ldm_filename, info)
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def update_card_evaluation(card_path: str | os.PathLike, markdown: str) -> Path:
    """Put `markdown` into the evaluation block of an existing model card (replacing an earlier evaluation).

    Raises:
        `FileNotFoundError`: no card at `card_path`.
    """
    path = Path(card_path)
    text = replace_evaluation(path.read_text(encoding="utf-8"), markdown)
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def export_vae(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    ldm_filename: str | None = None,
    metadata: Mapping[str, str] | None = None,
    card: CardInfo | None = None,
) -> Path:
    """Export an `AutoencoderKL`, `AutoencoderKLFlux2` or `VQModel` for diffusers and, all but the FLUX.2 VAE, for
    the original (ldm) tools.

    Writes `out_dir/config.json` + `out_dir/diffusion_pytorch_model.safetensors` (for
    `diffusers.AutoencoderKL.from_pretrained(out_dir)`, or `diffusers.VQModel.from_pretrained(out_dir)`) and beside
    them one ldm-layout single file (for a VQ model: latent-diffusion's layout, see the module docstring), by default
    named after the folder (`runs/faces-vae` -> `faces-vae.safetensors`), whose safetensors metadata holds the
    config as JSON under "config". An SD-shaped KL file loads with
    `diffusers.AutoencoderKL.from_single_file(file, config=out_dir)`, in AUTOMATIC1111 and in ComfyUI.
    Exporting again into the same folder replaces the earlier ldm file(s) we wrote there, whatever their name.
    An `AutoencoderKLFlux2` gets the diffusers folder only, `metadata` in its weights file.
    The model card `out_dir/README.md` says what the model is and how to use it, and with `card` how it was trained
    (a README.md that we did not write is left alone).

    Args:
        model: the model to export, in the dtype it should be stored in.
        out_dir: destination folder, created if missing.
        ldm_filename: name of the ldm file inside `out_dir` (must end in `.safetensors`).
        metadata: extra string metadata stored in the ldm file (e.g. training step, dataset name); for an
            `AutoencoderKLFlux2`, in the diffusers weights file.
        card: what the model card says beyond the model itself (license, base model, training, evaluation).

    Returns:
        The path of the ldm single file (its parent is `out_dir`); for an `AutoencoderKLFlux2`, of the diffusers
        weights file.
    """
    type_name = type(model).__name__
    if type_name not in EXPORTABLE_CLASSES:
        raise TypeError(f"export_vae writes {', '.join(EXPORTABLE_CLASSES)} models; got {type_name}.")
    out = Path(out_dir).resolve()
    name = ldm_filename or f"{out.name}.safetensors"
    if not name.endswith(".safetensors") or Path(name).name != name or name == WEIGHTS_NAME:
        raise ValueError(
            f"ldm_filename must be a plain file name ending in .safetensors other than {WEIGHTS_NAME}; got {name!r}."
        )
    single_file = type_name in LDM_LAYOUT_CLASSES
    if ldm_filename is not None and not single_file:
        raise ValueError(f"{type_name} is exported without an ldm single file: ldm_filename has no use.")
    save_diffusers(model, out, metadata=None if single_file else metadata)
    written = save_ldm(model, out / name, metadata=metadata) if single_file else out / WEIGHTS_NAME
    for stale in ldm_files_in(out):
        if stale != written:
            stale.unlink()
    write_model_card(model, out, name if single_file else None, card)
    return written


def export_preview(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    teacher: str,
    record: TrainingRecord,
    license: str | None = None,
) -> Path:
    """Write a preview decoder (an `AutoencoderTiny`) for `diffusers.AutoencoderTiny.from_pretrained(out_dir)`:
    `config.json`, `diffusion_pytorch_model.safetensors` and its model card (`latentvae.files.card.preview_card`;
    a README.md we did not write is left alone). Returns the folder."""
    if type(model).__name__ != "AutoencoderTiny":
        raise TypeError(f"export_preview writes an AutoencoderTiny; got {type(model).__name__}")
    out = save_diffusers(model, out_dir)
    path = out / CARD_NAME
    if _card_is_ours(path):
        text = str(preview_card(model, model_config(model), out.resolve().name, teacher, record, license))
        _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out
