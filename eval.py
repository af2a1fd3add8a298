"""Evaluate a checkpoint folder on a data set.

python eval.py --checkpoint runs/fashion_mnist/checkpoints/best [--split test] [--out DIR]
"""

from vit.cli import eval_main

if __name__ == "__main__":
    raise SystemExit(eval_main())
