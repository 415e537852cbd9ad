"""Match points between pairs of images with diffusion models on Ray Data; score them by PCK.

    python jobs/correspond.py --pairs spair --root ./SPair-71k --output ./dift-spair
    python jobs/correspond.py --pairs pairs.parquet --output s3://bucket/matches/ --model skp_ray/tiny-sd21
    python jobs/correspond.py --method ldm --pairs pf-willow --root ./PF-Willow --output ./ldm-willow --use-gpu
    ray job submit --working-dir . -- python jobs/correspond.py --pairs spair --root s3://bucket/SPair-71k \\
        --output s3://bucket/dift-spair/ --actors 1,8 --use-gpu

--pairs is a pairs manifest (Parquet or CSV: pair_id, source_uri, target_uri,
source_points_xy and, when known, target_points_xy and target_box_xyxy), or a
dataset name (spair, pf-willow, cub-pairs) whose published layout is at --root.
--method dift (SPEC 2, SD 2.1) extracts each image once, its features kept in
<output>/_features (or --feature_cache), then matches every pair; --method ldm
(SPEC 3, SD 1.4) optimises contexts for each source point once, kept in
<output>/_contexts (or --context_cache), then locates every pair's points in
its target. One row per pair is written to <output>/matches-*.parquet, with
metrics.json (PCK@0.05, PCK@0.1), pairs.png and report.html beside them.
Options marked "dift:" or "ldm:" apply to that method only. Rerunning with the
same --output matches only the pairs that have no row yet (--retry_errors also
the failed ones). Settings can also come from a YAML file (--config), flags
overriding it.
"""

import sys

from skp_ray.config import parse_settings, refusals_as_messages
from skp_ray.correspondence.job import CorrespondConfig, CorrespondenceFailed, run_correspondence

RESUME = "the rows, features and contexts written so far are kept; rerun the same command to match the pairs still without a row"

if __name__ == "__main__":
    with refusals_as_messages("correspond", resume=RESUME):
        try:
            run_correspondence(CorrespondConfig(**parse_settings(CorrespondConfig, sys.argv[1:], description=__doc__)))
        except CorrespondenceFailed as failure:
            sys.exit(str(failure))
