"""Measuring VAEs: metrics (`metrics`), the evaluation protocol (`evaluate`), its results and files (`results`,
`report`), latent statistics (`latent_stats`), and timing and memory (`profiling`)."""
