from setuptools import find_packages, setup

setup(
    name="el-fairseq",
    version="0.1.0",
    description="Encouraging loss (Zhao et al., arXiv 2110.06537) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["el_fairseq", "el_fairseq.*"]),
    # The native CPU kernel is compiled from this source on first use: without it a wheel would
    # silently fall back to the chunked path (about 6x slower on the CPU).
    package_data={"el_fairseq.loss": ["native_kernel.c"]},
    python_requires=">=3.8",
    # fairseq is installed separately (see README and scripts/install.sh): its PyPI releases
    # either do not build or declare a torchaudio that drags in a CUDA torch.
    install_requires=["torch>=1.13", "numpy", "sacrebleu>=2.0"],
    entry_points={
        "console_scripts": [
            "el-fairseq-user-dir=el_fairseq.cli:print_user_dir",
            "el-fairseq-generate=el_fairseq.cli:generate",
            "el-fairseq-train=el_fairseq.cli:train",
            "el-fairseq-average-checkpoints=el_fairseq.pipeline.checkpoints:main",
        ]
    },
)
