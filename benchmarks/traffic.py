"""The bytes each sparse part of a flashsae training step must move: its bandwidth floor.

Every count is the least traffic the op needs, each byte read or written once, with the per-step
sizes B (tokens), k, d, U (distinct features that fired this step), the parameters' element size
``item``, the moments' ``moment_item`` and the 2 bytes of master low bits per bf16 element.
Dividing by the measured device-copy bandwidth gives the floor time the report sets each op's
time beside. Indices and per-row scalars (8 bytes per pair or row) are counted too; caches are not
credited (the B x d activations and gradients are read once each).
"""
from __future__ import annotations


def decode_bytes(B: int, k: int, d: int, item: int) -> int:
    """x_hat = sum_j vals * W_dec[idx] + b_dec: read B*k rows of W_dec, vals and idx; write x_hat."""
    return B * k * (d * item + item + 8) + B * d * item


def backward_bytes(B: int, k: int, d: int, U: int, item: int) -> int:
    """loss.backward() through decode and encoder, both matrices' row gradients (float32, U rows each).

    Decoder: grad_vals reads B*k rows of W_dec and grad_out; the W_dec rows sum grad_out rows into
    U x d. Encoder: grad_b_pre reads B*k rows of W_enc; the W_enc rows sum x rows into U x d (and
    b_enc's U sums). Plus the grouping of the B*k pairs (keys and positions, sorted once).
    """
    decoder = B * k * d * item + B * d * 4 + U * d * 4
    encoder = B * k * d * item + B * d * item + U * (d + 1) * 4
    grouping = 4 * B * k * 8
    return decoder + encoder + grouping


def optimizer_bytes(U: int, d: int, item: int, moment_item: int, master: bool) -> int:
    """SparseAdam on U rows of W_enc and W_dec (and U entries of b_enc): read the float32 gradient,
    read and write the weights (and master low bits), both moments and the step count."""
    per_element = 4 + 2 * item + 4 * moment_item + (4 if master else 0)
    return U * (2 * d + 1) * per_element + 3 * U * 2 * 8
