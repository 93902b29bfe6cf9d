"""A tiny fairseq-compatible model and task for criterion tests (no data files)."""
import torch
from fairseq.data import Dictionary

PAD = 1


class TinyDecoder(torch.nn.Module):
    adaptive_softmax = None


class TinyModel(torch.nn.Module):
    """logits = W[src_tokens]: enough of fairseq's model interface for a criterion."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3.0)
        self.decoder = TinyDecoder()

    def forward(self, src_tokens, **kwargs):
        return self.table[src_tokens], None

    def get_targets(self, sample, net_output):
        return sample["target"]

    def get_normalized_probs(self, net_output, log_probs):
        logits = net_output[0].float()
        return torch.log_softmax(logits, -1) if log_probs else torch.softmax(logits, -1)


class TinyTask:
    def __init__(self, vocab):
        d = Dictionary()
        for i in range(vocab - len(d)):
            d.add_symbol(f"w{i}")
        self.target_dictionary = d
        self.source_dictionary = d


def make_sample(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (batch, length), generator=g)
    target = torch.randint(4, vocab, (batch, length), generator=g)
    # ragged lengths: right padding, one sentence has a single token
    for i in range(batch):
        n = max(1, length - (i * 3) % length)
        target[i, n:] = PAD
    return {
        "net_input": {"src_tokens": src},
        "target": target,
        "ntokens": int(target.ne(PAD).sum()),
    }


def build(name, vocab=40, **overrides):
    """Build a registered criterion through fairseq's registry and dataclass config."""
    import el_fairseq.criterions  # noqa: F401  (the plugin: registers the criteria)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY
    from omegaconf import OmegaConf

    cls = CRITERION_REGISTRY[name]
    cfg = OmegaConf.structured(CRITERION_DATACLASS_REGISTRY[name])
    cfg.sentence_avg = False
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._name = name
    return cls.build_criterion(cfg, TinyTask(vocab))
