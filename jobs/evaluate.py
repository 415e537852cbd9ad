"""Evaluate discovered keypoints on a dataset with ground truth: regressor, published metric, visual report.

    python jobs/evaluate.py --labels ./labels --dataset celeba_aligned --root /data/celeba --output ./eval
    python jobs/evaluate.py --artifact outputs/faces-v1 --dataset celeba_wild --root /data/celeba --output ./eval
    ray job submit --working-dir . -- python jobs/evaluate.py --artifact s3://bucket/keypoints/cub-v1 \\
        --dataset cub_all --root /data/cub --output s3://bucket/eval/cub-v1 --actors 1,8 --use-gpu

With --artifact instead of --labels the job first labels the dataset's images
(train and test splits) through the labelling pipeline. An artifact learned on
one dataset evaluated against another's --dataset/--root is a transfer test.
Writes manifest.parquet, metrics.json, metrics.md, the pictures and report.html
into --output. Settings can also come from a YAML file (--config).
"""

import sys

from skp_ray.config import parse_settings, refusals_as_messages
from skp_ray.evaluation import EvaluateConfig, run_evaluation

RESUME = "the labels written so far are kept; rerun the same command to carry on"

if __name__ == "__main__":
    with refusals_as_messages("evaluate", resume=RESUME):
        run_evaluation(EvaluateConfig(**parse_settings(EvaluateConfig, sys.argv[1:], description=__doc__)))
