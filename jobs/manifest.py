"""Write a dataset's manifest: one Parquet row per image with its split, crop box, mask and ground truth.

    python jobs/manifest.py --dataset cub_all --root /data/cub --output /data/manifests/cub_all.parquet
    python jobs/discover.py --data /data/manifests/cub_all.parquet --split train ...
    python jobs/label.py --input /data/manifests/cub_all.parquet ...

Discovery, labelling and evaluation all read the same manifest, so crops and
splits are the same everywhere. Datasets: see skp_ray.datasets.DATASETS.
"""

import sys

from skp_ray.config import parse_settings, refusals_as_messages
from skp_ray.datasets import ManifestConfig, make_manifest

RESUME = "rerun the same command; it builds the manifest anew"

if __name__ == "__main__":
    with refusals_as_messages("manifest", resume=RESUME):
        make_manifest(ManifestConfig(**parse_settings(ManifestConfig, sys.argv[1:], description=__doc__)))
