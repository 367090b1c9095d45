"""What tests and benchmarks share (real servers on loopback ports, a real MLflow store); never imports pytest."""
