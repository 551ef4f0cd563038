"""The networks: the diffusers twins `AutoencoderKL`, `AutoencoderKLFlux2` (its subclass) and `VQModel` (on the
shared `base`), their `blocks`, the Gaussian posterior (`distributions`), the codebook (`quantizer`), the PatchGAN
(`discriminator`), named shapes (`presets`), seam-free tiling (`tiling`, `groupnorm_stats`) and the fast inference
path (`inference`)."""
