"""Serve keypoints online: a Ray Serve endpoint answering one image at a time, batched across clients.

    python jobs/serve.py --artifact outputs/faces-v1
    curl --data-binary @photo.jpg http://127.0.0.1:8000/v1/keypoints
    curl -F image=@photo.jpg "http://127.0.0.1:8000/v1/keypoints?format=png&seed=3" -o keypoints.png
    ray job submit --working-dir . -- python jobs/serve.py --artifact s3://bucket/keypoints/faces-v1 \\
        --replicas 1,4 --use-gpu --dtype float16 --host 0.0.0.0 --token_env SKP_API_TOKEN

It runs in the foreground until interrupted (Ctrl-C, SIGTERM), then stops
Serve and the local Ray it started (on a cluster it joined, only its own
application). The port binds to 127.0.0.1 unless --host says otherwise:
--host 0.0.0.0 opens it to the network, so give it a token then
(--token_file or --token_env; never on the command line). For a cluster,
cluster/serve.yaml (serve deploy) and cluster/kuberay/rayservice.yaml deploy
the same application. Settings can also come from a YAML file (--config),
flags overriding it.
"""

import sys

from skp_ray.config import parse_settings
from skp_ray.serving import ServeConfig, run_server

if __name__ == "__main__":
    try:
        run_server(ServeConfig(**parse_settings(ServeConfig, sys.argv[1:], description=__doc__)))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.exit(f"[serve] {error}")
