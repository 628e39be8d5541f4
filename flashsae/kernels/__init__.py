"""Triton kernels and their torch reference twins. Import from `flashsae.ops`, not from here."""
