"""What the diffusers twins (`AutoencoderKL`, its subclass `AutoencoderKLFlux2`, `VQModel`) share: presets,
conversion to and from diffusers' own class, and the sizes pipelines read (`downsampling_factor`, parameter counts)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import diffusers
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DiffusersTwin(ModelMixin, ConfigMixin):
    """Base of a model whose config, `state_dict()` keys and outputs are those of a diffusers class.

    Subclasses set `diffusers_class_name` (the twin's name in `diffusers`), `presets` (name -> constructor
    arguments) and `pipeline_component` (the pipeline argument it fills: `vae`, `vqvae`).
    """

    diffusers_class_name: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    pipeline_component: ClassVar[str]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DiffusersTwin:
        """A randomly initialised model of the named shape, with any constructor argument overridden."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    @classmethod
    def from_diffusers(cls, model: ModelMixin) -> DiffusersTwin:
        """This class with the weights and config of the diffusers twin (strict key match)."""
        ours = cls.from_config(model.config)
        ours.load_state_dict(model.state_dict(), strict=True)
        return ours.to(device=model.device, dtype=model.dtype)

    def to_diffusers(self) -> ModelMixin:
        """The same weights in the stock diffusers class.

        Use it before `pipeline.save_pretrained(...)`: diffusers records each component's library in
        `model_index.json`, and a folder that names `diffusers` loads anywhere, without latentvae installed.
        """
        model = getattr(diffusers, self.diffusers_class_name).from_config(self.config)
        model.load_state_dict(self.state_dict(), strict=True)
        return model.to(device=self.device, dtype=self.dtype)

    @classmethod
    def config_type_errors(cls, config: Mapping[str, Any]) -> list[str]:
        """The entries of a loaded config whose values do not fit the constructor's annotations, each as
        `"key": value (expected type)`; keys the constructor does not take (`_class_name`, ...) are not checked.

        A JSON config with `"latent_channels": "four"` would otherwise reach torch and fail far from its cause.
        """
        hints = typing.get_type_hints(cls.__init__)
        return [
            f"{key!r}: {value!r} (expected {_type_name(hints[key])})"
            for key, value in config.items()
            if key in hints and not _fits(value, hints[key])
        ]

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent position along each side: 2^(levels - 1), as pipelines compute `vae_scale_factor`."""
        return 2 ** (len(self.config.block_out_channels) - 1)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the encoder side (encoder + quant_conv), the decoder side (post_quant_conv + decoder, and a VQ
    model's codebook, which decoding needs), all; for ours and diffusers' models alike."""
    counts = {"encoder": 0, "decoder": 0, "total": 0}
    for name, param in model.named_parameters():
        side = "encoder" if name.startswith(("encoder.", "quant_conv.")) else "decoder"
        counts[side] += param.numel()
        counts["total"] += param.numel()
    return counts


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-loaded `value` fits the annotation `hint` (lists stand for tuples; ints for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return len(items) == len(value) and all(_fits(v, a) for v, a in zip(value, items))
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # bool is an int in Python, not in a config
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # Any, or an annotation this check does not know


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
