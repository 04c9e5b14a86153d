"""mlsctl: self-supervised and metric learning of vision transformers with memory banks."""

__version__ = "0.1.0"


def load_backbone(path, arch=None):
    """The timm backbone of a run (its teacher), of a folder written by ``mlsctl export`` or of a
    weights file (``arch``: its timm architecture, when the file does not record it); see
    :func:`mlsctl.export.load_backbone`."""
    from mlsctl.export import load_backbone as load

    return load(path, arch)
