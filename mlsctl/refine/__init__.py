"""Context refinement outside the training loop: ``refine apply`` (:mod:`.apply`) and the
supplement's pictures (:mod:`.plot`). They stay above ``methods`` (layer 3) because they read and write
feature folders (:mod:`mlsctl.features`), open runs (:mod:`mlsctl.restore`) and score k-NN
(:mod:`mlsctl.evaluate`). What is only the method's lives in :mod:`mlsctl.methods.refine`: the training,
the neighbour search (:mod:`mlsctl.methods.refine.neighbours`; ``mlsctl.refine.neighbours`` re-exports
it); the model is :mod:`mlsctl.methods.refine.model`."""
