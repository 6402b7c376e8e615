"""Helpers the whole package shares: argument checks (``checks``) and torch.fx support (``fx``)."""
