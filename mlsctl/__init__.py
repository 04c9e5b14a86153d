"""mlsctl: self-supervised and metric learning of vision transformers with memory banks."""

__version__ = "0.1.0"


def load_backbone(path):
    """The timm backbone of a run (its teacher) or of a folder written by ``mlsctl export``; see
    :func:`mlsctl.export.load_backbone`."""
    from mlsctl.export import load_backbone as load

    return load(path)
