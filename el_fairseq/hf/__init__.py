"""The encouraging loss in Hugging Face transformers' `Trainer` (and trainers built on it, e.g. TRL's).

    from el_fairseq.hf import compute_loss_func
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      compute_loss_func=compute_loss_func(causal_lm=True, log_end=0.75))

    from el_fairseq.hf import fuse_encouraging_loss          # causal LMs: no logits in training
    model = fuse_encouraging_loss(model, log_end=0.75)        # then Trainer(model=model, ...) as usual

    from el_fairseq.hf import EncouragingSFTTrainer          # TRL: SFTTrainer(...) -> this, fused
    trainer = EncouragingSFTTrainer(model=model, args=sft_config, train_dataset=train, el_options={"log_end": 0.75})

The loss is summed over the labels that are not -100 and divided by Trainer's `num_items_in_batch`, the
count of such labels over the whole accumulated batch, as transformers' own losses do: Trainer does not
divide a custom loss by the gradient-accumulation steps, so a per-micro-batch mean would come out
`gradient_accumulation_steps` times too large. Importing this package does not import transformers
(only `fuse_encouraging_loss` needs it) nor TRL (`EncouragingSFTTrainer`, el_fairseq.hf.trl, imports it on
first access); the loss itself never imports this package.
"""
from .loss import compute_loss_func, trainer_loss  # noqa: F401
from .fused import fuse_encouraging_loss  # noqa: F401

LAZY = {"EncouragingSFTTrainer": ".trl"}  # name -> module, imported on first access (it imports trl)


def __getattr__(name):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
