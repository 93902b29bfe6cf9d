"""A checkpoint trained with the plugin in the clients users know: fairseq-interactive with Moses
tokenisation and subword-nmt BPE, and TransformerModel.from_pretrained(...).translate(...), on data
prepared by data-prep (the IWSLT14-layout test archive)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from el_fairseq.cli import user_dir

    root = tmp_path_factory.mktemp("clients")
    proc = subprocess.run(["bash", os.path.join(ROOT, "data-prep", "prepare-iwslt14-de-en.sh"), "--archive",
                           os.path.join(ROOT, "tests", "data", "iwslt14-like", "de-en.tgz"), "--dest", str(root / "data"),
                           "--bpe-size", "200"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data_bin = root / "data" / "data-bin" / "iwslt14.tokenized.de-en"
    run("fairseq-train", str(data_bin), "--user-dir", user_dir(), "--arch", "transformer", "--encoder-layers", "1",
        "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim",
        "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--criterion", "encouraging_loss", "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "3e-3",
        "--max-tokens", "2000", "--max-epoch", "3", "--save-dir", str(root / "ckpt"), "--cpu", "--seed", "1",
        "--no-epoch-checkpoints")
    return data_bin, root / "ckpt"


def test_fairseq_interactive_with_moses_and_subword_nmt(trained):
    from el_fairseq.cli import user_dir

    data_bin, ckpt = trained
    sentences = "ein mann fährt mit dem fahrrad.\nzwei hunde spielen im schnee.\n"
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fairseq-interactive"), str(data_bin),
                           "--user-dir", user_dir(), "--path", str(ckpt / "checkpoint_best.pt"), "--source-lang", "de",
                           "--target-lang", "en", "--tokenizer", "moses", "--bpe", "subword_nmt", "--bpe-codes",
                           str(data_bin / "code"), "--beam", "2", "--cpu"], input=sentences, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    sources = [l for l in lines if l.startswith("S-")]
    detok = [l for l in lines if l.startswith("D-")]
    assert len(sources) == 2 and len(detok) == 2
    assert "@@ " in sources[0] and "@@ " not in detok[0]  # BPE applied to the input, removed from the output
    assert sources[0].rstrip().endswith(" .")  # tokenizer.perl split the final period


def test_from_pretrained_translate_with_one_import_line(trained, tmp_path):
    data_bin, ckpt = trained
    code = (
        "import el_fairseq.criterions\n"  # the one line: the plugin (torch >= 2.6 loading of fairseq checkpoints)
        "from fairseq.models.transformer import TransformerModel\n"
        f"m = TransformerModel.from_pretrained({str(ckpt)!r}, checkpoint_file='checkpoint_best.pt', "
        f"data_name_or_path={str(data_bin)!r}, tokenizer='moses', bpe='subword_nmt', "
        f"bpe_codes={str(data_bin / 'code')!r}, source_lang='de', target_lang='en')\n"
        "import json; print(json.dumps(m.translate(['ein mann fährt mit dem fahrrad.', 'zwei hunde.'], beam=2)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    translations = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(translations) == 2 and all(isinstance(t, str) for t in translations)
    # without the line, torch >= 2.6 refuses the checkpoint: the README's line is needed, not decoration;
    # the public loss (import el_fairseq) changes nothing in fairseq, so it is not that line
    for line in ("", "import el_fairseq\n"):
        bare = subprocess.run([sys.executable, "-c", code.replace("import el_fairseq.criterions\n", line)],
                              capture_output=True, text=True, cwd=str(tmp_path))
        assert bare.returncode != 0 and "weights_only" in bare.stderr
