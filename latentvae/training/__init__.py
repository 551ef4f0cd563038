"""Training: the config and recipes (`config`), the losses (`losses`), the module DDP wraps with its latent
regulariser (`autoencoding`), one step (`step`), checkpoints (`checkpointing`), signals (`signals`) and validation
(`validation`). The script itself is `training/train.py` at the top of the repository."""
