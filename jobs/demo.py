"""Run the core on sample images: a few optimisation steps, token choice, detection, a picture.

    python jobs/demo.py                      # embedded tiny model, rendered sample images
    python jobs/demo.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --images ./my_images
"""

import argparse
from dataclasses import fields

from skp_ray.demo import DemoConfig, run_demo


def parse_args() -> DemoConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(DemoConfig):
        default = field.default
        kind = type(default) if default is not None else str
        parser.add_argument(f"--{field.name}", type=kind, default=default, help=f"default: {default}")
    return DemoConfig(**vars(parser.parse_args()))


if __name__ == "__main__":
    run_demo(parse_args())
