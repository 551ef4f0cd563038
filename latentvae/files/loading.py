"""Load a VAE from any file or folder people actually have: `load_vae(path)`.

Accepted (the first match wins):

- a folder with weights and, normally, a config:
    - a diffusers VAE folder: `config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`, pickle);
    - a diffusers pipeline folder: the same inside its `vae/` subfolder;
    - a training checkpoint of ours (`checkpoint-<step>/`, written by `accelerate.Accelerator.save_state`): the
      autoencoder weights as `model.safetensors` (or `pytorch_model.bin`, pickle) - the first model passed to
      `accelerator.prepare` - and the model config as `config.json` or `latentvae_config.json`, the same JSON that
      `model.save_config` writes. Other files there (optimizer, discriminator `model_1.*`, RNG states) are ignored.
- a single `.safetensors` file with diffusers or original-SD (ldm) key names, bare or inside a whole checkpoint
  under `first_stage_model.` / `vae.` (only the VAE tensors are read);
- a pickle file (`.ckpt`, `.pt`, `.pth`, `.bin`), only with `allow_pickle=True`, read with
  `torch.load(weights_only=True)`; a top-level "state_dict" entry (Lightning / CompVis checkpoints) is unwrapped.

The config comes from the safetensors metadata ("config", as `export_vae` writes it), else a VAE `config.json`
in the same folder, else it is inferred from the tensor shapes (`latentvae.files.convert.infer_config`; a 16-channel
VAE without quant convs then gets the normalisation constants of the released model it is told to come from,
FLUX.1's or SD3's: `latentvae.files.convert.released_family`). Its
`_class_name` picks the model: `AutoencoderKL`, `AutoencoderKLFlux2` (also inferred when the tensors hold the FLUX.2
latent statistics, `bn.running_mean`) or `VQModel` (also inferred when the tensors hold a codebook,
`quantize.embedding.weight`, e.g. a CompVis latent-diffusion vq-f4 checkpoint).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from latentvae.files.convert import (
    DIFFUSERS,
    LDM,
    VAE_PREFIXES,
    infer_config,
    released_family,
    to_diffusers_layout,
)
from latentvae.files.export import CONFIG_METADATA_KEY, CONFIG_NAME, WEIGHTS_NAME
from latentvae.models.autoencoder_kl import AutoencoderKL
from latentvae.models.autoencoder_kl_flux2 import AutoencoderKLFlux2
from latentvae.models.presets import RELEASED_CONSTANTS
from latentvae.models.vq_model import VQModel

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_NAMES = (CONFIG_NAME, "latentvae_config.json")
# Weight files looked for in a folder, in this order, and what they tell about the folder.
FOLDER_WEIGHTS = {
    WEIGHTS_NAME: "diffusers folder",
    "diffusion_pytorch_model.bin": "diffusers folder",
    "model.safetensors": "training checkpoint",
    "pytorch_model.bin": "training checkpoint",
}
PIPELINE_SUBFOLDER = "vae"


class VAEFileError(ValueError):
    """A file or folder that cannot be loaded as a VAE, with the reason and what to do."""


class PickleRefusedError(VAEFileError):
    """A pickle file was given without `allow_pickle=True`."""


class StateDictMismatchError(VAEFileError):
    """The tensors do not fit the architecture: lists missing, unexpected and mis-shaped keys."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def listing(title: str, rows: list[str], limit: int = 20) -> str:
            more = f"\n    ... and {len(rows) - limit} more" if len(rows) > limit else ""
            return f"\n  {title} ({len(rows)}):" + "".join(f"\n    {r}" for r in rows[:limit]) + more

        text = f"The weights in {source} do not fit the model built from its config (diffusers key names):"
        if missing:
            text += listing("missing keys", missing)
        if unexpected:
            text += listing("unexpected keys", unexpected)
        if mismatched:
            rows = [f"{k}: file {list(got)} vs model {list(want)}" for k, got, want in mismatched]
            text += listing("mis-shaped keys", rows)
        super().__init__(text + "\nCheck that the config (metadata, config.json) belongs to these weights.")


@dataclass
class VAEFile:
    """What `read_vae` found: diffusers-layout tensors, a config, and where both came from."""

    path: Path  # the weight file read
    file_format: (
        str  # e.g. "diffusers folder", "ldm safetensors", "prefixed checkpoint (first_stage_model.) ..."
    )
    state_dict: dict[str, torch.Tensor]  # diffusers key layout
    config: dict  # diffusers model config, `_class_name` included
    config_source: str  # "safetensors metadata", "<file> beside the weights", "inferred from tensor shapes"
    layout: str = DIFFUSERS  # the key layout of the file: "diffusers" or "ldm"
    prefix: str = ""  # "first_stage_model." / "vae." when the VAE was part of a whole checkpoint
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors metadata of the file
    folder_kind: str | None = (
        None  # a folder was given: "diffusers folder", "training checkpoint" (FOLDER_WEIGHTS)
    )


# `_class_name` -> the class to build. The key conversion (`to_diffusers_layout`) and shape inference
# (`infer_config`) serve every kind.
MODEL_CLASSES: dict[str, type] = {
    "AutoencoderKL": AutoencoderKL,
    "AutoencoderKLFlux2": AutoencoderKLFlux2,
    "VQModel": VQModel,
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VAEFileError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
    if not isinstance(data, dict):
        raise VAEFileError(f"{path} must hold a JSON object (a model config).")
    return data


def _is_vae_config(config: dict) -> bool:
    # A config.json beside a loose file may belong to something else (a UNet, a text encoder): ignore those.
    return config.get("_class_name", "AutoencoderKL") in MODEL_CLASSES and "block_out_channels" in config


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The VAE tensors, the metadata and every key of the file (a whole checkpoint's others tell its family)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            # A whole SD checkpoint is gigabytes: read only the VAE tensors.
            prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
            tensors = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            return tensors, f.metadata() or {}, keys
    except SafetensorError as err:
        raise VAEFileError(f"{path} is not a readable safetensors file: {err}") from err


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickle file ({path.suffix}); unpickling can run arbitrary code, so it is refused. "
            "Pass allow_pickle=True (CLI: --allow-pickle) only for a file you trust, or convert it to "
            ".safetensors once from a trusted environment."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise VAEFileError(
            f"{path}: torch.load(weights_only=True) refused it, it holds Python objects besides tensors ({err}). "
            "Extract its state dict in a trusted environment and save it with safetensors."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise VAEFileError(f"{path} holds no state dict of tensors (got {type(obj).__name__}).")
    return tensors


def _find_folder_weights(folder: Path) -> tuple[Path, str]:
    for name, kind in FOLDER_WEIGHTS.items():
        if (folder / name).is_file():
            return folder / name, kind
    if (folder / PIPELINE_SUBFOLDER).is_dir():
        weights, kind = _find_folder_weights(folder / PIPELINE_SUBFOLDER)
        return weights, f"{kind} (pipeline {PIPELINE_SUBFOLDER}/ subfolder)"
    raise FileNotFoundError(
        f"No VAE weights in folder {folder}: looked for {', '.join(FOLDER_WEIGHTS)} there and in "
        f"{PIPELINE_SUBFOLDER}/. For a single file, pass the file itself."
    )


def _find_config(weights: Path, metadata: dict[str, str]) -> tuple[dict | None, str]:
    """The config stored in the file's metadata, else a VAE config file beside it, else (None, "")."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError as err:
            raise VAEFileError(f"{weights}: the 'config' metadata is not valid JSON ({err}).") from err
        if not isinstance(config, dict) or "block_out_channels" not in config:
            raise VAEFileError(
                f"{weights}: the 'config' metadata is not a VAE config (no block_out_channels)."
            )
        return config, "safetensors metadata"
    for name in CONFIG_NAMES:
        candidate = weights.parent / name
        if candidate.is_file() and _is_vae_config(found := _read_json(candidate)):
            return found, f"{name} beside the weights"
    return None, ""


def read_vae(path: str | os.PathLike, *, allow_pickle: bool = False) -> VAEFile:
    """Read a VAE's tensors and config from a file or folder, without building the model.

    Args:
        path: any of the formats in this module's docstring.
        allow_pickle: allow `.ckpt` / `.pt` / `.pth` / `.bin` files (read with `torch.load(weights_only=True)`).

    Returns:
        A `VAEFile` with diffusers-layout tensors and the config.

    Raises:
        FileNotFoundError: the path, or the weights in the folder, do not exist.
        PickleRefusedError: a pickle file without `allow_pickle=True`.
        VAEFileError: an unreadable or unrecognised file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such VAE file or folder: {path}")
    folder_kind = None
    if path.is_dir():
        path, folder_kind = _find_folder_weights(path)

    metadata: dict[str, str] = {}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata, keys = _read_safetensors(path)
        container = "safetensors"
    elif suffix in PICKLE_SUFFIXES:
        tensors = _read_pickle(path, allow_pickle)
        keys, container = list(tensors), f"pickle {suffix}"
    else:
        raise VAEFileError(
            f"{path}: unknown VAE file type {suffix!r}; expected .safetensors or (with allow_pickle) "
            f"{', '.join(PICKLE_SUFFIXES)}."
        )

    config, config_source = _find_config(path, metadata)
    try:
        num_levels = len(config["block_out_channels"]) if config else None
        state_dict, layout, prefix = to_diffusers_layout(tensors, num_levels)
    except ValueError as err:
        raise VAEFileError(f"{path}: {err}") from err
    if config is None:
        try:
            config, config_source = infer_config(state_dict), "inferred from tensor shapes"
        except ValueError as err:
            raise VAEFileError(f"{path}: {err}") from err
        family, why = released_family(keys, config, layout, prefix)
        if family is not None:  # not in the shapes, and what the family's diffusion models were trained with
            config |= RELEASED_CONSTANTS[family]
            config_source += f", with {family}'s released scaling_factor and shift_factor ({why})"

    if folder_kind is not None:
        file_format = folder_kind if layout != LDM else f"{folder_kind} with ldm keys"
    elif prefix:
        file_format = f"prefixed checkpoint ({prefix}*, {layout} keys, {container})"
    else:
        file_format = f"{layout} {container}"
    return VAEFile(
        path, file_format, state_dict, config, config_source, layout, prefix, metadata, folder_kind
    )


def build_vae(
    vae_file: VAEFile, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Build the model a `VAEFile` describes and load its tensors strictly.

    Args:
        vae_file: the result of `read_vae`.
        device: where to put the model (default CPU).
        dtype: parameter dtype (default float32, whatever the file stores, as diffusers does).

    Returns:
        The model in eval mode.

    Raises:
        VAEFileError: the config names a class we cannot build, or has values of the wrong type.
        StateDictMismatchError: the tensors do not fit the architecture.
    """
    class_name = vae_file.config.get("_class_name", "AutoencoderKL")
    if class_name not in MODEL_CLASSES:
        raise VAEFileError(
            f"{vae_file.path}: config _class_name {class_name!r} is not supported; supported: {sorted(MODEL_CLASSES)}."
        )
    if wrong := MODEL_CLASSES[class_name].config_type_errors(vae_file.config):
        raise VAEFileError(
            f"{vae_file.path}: its config ({vae_file.config_source}) has values of the wrong type: "
            f"{'; '.join(wrong)}. Fix them to the types diffusers.{class_name} takes."
        )
    # Build on the meta device (no memory, no random init) and adopt the file's tensors with assign=True.
    try:
        with torch.device("meta"):
            model = MODEL_CLASSES[class_name].from_config(vae_file.config)
    except ValueError as err:  # a config this package cannot build (block types, norm_type)
        raise VAEFileError(f"{vae_file.path}: cannot build its {class_name}: {err}") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in vae_file.state_dict.items()}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    mismatched = [
        (k, given[k], expected[k]) for k in sorted(expected.keys() & given.keys()) if given[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(str(vae_file.path), missing, unexpected, mismatched)
    # Cast the tensors rather than the model: diffusers' ModelMixin.to(dtype) logs a spurious warning. Integer
    # buffers (a BatchNorm's num_batches_tracked) keep their dtype, as Module.to(dtype) leaves them.
    device, dtype = device or "cpu", dtype or torch.float32
    tensors = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in vae_file.state_dict.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def load_vae(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load a VAE from a diffusers folder, a pipeline folder, a training checkpoint or a single weights file.

    Args:
        path: file or folder; see this module's docstring for the accepted layouts.
        allow_pickle: allow `.ckpt` / `.pt` / `.pth` / `.bin` files. Unpickling can run arbitrary code: only for
            files you trust.
        device: where to put the model (default CPU).
        dtype: parameter dtype (default float32).

    Returns:
        A `latentvae.AutoencoderKL`, `latentvae.AutoencoderKLFlux2` or `latentvae.VQModel` (as the config's
        `_class_name` says) in eval mode.

    Raises:
        FileNotFoundError: nothing at `path`, or no weights in the folder.
        PickleRefusedError: a pickle file without `allow_pickle=True`.
        StateDictMismatchError: missing / unexpected / mis-shaped keys (all subclasses of ValueError).
    """
    return build_vae(read_vae(path, allow_pickle=allow_pickle), device=device, dtype=dtype)
