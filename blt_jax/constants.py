"""The byte vocabulary every blt-jax model shares.

Inputs are bytes 0..255 and BOS; outputs are a distribution over the next byte.
"""
BYTES = 256        # next-byte distribution: one logit per byte value
BOS = BYTES        # input id of the beginning-of-sequence token that leads every window
INPUT_VOCAB = BYTES + 1  # input ids: bytes + BOS
