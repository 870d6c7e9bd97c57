"""MONAI Label app (``main.py``) serving the segmentation bundles; needs the ``label`` extra. See main.py."""
