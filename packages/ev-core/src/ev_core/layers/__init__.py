"""Building blocks (attention family, token merging, MLPs) used by the ev models."""
