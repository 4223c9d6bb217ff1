"""HF-format checkpoints saved with random weights load through every source kind, and bad ones fail clearly."""

import hashlib
import shutil

import pytest
import torch

from dinat_batch.pipeline.model import ModelChanged, ModelLoadError, load_model
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.files import resolve
from tests.model.test_dinat import shortened

pytestmark = pytest.mark.standalone

PIXELS = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_model():
    return random_model(shortened("dinat-mini-in1k-224"), seed=11)


@pytest.fixture(scope="module")
def expected(reference_model):
    with torch.inference_mode():
        return reference_model(PIXELS)


def check_same(model, expected, backbone_only=False):
    with torch.inference_mode():
        out = model(PIXELS)
    torch.testing.assert_close(out.embeddings, expected.embeddings, atol=1e-6, rtol=0)
    if backbone_only:
        assert out.logits is None and not model.has_classifier
    else:
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
@pytest.mark.parametrize("backbone_only", [False, True], ids=["classifier", "backbone"])
def test_local_folder(tmp_path, reference_model, expected, weights_format, backbone_only):
    folder = save_checkpoint(reference_model, tmp_path / "ckpt", weights_format, backbone_only=backbone_only)
    model = load_model(str(folder), device="cpu")
    check_same(model, expected, backbone_only)
    weights = next(p for p in folder.iterdir() if p.name.startswith(("model.", "pytorch_model")))
    assert model.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model.config.id2label == reference_model.config.id2label
    assert model.source == str(folder)
    assert model.preprocessing.height == 224


def test_file_uri_and_dtype(tmp_path, reference_model, expected):
    folder = save_checkpoint(reference_model, tmp_path / "ckpt")
    model = load_model(f"file://{folder}", device="cpu", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    model = load_model(f"file://{folder}", device="cpu")
    check_same(model, expected)


def test_s3_on_a_real_object_store(tmp_path, object_store, model_cache, reference_model, expected):
    folder = save_checkpoint(reference_model, tmp_path / "ckpt", "bin")
    object_store.make_bucket("models")
    fs = object_store.filesystem()
    fs.put(str(folder) + "/", "models/dinat-mini/", recursive=True)
    uri = "s3://models/dinat-mini/"
    check_same(load_model(uri, device="cpu", storage_options=object_store.storage_options), expected)
    assert len(list(model_cache.iterdir())) == 1
    # a second load reuses the cached download; a changed object gets a fresh one
    load_model(uri, device="cpu", storage_options=object_store.storage_options)
    assert len(list(model_cache.iterdir())) == 1
    fs.pipe("models/dinat-mini/config.json", (folder / "config.json").read_bytes() + b"\n")
    load_model(uri, device="cpu", storage_options=object_store.storage_options)
    assert len(list(model_cache.iterdir())) == 2
    with pytest.raises(ModelLoadError, match=r"expected config.json and one of"):
        load_model("s3://models/absent/", storage_options=object_store.storage_options)
    # pinned: the weight file the pin names, though a preferred one came beside it
    pin = load_model(uri, storage_options=object_store.storage_options).pin
    other = save_checkpoint(random_model(shortened("dinat-mini-in1k-224"), seed=12), tmp_path / "other")
    fs.put(str(other / "model.safetensors"), "models/dinat-mini/model.safetensors")
    assert load_model(uri, storage_options=object_store.storage_options).pin.weights == "model.safetensors"
    pinned = load_model(uri, storage_options=object_store.storage_options, pin=pin)
    assert pinned.pin == pin and pin.weights == "pytorch_model.bin"


def test_hub_id_from_the_local_hub_cache(tmp_path, monkeypatch, reference_model, expected):
    """The hub path itself (huggingface_hub), served offline from a cache laid out as the hub writes it."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--shi-labs--dinat-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_checkpoint(reference_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_home / "hub"))
    model = load_model("shi-labs/dinat-test", device="cpu")
    check_same(model, expected)
    assert model.pin.revision == commit
    # a push moves the default branch; a run's actors load the commit its driver saw
    pushed = "fedcba9876543210fedcba9876543210fedcba98"
    save_checkpoint(random_model(shortened("dinat-mini-in1k-224"), seed=12), repo / "snapshots" / pushed)
    (repo / "refs" / "main").write_text(pushed)
    assert load_model("shi-labs/dinat-test", device="cpu").pin.revision == pushed
    pinned = load_model("shi-labs/dinat-test", device="cpu", pin=model.pin)
    check_same(pinned, expected)
    assert (pinned.pin, pinned.weights_sha256) == (model.pin, model.weights_sha256)
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE is set.*Pass a local copy"):
        load_model("shi-labs/dinat-absent")


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path, reference_model):
    state = reference_model.state_dict()
    del state["dinat.encoder.levels.1.layers.0.attention.self.rpb"]
    state["dinat.extra.weight"] = torch.zeros(1)
    state["classifier.bias"] = torch.zeros(11)
    broken = random_model(shortened("dinat-mini-in1k-224"), seed=1)
    folder = save_checkpoint(broken, tmp_path / "ckpt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "1 missing keys: dinat.encoder.levels.1.layers.0.attention.self.rpb" in message
    assert "1 unexpected keys: dinat.extra.weight" in message
    assert "classifier.bias: checkpoint [11] vs model [10]" in message


def test_corrupt_weights_and_pickled_code_are_refused(tmp_path, reference_model):
    folder = save_checkpoint(reference_model, tmp_path / "ckpt", "bin")
    torch.save({"payload": shutil.rmtree}, folder / "pytorch_model.bin")  # a pickle that would import code
    with pytest.raises(ModelLoadError, match=r"could not read weights pytorch_model.bin"):
        load_model(str(folder))
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=r"could not read weights model.safetensors"):
        load_model(str(folder))


def test_bad_sources_say_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        load_model("not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(
        '{"embed_dim": 64, "depths": [1], "num_heads": [2], "dilations": [[1]]}'
    )
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty" / "config.json").write_text(
        '{"depths": [1, 2], "num_heads": [2], "dilations": [[1]]}'
    )
    with pytest.raises(ModelLoadError, match="one entry per stage"):
        load_model(str(tmp_path / "empty"))


def test_a_pinned_load_takes_the_pinned_weight_file_and_refuses_any_other_change(tmp_path, reference_model):
    """What a run's actors load (`pin`): the weight file its check took, even once a preferred one is
    added; ModelChanged where the weights, the labels or the preprocessing differ from it."""
    folder = save_checkpoint(reference_model, tmp_path / "ckpt", "bin")
    pin = load_model(str(folder)).pin
    assert pin.weights == "pytorch_model.bin" and pin.revision is None
    other = random_model(shortened("dinat-mini-in1k-224"), seed=12)
    shutil.copy(save_checkpoint(other, tmp_path / "other") / "model.safetensors", folder)
    assert load_model(str(folder)).pin.weights == "model.safetensors"  # preferred, unpinned
    assert load_model(str(folder), pin=pin).pin == pin
    other_bin = save_checkpoint(other, tmp_path / "other-bin", "bin") / "pytorch_model.bin"
    for name, changed in [
        ("config.json", lambda text: text.replace(b'"LABEL_0"', b'"renamed"')),
        ("preprocessor_config.json", lambda text: text.replace(b"224", b"256")),
        ("pytorch_model.bin", lambda _: other_bin.read_bytes()),
    ]:
        kept = (folder / name).read_bytes()
        (folder / name).write_bytes(changed(kept))
        assert (folder / name).read_bytes() != kept
        with pytest.raises(ModelChanged, match=r"not the one the run started with"):
            load_model(str(folder), pin=pin)
        (folder / name).write_bytes(kept)
    assert load_model(str(folder), pin=pin).pin == pin


def test_weights_replaced_while_they_are_read_are_refused(tmp_path, reference_model, monkeypatch):
    """The digest is of the tensors loaded: a weight file replaced between its hash and its load fails the
    load (an actor's start, which is tried again), never pairs one file's digest with the other's tensors."""
    folder = save_checkpoint(reference_model, tmp_path / "ckpt")
    other = save_checkpoint(random_model(shortened("dinat-mini-in1k-224"), seed=12), tmp_path / "other")
    import safetensors.torch

    real = safetensors.torch.load_file

    def replaced_first(path, *args, **kwargs):
        shutil.copy(other / "model.safetensors", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", replaced_first)
    with pytest.raises(ModelLoadError, match=r"the weights were replaced while they were read"):
        load_model(str(folder))


def test_a_loaded_model_keeps_its_weights_when_the_file_is_written_over(tmp_path, reference_model, expected):
    """A running actor's weights are its own: a checkpoint copied over the file in place (same inode) after
    the load changes nothing in the model (safetensors' default mapping shared the file's pages)."""
    folder = save_checkpoint(reference_model, tmp_path / "ckpt")
    model = load_model(str(folder), device="cpu")
    other = save_checkpoint(random_model(shortened("dinat-mini-in1k-224"), seed=12), tmp_path / "other")
    with (folder / "model.safetensors").open("r+b") as f:
        f.write((other / "model.safetensors").read_bytes())
    check_same(model, expected)


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_file_that_could_not_be_asked_for_is_not_taken_as_absent(
    tmp_path, monkeypatch, reference_model, offline
):
    """huggingface_hub reports a file it could not ask the hub for (down, unreachable) as not found in the
    cache: online that fails the load, rather than load without the preprocessor config, which would be
    another checkpoint than the driver's (its actors would refuse it as changed). Offline, a file not in
    the cache is one the repository lacks."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    folder = save_checkpoint(reference_model, tmp_path / "ckpt")

    def download(repo_id, name, revision=None):
        if name == "preprocessor_config.json":
            raise LocalEntryNotFoundError("the hub could not be reached")
        if not (folder / name).exists():
            raise LocalEntryNotFoundError("not in the cache")
        return str(folder / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
    if offline:
        assert resolve("shi-labs/dinat-test").preprocessor_config is None
    else:
        with pytest.raises(
            ModelLoadError, match=r"could not get 'shi-labs/dinat-test'.*could not be reached"
        ):
            load_model("shi-labs/dinat-test")
