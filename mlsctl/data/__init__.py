"""Images in, training batches out: discovery and decoding, multi-crop views with boxes,
deterministic sampling, and the benchmark builders."""

# Where Fashion-MNIST's IDX files are (the benchmark builders of mlsctl.data.fmnist), kept light here for the CLI's
# option defaults: the Debian package dataset-fashion-mnist's folder, or $FMNIST_DIR (`make` reads it too).
DEFAULT_FMNIST_SOURCE = "/usr/share/datasets/fashion-mnist"
FMNIST_SOURCE_ENV = "FMNIST_DIR"
