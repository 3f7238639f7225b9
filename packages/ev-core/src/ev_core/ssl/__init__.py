"""Self-supervised (contrastive) pre-training core."""
