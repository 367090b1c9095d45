"""What the notebooks compute, one module per notebook: ann (ann_vs_exact), maps (embedding_explorer),
topk (top_k_viewer); gallery opens a bundle's gallery for all three."""
