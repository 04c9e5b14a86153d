"""Context refinement outside the training loop: neighbour search, ``refine apply`` and the
supplement's pictures. The model is :mod:`mlsctl.models.refiner`, its training :mod:`mlsctl.methods.refine`."""
