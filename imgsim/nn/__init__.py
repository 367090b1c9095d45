"""The networks and everything torch: backbones, weights, data loading, augmentation, embedding, ONNX export."""
