"""Label images with keypoints: stream a corpus through model-holding Ray Data actors to Parquet.

    python jobs/label.py --artifact outputs/faces-v1 --input ./images --output ./labels
    ray job submit --working-dir . -- python jobs/label.py --artifact s3://bucket/keypoints/faces-v1 \\
        --input s3://bucket/images/ --output s3://bucket/labels/ --actors 1,8 --use-gpu --dtype float16

Rerunning with the same --output labels only the images that have no row yet,
so an interrupted run resumes and a grown bucket labels only its new images
(--retry_errors also relabels the images whose only rows are errors). One run
writes to an --output at a time. The run exits non-zero when every image it
tried failed, or more than --max_error_fraction of them, after writing its rows
and its summary (<output>/_summary/<run id>.json). Settings can also come from
a YAML file (--config), flags overriding it. Speed: --copies_per_call (UNet
copies per call, across a batch's images), --compile (torch.compile the UNet),
--tta_latent (warp latents instead of images: approximate), --dtype.
"""

import sys

from skp_ray.config import parse_settings, refusals_as_messages
from skp_ray.labelling import LabelConfig, LabellingFailed, run_labelling

RESUME = "the rows written so far are kept; rerun the same command to label the images still without a row"

if __name__ == "__main__":
    with refusals_as_messages("label", resume=RESUME):
        try:
            run_labelling(LabelConfig(**parse_settings(LabelConfig, sys.argv[1:], description=__doc__)))
        except LabellingFailed as failure:
            sys.exit(str(failure))
