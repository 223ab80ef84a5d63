"""The choices and defaults the commands show in --help, in a module that imports nothing: `genloc
--help` builds every parser without loading torch (docs/usage.md#the-genloc-command). The library
modules take them from here, so each has one value."""

# The paper's positional instructions, as normalised x1,y1,x2,y2 regions.
REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}
# Insertion back-ends by name (`genloc.inpainters.load_backend`; each adapter's `name`).
BACKENDS = ("sd", "flux-fill", "powerpaint", "gligen")
# How an insertion picks its context: a crop around the box, the whole image, or crop when the box is small.
MODES = ("auto", "crop", "whole")
# Context on each side of the mask's long side in crop mode: the mask covers about a third of the
# crop (1 / 1.8 of its side), enough surroundings for the object's scale and lighting.
CROP_MARGIN = 0.4
DEFAULT_STEPS = 30
