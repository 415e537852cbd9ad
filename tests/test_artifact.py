import hashlib
import json

import numpy as np
import pytest
import torch

from skp_ray.artifact import KeypointArtifact, check_artifact, content_hash, load_artifact, save_artifact


def make_artifact(seed: int = 0) -> KeypointArtifact:
    context = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
    return KeypointArtifact(context, [4, 1, 2], model="some/model", revision="abc", settings={"lr": 0.005},
                            loss_history=[2.0, 1.5], images={"used": 3})  # fmt: skip


def test_save_then_load_gives_back_exactly_what_was_saved(tmp_path):
    artifact = make_artifact()
    save_artifact(artifact, str(tmp_path / "a"), files={"notes.txt": b"hello"})
    loaded = load_artifact(str(tmp_path / "a"))
    assert torch.equal(loaded.context, artifact.context) and loaded.context.dtype == torch.float32
    assert loaded.token_indices == [4, 1, 2] and loaded.model == "some/model" and loaded.revision == "abc"
    assert loaded.settings == {"lr": 0.005} and loaded.loss_history == [2.0, 1.5] and loaded.images == {"used": 3}
    assert loaded.id == artifact.id and len(loaded.id) == 16
    assert (tmp_path / "a" / "notes.txt").read_bytes() == b"hello"
    record = json.loads((tmp_path / "a" / "artifact.json").read_text())
    assert record["num_tokens"] == 6 and record["context_width"] == 4


def test_the_content_hash_is_sha256_of_the_documented_bytes():
    context = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    digest = hashlib.sha256(b"[2, 2]" + np.array([1.0, -2.0, 0.5, 3.0], dtype="<f4").tobytes() + b"[1, 0]")
    assert content_hash(context, [1, 0]) == "sha256:" + digest.hexdigest()
    assert content_hash(context, [0, 1]) != content_hash(context, [1, 0])
    assert content_hash(context.double(), [1, 0]) == content_hash(context, [1, 0])


def test_an_existing_artifact_is_never_overwritten(tmp_path):
    save_artifact(make_artifact(0), str(tmp_path))
    with pytest.raises(FileExistsError, match="already exists"):
        save_artifact(make_artifact(1), str(tmp_path))
    assert torch.equal(load_artifact(str(tmp_path)).context, make_artifact(0).context)


def test_damage_and_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a keypoint artifact"):
        load_artifact(str(tmp_path))
    save_artifact(make_artifact(), str(tmp_path))
    record = json.loads((tmp_path / "artifact.json").read_text())
    record["token_indices"] = [4, 1, 3]
    (tmp_path / "artifact.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="damaged"):
        load_artifact(str(tmp_path))


def test_indices_outside_the_context_are_refused(tmp_path):
    artifact = make_artifact()
    artifact.token_indices = [6]
    with pytest.raises(ValueError, match="within 0..5"):
        save_artifact(artifact, str(tmp_path))


def test_check_artifact_reads_the_same_artifact_without_torch(tmp_path):
    artifact = make_artifact()
    save_artifact(artifact, str(tmp_path))
    checked = check_artifact(str(tmp_path))
    assert isinstance(checked.context, np.ndarray) and checked.context.dtype == np.float32
    np.testing.assert_array_equal(checked.context, artifact.context.numpy())
    assert checked.id == artifact.id and checked.image_size == 512  # SPEC 1.1's side: none recorded
    (tmp_path / "context.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="damaged"):
        check_artifact(str(tmp_path))
