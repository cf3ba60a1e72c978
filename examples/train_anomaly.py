"""Semi-supervised anomaly detection (Deep SAD): Adam/SGD vs SAM vs ImbSAM.

One class of the dataset is normal, every other class anomalous. The training
set holds all normal training images, a few *labeled* anomalies (ImbSAM's tail)
and some unlabeled anomalies (pollution); the test set is the whole test split.
Each method trains the same initial bias-free encoder on the same batches; the
script prints test AUROC per normal class (mean ± std over seeds) and writes
``OUT/results.json`` and ``OUT/roc.png``. With no ``--dataset`` it runs the
embedded scikit-learn digits (offline, a few minutes on 2 CPU cores)::

  python examples/train_anomaly.py --out runs/anomaly
  python examples/train_anomaly.py --rho 0.005,0.01,0.02,0.05 --optimizer sam,imbsam
  python examples/train_anomaly.py --labeled-anomaly-ratio 0.01,0.05,0.1,0.2
  python examples/train_anomaly.py --dataset mnist --normal-class 0,1 \\
      --lr 1e-4 --epochs 150 --batch-size 128 --pretrain-epochs 100

``--help`` lists every option; the logic lives in
:mod:`imbsam_jax.recipes.deep_sad` (``main(argv)`` returns the results dict).
"""

from imbsam_jax.recipes.deep_sad import cli

if __name__ == "__main__":
  cli()
