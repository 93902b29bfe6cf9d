"""The encouraging loss across devices: logits sharded on the class dimension (vocabulary / tensor parallelism).

    from el_fairseq.parallel import vocab_parallel_encouraging_loss   # each rank: its (N, V_r) shard of the logits
    from el_fairseq.parallel import vocab_parallel_encouraging_linear_loss   # its (V_r, D) rows of the projection

This package sits above el_fairseq.loss: it imports the loss package's formula, checks and chunk loop, and the
loss package reaches it only through the hooks of api.py (DTensor logits sharded on the classes) and linear.py
(a DTensor projection weight sharded on the classes), both in dtensor.py, imported by name when such a DTensor
arrives.
"""
from .vocab_parallel import vocab_parallel_encouraging_loss  # noqa: F401
from .vocab_parallel_linear import vocab_parallel_encouraging_linear_loss  # noqa: F401
