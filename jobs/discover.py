"""Discover keypoint tokens: data-parallel optimisation of the context on Ray Train, then token voting.

    python jobs/discover.py                      # embedded default: local Ray, tiny model, sample images
    python jobs/discover.py --config discover.yaml --num-workers 4 --use-gpu
    ray job submit --working-dir . -- python jobs/discover.py \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data s3://bucket/images/ \\
        --output s3://bucket/keypoints --name faces-v1 --num-workers 8 --use-gpu --dtype float16

Settings come from the defaults (SPEC.md; with no --model, the small embedded
default), then the YAML file given with --config, then the flags. Rerunning with
the same --output and --name resumes an interrupted run. The hub token, when a
model needs one, is read from HF_TOKEN.
"""

import sys

from skp_ray.config import parse_settings, refusals_as_messages
from skp_ray.discovery import DiscoveryConfig, discovery_config, run_discovery

RESUME = "rerun with the same --output and --name to resume from the latest checkpoint, if one was written"

if __name__ == "__main__":
    with refusals_as_messages("discover", resume=RESUME):
        run_discovery(discovery_config(parse_settings(DiscoveryConfig, sys.argv[1:], description=__doc__)))
