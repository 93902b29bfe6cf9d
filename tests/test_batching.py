"""The plugin's batching fix (compat.patch_fairseq_batching) through fairseq's own dataset classes:
shuffled, length-filtered indices as fairseq-train produces them, and a fairseq-train run on a
corpus with over-long pairs."""
import os

import numpy as np
import pytest
import torch

from conftest import run


def language_pair_dataset(n_pairs, too_long, long_valid=(), seed=0):
    import el_fairseq.criterions  # noqa: F401  (the plugin: applies the patch)
    from fairseq.data import Dictionary, LanguagePairDataset

    rng = np.random.default_rng(seed)
    d = Dictionary()
    for i in range(50):
        d.add_symbol(f"w{i}")
    lengths = rng.integers(3, 60, size=n_pairs)
    lengths[list(too_long)] = 1500  # over --max-source-positions 1024
    lengths[list(long_valid)] = 1000  # the longest kept pairs: sorted last, into the remainder batch
    src = [torch.randint(4, len(d), (int(n),)) for n in lengths]
    tgt = [torch.randint(4, len(d), (int(max(2, n * 0.9)),)) for n in lengths]
    return LanguagePairDataset(src, np.array([len(s) for s in src]), d, tgt, np.array([len(t) for t in tgt]), d,
                               shuffle=True)


@pytest.mark.parametrize("max_tokens,max_sentences", [(4096, None), (1000, None), (None, 24)])
def test_batches_hold_exactly_the_kept_indices_after_length_filtering(max_tokens, max_sentences):
    from fairseq.data import data_utils
    from fairseq.data.data_utils_fast import batch_by_size_vec

    # Dataset indices above the kept count (201, 202) land in the last, partial batch: a patch that
    # indexes the position-aligned size vector by dataset index fails or reads wrong sizes there.
    ds = language_pair_dataset(203, too_long=[17, 40], long_valid=[199, 200, 201, 202])
    np.random.seed(3)  # ordered_indices shuffles before sorting by length
    indices = ds.ordered_indices()
    kept, ignored = ds.filter_indices_by_size(indices, (1024, 1024))
    assert sorted(ignored) == [17, 40] and len(kept) == 201
    batches = ds.batch_by_size(kept, max_tokens=max_tokens, max_sentences=max_sentences,
                               required_batch_size_multiple=8)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == sorted(kept.tolist()) and len(flat) == len(kept)
    for b in batches:
        if max_tokens:
            assert max(ds.num_tokens(i) for i in b) * len(b) <= max_tokens
        if max_sentences:
            assert len(b) <= max_sentences
    # identical to fairseq's cython batching (which the unpatched wrapper truncates)
    theirs = batch_by_size_vec(kept.astype(np.int64), ds.num_tokens_vec(kept).astype(np.int64),
                               max_tokens or -1, max_sentences or -1, 8)
    assert [b.tolist() for b in batches] == [np.asarray(b).tolist() for b in theirs]
    assert data_utils.batch_by_size._el_fairseq


def write_corpus_with_long_pairs(folder, rng):
    from el_fairseq.pipeline.synthetic import source_sentence, translate

    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        pairs = [source_sentence(rng) for _ in range(n)]
        if split == "train":  # two pairs longer than --max-source-positions 64, early in the file,
            pairs[5] = pairs[5] * 30
            pairs[40] = pairs[40] * 30
            for i in (n - 3, n - 2, n - 1):  # and the longest kept ones last: they form the partial batch
                pairs[i] = (pairs[i] * 10)[:60]
        with open(os.path.join(folder, f"{split}.src"), "w") as f:
            f.writelines(" ".join(w) + "\n" for w in pairs)
        with open(os.path.join(folder, f"{split}.tgt"), "w") as f:
            f.writelines(" ".join(translate(w)) + "\n" for w in pairs)


def test_fairseq_train_on_a_corpus_with_over_long_pairs(tmp_path):
    import random

    from el_fairseq.cli import user_dir
    from el_fairseq.pipeline.synthetic import binarize

    write_corpus_with_long_pairs(str(tmp_path / "raw"), random.Random(7))
    binarize(str(tmp_path / "raw"), str(tmp_path / "bin"))
    proc = run("fairseq-train", str(tmp_path / "bin"), "--user-dir", user_dir(), "--arch", "transformer",
               "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim",
               "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads",
               "2", "--decoder-attention-heads", "2", "--max-source-positions", "64", "--max-target-positions", "64",
               "--criterion", "encouraging_loss", "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "1e-3",
               "--max-tokens", "500", "--max-epoch", "1", "--save-dir", str(tmp_path / "ckpt"), "--no-save",
               "--cpu", "--seed", "2", "--log-format", "simple", "--skip-invalid-size-inputs-valid-test")
    log = proc.stdout + proc.stderr
    assert "2 samples have invalid sizes and will be skipped" in log
    assert "done training" in log
