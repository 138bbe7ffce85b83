import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("remix_ds/__init__.py").read()).group(1)

setup(
    name="remix_ds",
    version=VERSION,
    description="Continual memorization of factoids (REMIX) on DeepSpeed: ZeRO-2/3, full or LoRA/QLoRA per stage",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["remix_ds", "remix_ds.*"]),
    package_data={"remix_ds": ["recipes/*.yaml"]},
    include_package_data=True,
    install_requires=[
        # torch is pinned by the README's set-up command on CPU machines (a local CPU build);
        # any torch >= 2.4 works, and on a GPU machine pip's default build is the CUDA one.
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.56",
        "peft>=0.17",
        "datasets>=3.0",
        "bitsandbytes>=0.45",
        "accelerate>=1.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "english-words>=2.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "filelock>=3.12",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",
    ],
    entry_points={"console_scripts": ["remix-ds = remix_ds.console:main"]},
    extras_require={"test": ["pytest>=7", "tensorboard>=2.14", "wandb>=0.17", "mlflow-skinny>=2.10"],
                    "tensorboard": ["tensorboard>=2.14"],
                    "tracking": ["tensorboard>=2.14", "wandb>=0.17", "mlflow-skinny>=2.10"]},
)
