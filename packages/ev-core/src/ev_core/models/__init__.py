"""ev models, registered with timm on import."""
