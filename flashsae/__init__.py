"""flashsae: Triton kernels for million-feature TopK sparse autoencoders."""
