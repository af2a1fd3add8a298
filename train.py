"""Train a Vision Transformer.

    python train.py --config configs/fashion_mnist.yaml [key.path=value ...] [--resume]

The same command runs under ``accelerate launch train.py ...`` and
``torchrun --nproc_per_node N train.py ...``.
"""

from vit.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
