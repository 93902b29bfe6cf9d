#!/usr/bin/env bash
# Run the steps of fairseq's examples/translation/prepare-iwslt14.sh, unchanged but for the paths
# and the number of BPE merges, on de-en.tgz, and keep its outputs in expected/: the reference that
# tests/test_moses_parity.py compares data-prep/prepare-iwslt14-de-en.sh with, byte for byte.
#
#   MOSES=/path/to/mosesdecoder SUBWORD_NMT=/path/to/subword-nmt bash make_expected.sh [MERGES]
#
# (checkouts of github.com/moses-smt/mosesdecoder and github.com/rsennrich/subword-nmt, as the
# recipe clones them; run in a UTF-8 locale, as the recipe's sed and grep usually are).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SCRIPTS=${MOSES:?set MOSES to a mosesdecoder checkout}/scripts
BPEROOT=${SUBWORD_NMT:?set SUBWORD_NMT to a subword-nmt checkout}
TOKENIZER=$SCRIPTS/tokenizer/tokenizer.perl
LC=$SCRIPTS/tokenizer/lowercase.perl
CLEAN=$SCRIPTS/training/clean-corpus-n.perl
BPE_TOKENS=${1:-200}
export LC_ALL=C.UTF-8

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
src=de; tgt=en; lang=de-en; prep=iwslt14.tokenized.de-en; tmp=$prep/tmp; orig=orig
mkdir -p $orig $tmp $prep
tar -C $orig -xzf "$HERE/de-en.tgz"

for l in $src $tgt; do
    f=train.tags.$lang.$l
    tok=train.tags.$lang.tok.$l
    cat $orig/$lang/$f | grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>' \
      | sed -e 's/<title>//g' | sed -e 's/<\/title>//g' | sed -e 's/<description>//g' | sed -e 's/<\/description>//g' \
      | perl $TOKENIZER -threads 8 -l $l > $tmp/$tok
done
perl $CLEAN -ratio 1.5 $tmp/train.tags.$lang.tok $src $tgt $tmp/train.tags.$lang.clean 1 175
for l in $src $tgt; do
    perl $LC < $tmp/train.tags.$lang.clean.$l > $tmp/train.tags.$lang.$l
done
for l in $src $tgt; do
    for o in $(ls $orig/$lang/IWSLT14.TED*.$l.xml); do
      fname=${o##*/}
      f=$tmp/${fname%.*}
      grep '<seg id' $o | sed -e 's/<seg id="[0-9]*">\s*//g' | sed -e 's/\s*<\/seg>\s*//g' | sed -e "s/\’/\'/g" \
        | perl $TOKENIZER -threads 8 -l $l | perl $LC > $f
    done
done
for l in $src $tgt; do
    awk '{if (NR%23 == 0)  print $0; }' $tmp/train.tags.de-en.$l > $tmp/valid.$l
    awk '{if (NR%23 != 0)  print $0; }' $tmp/train.tags.de-en.$l > $tmp/train.$l
    cat $tmp/IWSLT14.TED.dev2010.de-en.$l $tmp/IWSLT14.TEDX.dev2012.de-en.$l $tmp/IWSLT14.TED.tst2010.de-en.$l \
        $tmp/IWSLT14.TED.tst2011.de-en.$l $tmp/IWSLT14.TED.tst2012.de-en.$l > $tmp/test.$l
done
TRAIN=$tmp/train.en-de
BPE_CODE=$prep/code
rm -f $TRAIN
for l in $src $tgt; do cat $tmp/train.$l >> $TRAIN; done
python3 $BPEROOT/learn_bpe.py -s $BPE_TOKENS < $TRAIN > $BPE_CODE
for L in $src $tgt; do
    for f in train.$L valid.$L test.$L; do
        python3 $BPEROOT/apply_bpe.py -c $BPE_CODE < $tmp/$f > $prep/$f
    done
done
rm -rf "$HERE/expected" && mkdir "$HERE/expected"
cp $prep/code $prep/train.?? $prep/valid.?? $prep/test.?? "$HERE/expected/"
wc -l "$HERE"/expected/*
