"""VAE files: the diffusers <-> original-SD key converter (`convert`), reading any VAE file (`loading`), writing
a diffusers folder and an ldm single file (`export`)."""
