"""The encouraging loss across devices: logits sharded on the class dimension (vocabulary / tensor parallelism).

    from el_fairseq.parallel import vocab_parallel_encouraging_loss   # each rank: its (N, V_r) shard of the logits

This package sits above el_fairseq.loss: it imports the loss package's formula and checks, and the loss
package reaches it only through api.py's hook for DTensor logits sharded on the classes (dtensor.py),
imported by name when such logits arrive.
"""
from .vocab_parallel import vocab_parallel_encouraging_loss  # noqa: F401
