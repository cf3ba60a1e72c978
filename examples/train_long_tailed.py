"""Long-tailed classification: SGD vs SAM vs ImbSAM, Many/Medium/Few accuracy.

Trains the same model on the same long-tailed data with each optimizer, prints a
Many/Medium/Few/Overall table, and writes ``OUT/results.json`` and
``OUT/per_class_accuracy.png`` (per-class test accuracy against training-sample
count). With no ``--dataset`` it runs the embedded ``digits-lt`` (offline, a few
minutes on 2 CPU cores)::

  python examples/train_long_tailed.py --out runs/digits
  python examples/train_long_tailed.py --seeds 0,1,2 --out runs/digits3
  python examples/train_long_tailed.py --dataset cifar100-lt --optimizer sgd,imbsam \\
      --loss logit-adjust --out runs/c100
  python examples/train_long_tailed.py --dataset npz:my.npz --imbalance-ratio 1 ...
  python examples/train_long_tailed.py ... --resume   # continue from checkpoints

``--help`` lists every option; the logic lives in
:mod:`imbsam_jax.recipes.long_tailed` (``main(argv)`` returns the results dict).
"""

from imbsam_jax.recipes.long_tailed import cli

if __name__ == "__main__":
  cli()
