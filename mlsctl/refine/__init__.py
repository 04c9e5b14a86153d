"""Context refinement outside the training loop: neighbour search, ``refine apply`` and the
supplement's pictures. The model and its training are :mod:`mlsctl.methods.refine`."""
