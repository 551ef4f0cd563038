"""Pretrained backbone weights (LPIPS's VGG16 / AlexNet, FID's Inception) from the torch hub cache, offline-aware.

The libraries we use (lpips -> torchvision, pytorch-fid) fetch these files on first use into
`$TORCH_HOME/hub/checkpoints/` and read them from there afterwards. Offline, that first fetch hangs or fails with a
network error that does not say which file was wanted. So before building, we look for the file ourselves and, when
it is absent, stop with a `MissingWeightsError` that names the file, the folder it belongs in and where to get it.
Downloading is opt-in (`allow_download=True` or `LATENTVAE_ALLOW_DOWNLOAD=1`); then the library's own download runs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import lpips
import torch
from torchvision.models import AlexNet_Weights, VGG16_Weights

ALLOW_DOWNLOAD_ENV = "LATENTVAE_ALLOW_DOWNLOAD"


@dataclass(frozen=True)
class HubWeights:
    """A weights file that a library downloads into the torch hub cache on first use.

    Args:
        url (`str`): the official download address; its last path component is the cached file name.
        description (`str`): what the file is, for error messages.
    """

    url: str
    description: str

    @property
    def filename(self) -> str:
        # torch.hub.load_state_dict_from_url names the cached file after the URL's basename; so do we.
        return os.path.basename(urlparse(self.url).path)


# Taken from the installed torchvision, so the names always match what lpips -> torchvision will look for.
LPIPS_BACKBONES: dict[str, HubWeights] = {
    "vgg": HubWeights(
        VGG16_Weights.IMAGENET1K_V1.url, "torchvision's VGG16 ImageNet weights (LPIPS-VGG backbone)"
    ),
    "alex": HubWeights(
        AlexNet_Weights.IMAGENET1K_V1.url, "torchvision's AlexNet ImageNet weights (LPIPS-Alex backbone)"
    ),
}
# The standard FID Inception-v3 weights as pytorch-fid publishes them.
FID_INCEPTION = HubWeights(
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "the standard FID Inception-v3 weights (pytorch-fid)",
)


class MissingWeightsError(FileNotFoundError, RuntimeError):
    """A pretrained weights file is not in the torch hub cache and may not (or could not) be downloaded.

    Attributes:
        filename (`str`): the file name that is missing, e.g. `vgg16-397923af.pth`.
        directory (`Path`): the folder it must be put in (`$TORCH_HOME/hub/checkpoints`).
        url (`str`): where to download it.
    """

    def __init__(self, weights: HubWeights, directory: Path, alternative: str, reason: str):
        super().__init__(
            f"Missing pretrained weights: {weights.description}, file '{weights.filename}', is not in the torch hub "
            f"cache {directory} ({reason}).\n"
            f"  Fix: download {weights.url} (on any machine with internet) and copy it to "
            f"{directory / weights.filename} (the folder follows $TORCH_HOME; default ~/.cache/torch), "
            f"or allow the download here with {ALLOW_DOWNLOAD_ENV}=1.\n"
            f"  Or: {alternative}."
        )
        self.filename = weights.filename
        self.directory = directory
        self.url = weights.url

    def __str__(self) -> str:
        # OSError would format itself as "[Errno None] None: <filename>"; the message is the useful part.
        return self.args[0]


def torch_hub_checkpoint_dir() -> Path:
    """The folder where torch.hub / torchvision cache downloaded weights: `$TORCH_HOME/hub/checkpoints`.

    Returns:
        `Path`: `torch.hub.get_dir() / "checkpoints"` (read afresh on each call, so `$TORCH_HOME` changes apply).
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """Whether weights may be fetched from the internet: the argument if given, else `$LATENTVAE_ALLOW_DOWNLOAD`."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def require_hub_weights(weights: HubWeights, *, alternative: str, allow_download: bool | None = None) -> Path:
    """Check that `weights` is in the torch hub cache, before a library tries (and offline fails) to fetch it.

    Args:
        weights (`HubWeights`): the file to look for, e.g. `LPIPS_BACKBONES["vgg"]` or `FID_INCEPTION`.
        alternative (`str`): what the user can do instead, quoted in the error (e.g. "pass --no_lpips").
        allow_download (`bool`, *optional*): if True (or `$LATENTVAE_ALLOW_DOWNLOAD=1` when None), a missing file is
            not an error: the caller's library downloads it.

    Returns:
        `Path`: where the file is (or, when downloading is allowed, will be) cached.

    Raises:
        `MissingWeightsError`: the file is absent and downloading is not allowed.
    """
    directory = torch_hub_checkpoint_dir()
    path = directory / weights.filename
    if not path.is_file() and not downloads_allowed(allow_download):
        raise MissingWeightsError(weights, directory, alternative, reason="downloads are off")
    return path


def build_lpips(
    net: str = "vgg",
    *,
    random_backbone: bool = False,
    allow_download: bool | None = None,
    alternative: str = "train without the perceptual term (--perceptual_weight 0) or evaluate with --no_lpips",
) -> lpips.LPIPS:
    """Build LPIPS v0.1 through the `lpips` package's own loading path, frozen, for use as a loss or a metric.

    The linear calibration layers ship inside the `lpips` package; the backbone comes from torchvision's ImageNet
    weights in the torch hub cache (`LPIPS_BACKBONES[net].filename`). torchvision checks the file's hash only when
    it downloads, so whatever file sits under that name is loaded as is.

    Args:
        net (`str`): `"vgg"` (the LDM / SD training loss) or `"alex"` (the usual evaluation metric).
        random_backbone (`bool`): randomly initialised backbone (`pnet_rand=True`), no file needed. For tests of
            the code path only: the distances are meaningless.
        allow_download (`bool`, *optional*): let torchvision download a missing backbone (default: only when
            `$LATENTVAE_ALLOW_DOWNLOAD=1`).
        alternative (`str`): what the user can do instead, quoted in the error.

    Returns:
        `lpips.LPIPS`: in eval mode with `requires_grad=False` on every parameter; gradients still flow to its
        inputs. Call it as `lpips_module(x, y)` with images in [-1, 1]; it returns distances of shape `(B, 1, 1, 1)`.

    Raises:
        `MissingWeightsError`: the backbone file is missing and cannot be downloaded.
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    if random_backbone:
        module = _construct_lpips(net, pnet_rand=True)
    else:
        weights = LPIPS_BACKBONES[net]
        path = require_hub_weights(weights, alternative=alternative, allow_download=allow_download)
        try:
            module = _construct_lpips(net, pnet_rand=False)
        except OSError as err:  # URLError is an OSError: the download we allowed did not succeed
            if path.is_file():
                raise
            reason = f"the download failed: {err}"
            raise MissingWeightsError(weights, path.parent, alternative, reason=reason) from err
    module.eval()
    module.requires_grad_(False)
    return module


def _construct_lpips(net: str, pnet_rand: bool) -> lpips.LPIPS:
    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision with the legacy `pretrained=` argument; the warnings are not actionable.
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        return lpips.LPIPS(net=net, version="0.1", pnet_rand=pnet_rand, verbose=False)
