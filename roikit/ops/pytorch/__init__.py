"""Plain-PyTorch implementations of the region ops: the CPU path, the fallback on any device, the reference."""
