"""The pipeline half of el-fairseq: the paper's recipes as fairseq-train commands, training,
checkpoint averaging, evaluation (tokenized BLEU and sacreBLEU against raw references), the CE vs EL
reproduction and its report, margin/energy analysis, the CPU demo and its generated corpus.

It drives fairseq's command-line tools with the plugin half (el_fairseq.loss, el_fairseq.criterions,
el_fairseq.compat, el_fairseq.cli.user_dir); the plugin never imports the pipeline.
"""
