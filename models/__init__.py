"""Pure model code: one llama-like decoder core, paged attention, checkpoint name maps.

Axis letters used in shape comments and einsum subscripts throughout this package:

    T   tokens of the step (flat, all sequences concatenated)
    B   sequences of the step
    D   model width (hidden_size)
    F   MLP intermediate width
    V   vocabulary
    H   query heads            K   key/value heads       G   query heads per KV head (H // K)
    Dh  head width (head_dim)
    P   KV blocks in the cache S   slots per block (block_size)
    N   KV blocks one step's attention reads;  N*S = the keys it reads
"""
