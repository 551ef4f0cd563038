"""Benchmarks: speed and memory of encode / decode / the training step against diffusers, tiling, fp16 safety and
fidelity (`modes`, rendered by `report`), and the training data pipeline's rate (`data`). Above evaluation and
training, whose pieces it measures; `latentvae benchmark` and eval/benchmark.py run it."""
