"""The five stages of an atlas, in order, one module each, talking only through the HDF5 store (atlas.store):
collect (activations and attributions), project (a 2-D layout), grid (cell means), render (an icon per cell) and
compose (atlas images, tiles and the viewer's data)."""
