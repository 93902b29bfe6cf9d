"""Corpus preparation for el-fairseq: IWSLT14 De-En, IWSLT17 Fr-En, Multi30k (pure Python tools)."""
