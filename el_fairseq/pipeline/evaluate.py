"""Evaluate a checkpoint on one test subset: fairseq-generate (beam 5), then
(a) fairseq's tokenized BLEU, the figure the paper reports (generate's "BLEU4 = ..."), and
(b) sacreBLEU of the detokenized hypotheses against the untouched reference text that data-prep
    keeps beside the binarised data (DATA_BIN/{subset}.raw.{tgt}, described in testsets.json),
    lowercased (signature case:lc) where the preparation lowercased, with its signature.

    python -m el_fairseq.pipeline.evaluate CHECKPOINT DATA_BIN [--subset test|test,test1|all] [--remove-bpe '@@ '|sentencepiece]
                                  [--detok moses|space] [--beam 5] [--lenpen 1] [--max-tokens 8000] [--out DIR] [--cpu]

Data without raw references (prepared elsewhere) is refused for sacreBLEU: scoring against the
tokenised, BPE-joined T- lines of fairseq-generate would not be sacreBLEU. A subset that
DATA_BIN/testsets.json does not list is refused with the list of those it does.
Writes OUT/{generate.txt, hyp.detok.txt, ref.txt, result.json} (each via a temporary name):
hyp.detok.txt holds the detokenised hypotheses sacreBLEU scored, line i = fairseq's sentence id i
(its S-/H- lines, which it prints in batch order), so line i of ref.txt is its reference;
result.json records the fairseq-generate command with its beam, length penalty and max tokens.
Bad input and failures end with one line `evaluate: error: ...` (exit 2 for input, 1 for
fairseq-generate failing).
"""
import argparse
import json
import os
import re
import subprocess
import sys

from . import testsets
from ..cli import user_dir
from .recipes import quote

BLEU_LINE = re.compile(r"BLEU4? = ([0-9.]+)")


def fairseq_tool(name):
    """The console script next to this Python (the venv's), else `python -m fairseq_cli.X`."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-m", "fairseq_cli." + name.split("-", 1)[1]]


def write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def parse_generate(output):
    """({id: hypothesis}, {id: reference}, tokenized BLEU) from fairseq-generate's stdout."""
    hyps, refs, bleu = {}, {}, None
    for line in output.splitlines():
        if line.startswith("H-"):  # H-id <tab> score <tab> text
            key, _, rest = line.partition("\t")
            hyps[int(key[2:])] = rest.partition("\t")[2]
        elif line.startswith("T-"):
            key, _, text = line.partition("\t")
            refs[int(key[2:])] = text
        elif "Generate" in line and "BLEU" in line:
            match = BLEU_LINE.search(line)
            bleu = float(match.group(1)) if match else None
    return hyps, refs, bleu


def detokenizer(kind, lang):
    if kind == "moses":
        from sacremoses import MosesDetokenizer

        md = MosesDetokenizer(lang=lang)
        return lambda text: md.detokenize(text.split())
    return lambda text: " ".join(text.split())


def language_pair(data_bin):
    """(source, target) from data-bin's train.{src}-{tgt}.{tgt}.idx (or valid, test) file names."""
    for name in sorted(os.listdir(data_bin)):
        match = re.match(r"(?:train|valid|test)\.([^.-]+)-([^.]+)\.\2\.idx$", name)
        if match:
            return match.group(1), match.group(2)
    raise ValueError(f"{data_bin}: no binarised fairseq data found")


def target_lang(data_bin):
    """The target language of data-bin (language_pair)."""
    return language_pair(data_bin)[1]


def require_inputs(checkpoint, data_bin):
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if not os.path.isdir(data_bin):
        raise FileNotFoundError(f"data-bin folder not found: {data_bin}")


def generate_command(checkpoint, data_bin, subset="test", remove_bpe="@@ ", cpu=False, beam=5, max_tokens=8000,
                     lenpen=1.0, extra=()):
    """The fairseq-generate command line (as a list) that decodes SUBSET."""
    cmd = fairseq_tool("fairseq-generate") + [
        data_bin, "--user-dir", user_dir(), "--path", checkpoint, "--gen-subset", subset,
        "--beam", str(beam), "--lenpen", str(lenpen), "--max-tokens", str(max_tokens), *extra]
    if remove_bpe:
        cmd += ["--remove-bpe", remove_bpe]
    if cpu:
        cmd += ["--cpu"]
    return cmd


def run_generate(cmd):
    """(stdout, {id: hypothesis}, {id: reference}, tokenized BLEU) of a fairseq-generate command."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-generate failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    hyps, refs, tok_bleu = parse_generate(proc.stdout)
    if not hyps or tok_bleu is None:
        raise RuntimeError("fairseq-generate printed no hypotheses or no BLEU line")
    return proc.stdout, hyps, refs, tok_bleu


def generate(checkpoint, data_bin, subset="test", remove_bpe="@@ ", cpu=False, beam=5, max_tokens=8000, extra=()):
    """fairseq-generate on SUBSET: (stdout, {id: hypothesis}, {id: reference}, tokenized BLEU)."""
    require_inputs(checkpoint, data_bin)
    return run_generate(generate_command(checkpoint, data_bin, subset, remove_bpe, cpu, beam, max_tokens, extra=extra))


def require_subset(data_bin, subset):
    """ValueError naming the subsets DATA_BIN has when it lacks SUBSET (testsets.json)."""
    info = testsets.read(data_bin)
    if info is not None and subset not in info.get("subsets", {}):
        have = ", ".join(f"{k} ({v['name']})" for k, v in info["subsets"].items()) or "none"
        raise ValueError(f"--subset {subset!r} does not exist in {data_bin}: its test subsets (testsets.json) "
                         f"are {have}")


def evaluate(checkpoint, data_bin, subset="test", remove_bpe="@@ ", detok="moses", out_dir=None,
             cpu=False, beam=5, max_tokens=8000, extra=(), lenpen=1.0):
    require_inputs(checkpoint, data_bin)  # before the references: a missing checkpoint is the error to show
    require_subset(data_bin, subset)
    src, lang = language_pair(data_bin)
    refs_raw, lowercase, set_name = testsets.raw_references(data_bin, subset, lang)
    cmd = generate_command(checkpoint, data_bin, subset, remove_bpe, cpu, beam, max_tokens, lenpen, extra)
    stdout, hyps, refs, tok_bleu = run_generate(cmd)
    if sorted(refs) != list(range(len(refs_raw))) or sorted(hyps) != sorted(refs):
        raise RuntimeError(f"fairseq-generate scored {len(refs)} sentences of {subset} ({len(hyps)} hypotheses) but "
                           f"its raw references have {len(refs_raw)} lines: the data folder is inconsistent")
    # line i = sentence id i (fairseq prints them in batch order, not by id)
    detok_fn = detokenizer(detok, lang)
    hyp_detok = [detok_fn(hyps[i]) for i in range(len(refs_raw))]

    from sacrebleu.metrics import BLEU

    bleu = BLEU(lowercase=lowercase)
    score = bleu.corpus_score(hyp_detok, [refs_raw])
    result = {
        "checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data_bin), "subset": subset,
        "test_set": set_name, "pair": f"{src}-{lang}", "sentences": len(hyp_detok), "beam": beam,
        "remove_bpe": remove_bpe, "detok": detok,
        "generate": {"command": quote(cmd), "beam": beam, "lenpen": lenpen, "max_tokens": max_tokens},
        "tokenized_bleu": tok_bleu,
        "sacrebleu": {"score": round(score.score, 2), "signature": str(bleu.get_signature()),
                      "text": str(score), "reference": f"{subset}.raw.{lang}"},
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(os.path.join(out_dir, "generate.txt"), stdout)
        write_atomic(os.path.join(out_dir, "hyp.detok.txt"), "".join(h + "\n" for h in hyp_detok))
        write_atomic(os.path.join(out_dir, "ref.txt"), "".join(r + "\n" for r in refs_raw))
        write_atomic(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data_bin")
    parser.add_argument("--subset", default="test",
                        help="a test subset, several separated by commas (test,test1), or 'all' (every subset of "
                             "DATA_BIN/testsets.json)")
    parser.add_argument("--remove-bpe", default="@@ ", help="'@@ ' (subword-nmt), sentencepiece, or '' for none")
    parser.add_argument("--detok", choices=["moses", "space"], default="moses")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=1.0, help="fairseq-generate's length penalty (default 1)")
    parser.add_argument("--max-tokens", type=int, default=8000, help="fairseq-generate's batch size in tokens")
    parser.add_argument("--out", help="folder for hypotheses and result.json (default: next to the checkpoint; "
                                      "with several subsets, one folder per subset: OUT_SUBSET)")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    subsets = list(testsets.subsets(args.data_bin)) if args.subset == "all" else args.subset.split(",")
    for subset in subsets:
        if args.out:
            out = args.out if len(subsets) == 1 else f"{args.out}_{subset}"
        else:
            out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                               f"eval_{os.path.splitext(os.path.basename(args.checkpoint))[0]}_{subset}")
        try:
            result = evaluate(args.checkpoint, args.data_bin, subset, args.remove_bpe, args.detok, out,
                              cpu=args.cpu, beam=args.beam, max_tokens=args.max_tokens, lenpen=args.lenpen)
        except (FileNotFoundError, ValueError) as err:  # bad input: one line, no usage block
            print(f"evaluate: error: {err}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as err:  # fairseq-generate itself failed
            print(f"evaluate: error: {err}", file=sys.stderr)
            sys.exit(1)
        print(f"{subset} = {result['test_set']}")
        print(f"tokenized BLEU (fairseq, as in the paper) = {result['tokenized_bleu']:.2f}")
        print(f"sacreBLEU = {result['sacrebleu']['score']:.2f}  {result['sacrebleu']['signature']}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
