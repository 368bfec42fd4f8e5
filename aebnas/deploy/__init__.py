"""From a search to a deployed model: retrain, TorchScript, ONNX, latency profiles."""
