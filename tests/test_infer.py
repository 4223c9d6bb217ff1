"""The inference actor's callable on its own (no Ray): rows as the output schema says, error rows passed
through, backbone-only models, and out-of-memory handled by smaller slices."""

import hashlib
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch

from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.model import ModelChanged, ModelPin, load_model
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.stages import infer
from dinat_batch.pipeline.stages.decode import decode_batch
from dinat_batch.pipeline.stages.infer import Actors, ActorSettings, Predictor
from dinat_batch.pipeline.stages.write import output_schema
from tests.data import MAX_PIXELS, TINY, TINY_INPUT, direct_predictions, photo, tiny_checkpoint

pytestmark = [pytest.mark.standalone, pytest.mark.usefixtures("process_malloc_as_is")]


def decoded(items: dict[str, bytes]) -> dict[str, np.ndarray]:
    keys = list(items)
    batch = {
        "key": np.array(keys, dtype=object),
        "data": np.array([items[k] for k in keys], dtype=object),
        "error": np.array([None] * len(keys), dtype=object),
    }
    return decode_batch(batch, TINY_INPUT, MAX_PIXELS)


@pytest.fixture(autouse=True)
def torch_threads_as_they_were():
    """A lane's thread count is also the default of threads started after it: the tests after these
    (a compile among them, which guards on it) see the count they would have seen."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def predictor(folder, top_k=3) -> Predictor:
    return Predictor(ActorSettings(model=str(folder), run_id="run-1", top_k=top_k, device="cpu"))


def test_rows_match_the_runtime_and_errors_pass_through(tiny_model):
    items = {"a.jpg": photo(1), "broken.jpg": b"nope", "b.png": photo(2, "PNG")}
    table = predictor(tiny_model)(decoded(items))
    assert table.schema == output_schema(TINY.num_features)
    rows = {row["key"]: row for row in table.to_pylist()}
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["embedding"] is None
    direct = direct_predictions(tiny_model, {key: items[key] for key in ("a.jpg", "b.png")}, top_k=3)
    for key, (ids, scores, embedding) in direct.items():
        assert rows[key]["label_ids"] == ids and rows[key]["run_id"] == "run-1"
        np.testing.assert_allclose(rows[key]["scores"], scores, atol=1e-5)
        np.testing.assert_allclose(rows[key]["embedding"], embedding, atol=1e-4)


def test_a_batch_of_errors_only_never_calls_the_model(tiny_model):
    actor = predictor(tiny_model)
    actor.runner.model.forward = None  # any call would fail
    table = actor(decoded({"x.jpg": b"", "y.jpg": b"text"}))
    assert table.column("status").to_pylist() == ["error", "error"]


def test_backbone_only_models_give_embeddings_without_labels(tmp_path):
    folder = save_checkpoint(
        random_model(TINY), tmp_path / "backbone", backbone_only=True, preprocessing=TINY_INPUT
    )
    (row,) = predictor(folder)(decoded({"a.jpg": photo(3)})).to_pylist()
    assert row["status"] == "ok" and row["labels"] is None and row["label_ids"] is None
    assert len(row["embedding"]) == TINY.num_features


def test_out_of_memory_halves_the_slice_and_keeps_it(tiny_model):
    items = {f"{i}.jpg": photo(i) for i in range(5)}
    expected = predictor(tiny_model)(decoded(items))
    actor = predictor(tiny_model)
    forward = actor.runner.model.forward

    def small_accelerator(pixels, *args, **kwargs):
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(pixels, *args, **kwargs)

    actor.runner.model.forward = small_accelerator
    table = actor(decoded(items))
    assert actor.runner.batch == 2
    assert table.column("label_ids").to_pylist() == expected.column("label_ids").to_pylist()
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_pylist()),
        np.stack(expected.column("embedding").to_pylist()),
        atol=1e-5,
    )
    actor.runner.model.forward = lambda pixels, *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("always")
    )
    with pytest.raises(torch.OutOfMemoryError):
        actor(decoded({"one.jpg": photo(9)}))


def test_the_actor_settings_are_the_run_config_s_by_name():
    own = {"run_id", "device", "lanes", "threads", "jpegs_to_device", "model_pin"}
    assert ActorSettings.model_fields.keys() - own <= RunConfig.model_fields.keys()
    config = RunConfig(
        input="s3://in/x",
        output="s3://out/y",
        model="m",
        top_k=7,
        dtype="bfloat16",
        batch_size=3,
        compile="on",
        max_pixels=99,
        cpu_threads=2,
        storage_options={"key": "secret"},
    )
    actors = Actors("cpu", 0, 1, 1, {}, lanes=3, threads=1)
    pin = ModelPin(revision="c" * 40, weights="model.safetensors", sha256="ab" * 32)
    settings = ActorSettings.of(config, "run-9", actors, True, pin)
    shared = ActorSettings.model_fields.keys() - own
    assert {name: getattr(settings, name) for name in shared} == config.model_dump(include=shared)
    planned = (settings.run_id, settings.device, settings.lanes, settings.threads, settings.jpegs_to_device)
    assert planned == ("run-9", "cpu", 3, 1, True)
    assert settings.model_pin == pin
    assert "secret" not in repr(settings)


def test_calls_from_several_threads_run_the_model_on_one(tiny_model):
    """Ray Data calls the actor from a pool of threads, CALLS_PER_LANE calls per lane at a time: each call
    gets its own rows, and with one lane the model runs on one thread only, the same for every call (torch
    keeps CUDA graphs per thread)."""
    batches = [decoded({f"{b}-{i}.jpg": photo(10 * b + i) for i in range(3)}) for b in range(4)]
    expected = [predictor(tiny_model)(batch) for batch in batches]
    actor = predictor(tiny_model)
    ran_on, run = set(), actor.runner._run

    def recorded(pixels):
        ran_on.add(threading.get_ident())
        return run(pixels)

    actor.runner._run = recorded
    tables = [None] * len(batches)

    def caller(first: int) -> None:
        for i in range(first, len(batches), 2):
            tables[i] = actor(batches[i])

    callers = [threading.Thread(target=caller, args=(first,)) for first in range(2)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert len(ran_on) == 1 and ran_on.isdisjoint({threading.get_ident(), *(t.ident for t in callers)})
    assert_same_rows(tables, expected)


def test_a_cpu_actor_runs_a_call_per_lane_at_once_each_on_one_torch_thread(tiny_model):
    """Eager on a CPU, the plan gives an actor a lane per core (`Actors`): its calls run the model at the
    same time, each on a device thread of its own with one torch thread, and give one lane's rows."""
    batches = [decoded({f"{b}-{i}.jpg": photo(10 * b + i) for i in range(3)}) for b in range(2)]
    expected = [predictor(tiny_model)(batch) for batch in batches]
    settings = ActorSettings(model=str(tiny_model), run_id="run-1", top_k=3, device="cpu", lanes=2, threads=1)
    actor = Predictor(settings)
    together = threading.Barrier(2, timeout=60)  # broken, failing both calls, unless both run at once
    ran, run = [], actor.runner._run

    def recorded(pixels):
        together.wait()
        ran.append((threading.get_ident(), torch.get_num_threads()))
        return run(pixels)

    actor.runner._run = recorded
    with ThreadPoolExecutor(2) as calls:
        tables = list(calls.map(actor, batches))
    assert len({thread for thread, _ in ran}) == 2 and {threads for _, threads in ran} == {1}
    assert_same_rows(tables, expected)


def test_a_cpu_actor_holds_the_memory_it_frees(tiny_model, monkeypatch):
    """Its calls' activations are not faulted in again on every call (`runtime.hold_freed_memory`)."""
    calls = []
    monkeypatch.setattr(infer, "hold_freed_memory", lambda: calls.append(1) or True)
    predictor(tiny_model)
    assert calls == [1]


@pytest.mark.parametrize(
    ("lanes", "per_lane", "budget", "expected"),
    [(8, 10, 35, 3), (8, 10, 500, 8), (8, 10, 5, 1), (8, 10, -4, 1)],
)
def test_lanes_fit_in_their_memory_budget_and_at_least_one_runs(lanes, per_lane, budget, expected):
    assert infer.lanes_in_memory(lanes, per_lane, budget) == expected


@pytest.mark.parametrize(
    ("memory_gib", "batch_size", "lanes", "probes"), [(4, 16, 1, 1), (16, 16, 4, 1), (4, None, 4, 0)]
)
def test_a_cpu_actor_runs_the_lanes_its_node_s_memory_holds(
    tiny_model, monkeypatch, caplog, memory_gib, batch_size, lanes, probes
):
    """One call measured at actor start (here said to take 1 GiB, beside 0.5 GiB held): of 4 GiB the
    lanes may take half, 1.5 GiB beside what the actor holds, one lane's; of 16 GiB, all four. Not where
    the lanes take no more images at once than one lane's default call (4 x 8 against 32)."""
    probed = []

    def growth(call):
        call()
        probed.append(threading.get_ident())
        return 2**30

    monkeypatch.setattr(infer, "node_resources", lambda: {"CPU": 4, "memory": memory_gib * 2**30})
    monkeypatch.setattr(infer, "process_cpus", lambda: 4)
    monkeypatch.setattr(infer, "peak_growth", growth)
    monkeypatch.setattr(infer, "resident_bytes", lambda: 2**29)
    settings = ActorSettings(
        model=str(tiny_model),
        run_id="run-1",
        top_k=3,
        device="cpu",
        lanes=4,
        threads=1,
        batch_size=batch_size,
    )
    actor = Predictor(settings)
    assert actor.lanes == lanes and len(probed) == probes and threading.get_ident() not in probed
    assert ("1 of this actor's 4 lanes fit" in caplog.text) == (lanes == 1)
    batch = decoded({"a.jpg": photo(1)})
    assert_same_rows([actor(batch)], [predictor(tiny_model)(batch)])


def assert_same_rows(tables: list[pa.Table], expected: list[pa.Table]) -> None:
    for table, want in zip(tables, expected, strict=True):
        assert table.column("key").to_pylist() == want.column("key").to_pylist()
        np.testing.assert_allclose(
            np.stack(table.column("embedding").to_pylist()),
            np.stack(want.column("embedding").to_pylist()),
            atol=1e-5,
        )


def test_an_actor_loads_the_planned_hub_commit_and_refuses_another_checkpoint(
    tmp_path, monkeypatch, tiny_model
):
    """A push to the model's hub repository during a run: an actor started after it loads the commit the
    driver's check pinned; where it finds another checkpoint than the pin's digest (here: told the new
    commit) it refuses to start."""
    hub = tmp_path / "hub"
    repo = hub / "models--shi-labs--dinat-tiny"
    planned, pushed = "0123456789abcdef" * 2 + "01234567", "f" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / planned)
    tiny_checkpoint(repo / "snapshots" / pushed, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(planned)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    pin = load_model("shi-labs/dinat-tiny", device="cpu").pin  # the driver's check
    (repo / "refs" / "main").write_text(pushed)
    settings = ActorSettings(model="shi-labs/dinat-tiny", model_pin=pin, run_id="r", top_k=1, device="cpu")
    assert (
        Predictor(settings).provenance.model_sha256
        == hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    )
    moved = pin.model_copy(update={"revision": pushed})
    with pytest.raises(
        ModelChanged, match=rf"checkpoint_sha256 (\w{{12}}) here, {pin.sha256[:12]} then"
    ) as err:
        Predictor(settings.model_copy(update={"model_pin": moved}))
    assert re.search(r"checkpoint_sha256 (\w{12}) here", str(err.value)).group(1) != pin.sha256[:12]
