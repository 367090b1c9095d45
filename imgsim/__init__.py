"""imgsim: image-similarity search with a ResNet embedding, an Annoy index, MLflow and Seldon Core."""

__version__ = "0.1.0"
