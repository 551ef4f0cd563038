"""Every test runs offline: no test may reach the network for weights (the tests of the download path switch this
off for themselves and serve files from local sockets). Read by huggingface_hub when it is first imported, and by
latentvae.pretrained on every call."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
