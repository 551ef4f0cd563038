"""`latentvae normalize PATH --data_dir DIR`: measure a VAE's latent normalisation on images and write it where the
target pipeline reads it (`latentvae.evaluation.normalization`): after a decoder fine-tune, for a VAE trained
elsewhere, or to move a VAE to another pipeline family's convention.

    latentvae normalize my-vae --data_dir photos/                            # the family's mode, in place
    latentvae normalize ae.safetensors --data_dir photos/ --mode shift_scale --output ae-normalised.safetensors

Posterior samples z ~ q(z|x) of the first --max_images images (in name order, resized and center-cropped to
--resolution, noise from --seed) are measured in one pass, and the constants of --mode (default: the latent family's,
`default_mode`) are written. The files keep the layout(s) the source had:

    source                                    what is written (in place, or to --output)
    diffusers folder (or a pipeline's vae/)   config.json + diffusion_pytorch_model.safetensors, the ldm single file
                                              beside them when we wrote one there, and the model card's Model section
    a single .safetensors (either key layout) that file, in its key layout, with the config in its metadata
    a training checkpoint, a pickle, a whole  not in place: --output DIR (a diffusers folder, plus an ldm single file
    SD checkpoint                             where the class has that layout, and a card) or --output FILE.safetensors

--output ending in .safetensors writes one file (in the source's key layout); any other --output writes a folder.
Weights are stored in the dtype the source stored them in; other metadata of a rewritten file is kept.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from latentvae.cli.common import UsageError, add_allow_pickle

if TYPE_CHECKING:
    from latentvae.files.loading import VAEFile


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `normalize` arguments to `parser`."""
    parser.add_argument(
        "path", help="the VAE: a diffusers folder, a .safetensors file, a checkpoint (load_vae)"
    )
    parser.add_argument("--data_dir", help="folder of images, searched recursively")
    parser.add_argument("--dataset_name", help="or a Hugging Face dataset (Hub name or local folder)")
    parser.add_argument("--image_column", default="image", help="the dataset's image column (default: image)")
    parser.add_argument("--split", default="train", help="the dataset split (default: train)")
    parser.add_argument(
        "--mode",
        help="scale (SD: scaling_factor = 1 / std), shift_scale (FLUX.1 / SD3: shift_factor = mean, scaling_factor "
        "= 1 / std), per_channel (latents_mean / latents_std; SDXL pipelines then normalise per channel) or "
        "batchnorm (FLUX.2: the bn statistics of 2x2-patchified latents); default: the latent family's",
    )
    parser.add_argument(
        "--max_images", type=int, default=256, help="measure the first N images, in name order (default: 256)"
    )
    parser.add_argument(
        "--resolution", type=int, default=256, help="resize the shorter side to N and center-crop NxN (256)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (default: 0)")
    parser.add_argument(
        "--output", help="write here (a folder, or a file ending in .safetensors) instead of in place"
    )
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    add_allow_pickle(parser)


def _target(vae_file: VAEFile, output: str | None, class_name: str) -> tuple[Path, str | None, bool]:
    """Where to write: (path, the ldm single file written beside a folder's diffusers files, or for a file its key
    layout, whether the path is a folder). Decided before anything is measured, so a refusal costs nothing."""
    from latentvae.files.export import LDM_LAYOUT_CLASSES, ldm_files_in

    source = vae_file.path
    diffusers_folder = (vae_file.folder_kind or "").startswith("diffusers folder")
    bare_file = vae_file.folder_kind is None and not vae_file.prefix and source.suffix == ".safetensors"
    if output is None:
        if bare_file:
            return source, vae_file.layout, False
        if not diffusers_folder:
            raise UsageError(
                f"{source} is a {vae_file.file_format}, which normalize does not rewrite in place: give --output DIR "
                "(a diffusers folder) or --output FILE.safetensors"
            )
        out = source.parent
    else:
        out = Path(output)
        if out.suffix == ".safetensors" and not out.is_dir():
            return out, vae_file.layout, False
        if out.exists() and not out.is_dir():
            raise UsageError(
                f"--output {out} is a file: give a folder, or a path ending in .safetensors for one file"
            )
    if class_name not in LDM_LAYOUT_CLASSES:
        return out, None, True
    if diffusers_folder:  # the files the source folder had: an ldm single file only where we wrote one
        ours = ldm_files_in(source.parent)
        if not ours:
            return out, None, True
        return (
            out,
            ours[0].name if out.resolve() == source.parent.resolve() else f"{out.resolve().name}.safetensors",
            True,
        )
    return out, f"{out.resolve().name}.safetensors", True


def _kept_metadata(found: dict[str, str]) -> dict[str, str]:
    """The metadata of a file that its rewrite keeps: all but what the exporter writes itself."""
    from latentvae.files.export import CONFIG_METADATA_KEY, MARKER_METADATA_KEY

    return {k: v for k, v in found.items() if k not in (CONFIG_METADATA_KEY, MARKER_METADATA_KEY, "format")}


def _file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def run(args: argparse.Namespace) -> int:
    """Run `normalize` from parsed arguments; returns the exit code."""
    # Imported here, not at the top: the parser is built without loading torch and diffusers.
    import torch
    from tqdm.auto import tqdm

    from latentvae.evaluation.evaluate import downsampling_factor, iterate_batches, open_data
    from latentvae.evaluation.latent_stats import measure_latent_stats
    from latentvae.evaluation.normalization import (
        apply_normalization,
        check_mode,
        default_mode,
        describe,
        export_metadata,
        held_constants,
        short,
    )
    from latentvae.evaluation.results import EvaluationError
    from latentvae.files.card import CARD_NAME, CardInfo
    from latentvae.files.export import (
        CONFIG_NAME,
        LDM_LAYOUT_CLASSES,
        WEIGHTS_NAME,
        save_diffusers,
        save_ldm,
        save_single_file,
        update_model_card,
    )
    from latentvae.files.loading import build_vae, read_vae

    for flag in ("max_images", "resolution", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    vae_file = read_vae(args.path, allow_pickle=args.allow_pickle)
    class_name = vae_file.config.get("_class_name", "AutoencoderKL")
    out, ldm_name_or_layout, to_folder = _target(vae_file, args.output, class_name)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model = build_vae(vae_file, device=device)  # measured in fp32
    mode = args.mode or default_mode(model)
    try:
        check_mode(model, mode)
    except ValueError as err:
        raise UsageError(f"{args.path}: {err}") from err
    multiple = downsampling_factor(model) * (2 if mode == "batchnorm" else 1)  # batchnorm: even latent sides
    if args.resolution % multiple:
        raise UsageError(
            f"--resolution {args.resolution}: {mode} needs a multiple of {multiple} for {args.path} (e.g. 256)"
        )
    try:
        data = open_data(args.data_dir, args.dataset_name, args.image_column, args.split, args.max_images)
    except EvaluationError as err:
        raise UsageError(str(err)) from err

    # -- measure ---------------------------------------------------------------------------------------------------
    batches = iterate_batches(data, args.resolution, args.batch_size)
    inputs = (batch.images.to(device, torch.float32) / 127.5 - 1 for batch in batches)  # uint8 -> [-1, 1]
    bar = tqdm(
        inputs, total=math.ceil(len(data.sources) / args.batch_size), desc="latent statistics", unit="batch"
    )
    try:
        stats = measure_latent_stats(model, bar, generator=torch.Generator().manual_seed(args.seed))
    except ValueError as err:  # no image could be decoded
        raise UsageError(
            f"none of the images of {data.description} could be read: {data.skip_log.summary()}"
        ) from err
    before = held_constants(model)
    written = apply_normalization(model, mode, stats)
    how = (
        f"{describe(mode, written, stats)}, {args.resolution} px center crops of {data.description}, seed "
        f"{args.seed}; measured by `latentvae normalize`"
    )

    # -- write, in the source's dtype and layout(s) --------------------------------------------------------------------
    stored = next(v.dtype for v in vae_file.state_dict.values() if v.is_floating_point())
    torch.nn.Module.to(model.cpu(), dtype=stored)  # ModelMixin.to(dtype) warns about keeping modules in fp32
    metadata = export_metadata(how, stats)
    if not to_folder:
        kept = _kept_metadata(vae_file.metadata)
        files = [save_single_file(model, out, ldm_name_or_layout, metadata={**kept, **metadata})]
    else:
        ldm_name, source_folder = ldm_name_or_layout, vae_file.path.parent
        weights_meta = (
            None  # as export_vae: the metadata goes into the ldm file, or (FLUX.2) the weights file
        )
        if class_name not in LDM_LAYOUT_CLASSES:
            weights_meta = {**_kept_metadata(_file_metadata(out / WEIGHTS_NAME)), **metadata}
        files = [save_diffusers(model, out, metadata=weights_meta) / WEIGHTS_NAME, out / CONFIG_NAME]
        if ldm_name is not None:
            kept = _kept_metadata(_file_metadata(out / ldm_name))
            files.append(save_ldm(model, out / ldm_name, metadata={**kept, **metadata}))
        if not (out / CARD_NAME).exists() and (source_folder / CARD_NAME).is_file():
            shutil.copyfile(
                source_folder / CARD_NAME, out / CARD_NAME
            )  # its training and evaluation come along
        card = update_model_card(model, out, ldm_name, CardInfo(normalisation=how))
        files += [card] if card is not None else []

    # -- summary ---------------------------------------------------------------------------------------------------
    print(
        f"{args.path}: {class_name}, {mode} normalisation" + ("" if args.mode else " (the latent family's)")
    )
    print(f"measured: {how}")
    after = held_constants(model)
    width = max(len(key) for key in after)
    for key in after:
        if key in written and (before.get(key) is not None or after[key] is not None):
            print(f"  {key:<{width}}  {short(before.get(key))} -> {short(after[key])}")
    print("wrote: " + ", ".join(str(path) for path in files))
    return 0
