"""Images for training and evaluation: decoding one file (`images`), the bad-file accounting (`skips`), where the
images come from (`sources`: folder, Hugging Face dataset, bundled photos; `shards`: WebDataset tars), the
position-seeded randomness (`seeding`), and the training batches with their exact-resume positions (`loaders`)."""
