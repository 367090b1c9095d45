"""The stages after split, as plain functions on artifacts (train, extract, gallery changes) and their settings.
They never import MLflow: runs/ tracks them."""
