"""Generation and analysis tools for trained OpenGAN workdirs.

api: restore a workdir, encode images, generate, sample latents and features.
figures: one-shot, diversity, interpolation and random-feature sample sheets.
attributes: attribute and pose directions and traversals along them.
embeddings: t-SNE plots of real features and of real versus generated class means.
Command line: `python -m opengan_jax.generate COMMAND --workdir=DIR ...` (see --help).
"""
