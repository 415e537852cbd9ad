"""Draw the labelling job's keypoints on their images, to check them by eye.

    python jobs/show.py --labels ./labels --sample 16 --output labels.png
    python jobs/show.py --labels s3://bucket/labels/faces-v1/ --uri s3://bucket/images/a.jpg --output pictures/
    python jobs/show.py --labels ./labels --least_confident 8 --output doubtful.png

Each image is drawn at its own aspect (longest side --size) with its numbered
keypoints, keypoint i always in colour i, and captioned with its file name and
status; a row with keypoint confidence also gets a circle of each keypoint's
spread (in its colour) and the image's median spread in its caption. An error
row shows its image if it can be read, else a grey panel naming the cause.
Output ending in .png: one grid of all pictures; anything else: a folder with
one <name>-<image id>.png per image.
"""

import argparse

from skp_ray.label_pictures import DISPLAY_SIZE, show_labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="the labelling job's --output: folder or URI of its Parquet")
    parser.add_argument("--output", required=True, help="a .png file: one grid of all pictures; else a folder of PNGs")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--uri",
        nargs="+",
        action="extend",
        metavar="URI",
        help="draw these images, named as in the uri column (local paths may be relative); default: every row",
    )
    which.add_argument("--sample", type=int, metavar="N", help="draw N rows picked at random (see --seed)")
    which.add_argument(
        "--least_confident",
        type=int,
        metavar="N",
        help="draw the N ok images whose keypoints are least sure (highest median keypoint spread), worst first",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample pick (default: 0)")
    parser.add_argument(
        "--size", type=int, default=DISPLAY_SIZE, help=f"longest side of a drawn image (default: {DISPLAY_SIZE} pixels)"
    )
    args = parser.parse_args(argv)
    try:
        written = show_labels(
            args.labels,
            args.output,
            uris=args.uri,
            sample=args.sample,
            seed=args.seed,
            least_confident=args.least_confident,
            display_size=args.size,
        )
    except ValueError as error:
        parser.error(str(error))
    print(f"[show] wrote {written[0] if len(written) == 1 else f'{len(written)} pictures into {args.output}'}")


if __name__ == "__main__":
    main()
