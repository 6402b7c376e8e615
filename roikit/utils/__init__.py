"""Helpers the whole package shares: argument checks (``checks``), torch.fx support (``fx``) and the
distributed set-up from torchrun's environment (``distributed``), the tools' ``--threads`` (``threads``)."""
