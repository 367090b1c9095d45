"""Each stage as a tracked MLflow run, the registry and artifact store (tracking), export and rollout."""
