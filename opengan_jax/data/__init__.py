"""Image sources, decoding and batching behind `opengan_jax.input_pipeline`."""
