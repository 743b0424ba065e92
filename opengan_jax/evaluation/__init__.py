"""Sample-quality evaluation: feature distances (FID, KID, precision and recall) and the FID network.

Import the submodules directly; this package imports nothing heavy on its own.
"""
