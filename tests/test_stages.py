"""The stages' declared contracts against what they really give, and the chain they form."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from ray.data.context import AutoscalingConfig

from dinat_batch.pipeline.model.runtime import CPU_BATCH, LANE_BATCH, MAX_AUTO_BATCH
from dinat_batch.pipeline.stages import decode, infer, read, write
from dinat_batch.pipeline.stages.decode import decode_batch, host_pixels
from tests.data import MAX_PIXELS, TINY_INPUT, photo

pytestmark = pytest.mark.standalone


def raw_rows() -> dict[str, np.ndarray]:
    table = read._rows(
        ["a.jpg", "b.png", "gone.jpg"], [photo(1), photo(2, "PNG"), None], [None, None, "x: y"]
    )
    assert table.schema.names == list(read.STAGE.produces)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names}


def test_each_stage_finds_the_columns_it_reads_in_the_one_before():
    chain = [read.STAGE, decode.STAGE, infer.STAGE, write.STAGE]
    for before, after in itertools.pairwise(chain):
        assert before.feeds(after), (before.name, after.name)
    assert not write.STAGE.feeds(read.STAGE)


def test_the_decode_stage_gives_what_it_declares():
    rows = raw_rows()
    on_cpu = decode_batch(rows, TINY_INPUT, MAX_PIXELS)
    assert set(on_cpu) == set(decode.STAGE.produces)
    routed = decode_batch(rows, TINY_INPUT, MAX_PIXELS, device_share=1.0)
    assert set(routed) == set(decode.STAGE.produces) | set(decode.STAGE.may_produce)
    assert list(on_cpu["error"]) == [None, None, "x: y"]


def test_the_output_columns_are_declared_once():
    assert write.STAGE.consumes == infer.STAGE.produces == tuple(write.output_schema(4).names)
    provenance = write.Provenance("m", "sha", "run")
    keys, errors = ["a", "b"], [None, "ImageDecodeError(empty): the file is empty (0 bytes)"]
    sizes = np.array([3, 0]), np.array([4, 0])
    top = np.array([[0.9], [0.0]], np.float32), np.array([[2], [0]], np.int32), np.array([["two"], ["zero"]])
    table = write.output_rows(
        keys, errors, sizes, np.ones((2, 4), np.float32), top, provenance, write.output_schema(4)
    )
    rows = table.to_pylist()
    assert rows[0]["labels"] == ["two"] and rows[0]["width"] == 3 and rows[0]["status"] == "ok"
    assert rows[1]["labels"] is None and rows[1]["embedding"] is None and rows[1]["status"] == "error"
    assert table.column("model_sha256").to_pylist() == ["sha", "sha"]
    assert isinstance(table.column("processed_at").type, pa.TimestampType)


def test_rows_carry_either_their_jpeg_or_their_pixels():
    rows = raw_rows()
    on_cpu = decode_batch(rows, TINY_INPUT, MAX_PIXELS)
    routed = decode_batch(rows, TINY_INPUT, MAX_PIXELS, device_share=1.0)
    assert routed["data"][0] is not None and routed["pixels"][0] == b""  # the JPEG goes on as bytes
    assert routed["data"][1] is None  # the PNG as pixels, the same as on the CPU route
    png = np.array([False, True, False])
    size = (TINY_INPUT.height, TINY_INPUT.width)
    np.testing.assert_array_equal(host_pixels(routed["pixels"], png, size), on_cpu["pixels"][png])
    np.testing.assert_array_equal(host_pixels(on_cpu["pixels"], png, size), on_cpu["pixels"][png])


def test_a_device_share_sends_that_share_of_the_jpegs_and_decodes_the_rest():
    names = [f"{i}.jpg" for i in range(40)]
    table = read._rows(names, [photo(i) for i in range(40)], [None] * 40)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names}
    on_cpu = decode_batch(rows, TINY_INPUT, MAX_PIXELS)
    mixed = decode_batch(rows, TINY_INPUT, MAX_PIXELS, device_share=0.5)
    sent = np.array([data is not None for data in mixed["data"]])
    assert list(sent) == [decode.to_device(name, 0.5) for name in names] and 10 < sent.sum() < 30
    assert all(pixels == b"" for pixels in mixed["pixels"][sent])
    size = (TINY_INPUT.height, TINY_INPUT.width)
    np.testing.assert_array_equal(host_pixels(mixed["pixels"], ~sent, size), on_cpu["pixels"][~sent])
    assert list(mixed["width"]) == list(on_cpu["width"]) and list(mixed["error"]) == [None] * 40


def test_the_share_is_chosen_by_key_alike_in_every_process():
    keys = [f"s3://bucket/day/{i}.jpg" for i in range(20_000)]
    assert 0.24 < sum(decode.to_device(key, 0.25) for key in keys) / len(keys) < 0.26
    assert not any(decode.to_device(key, 0.0) for key in keys)
    assert all(decode.to_device(key, 1.0) for key in keys)
    # a Ray worker has its own hash seed: a rerun must still decode each image where it did before
    script = (
        "import sys; from dinat_batch.pipeline.stages.decode import to_device; "
        "print([to_device(key, 0.25) for key in sys.argv[1:]])"
    )
    elsewhere = subprocess.run(
        [sys.executable, "-c", script, *keys[:200]],
        env=os.environ | {"PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert elsewhere.stdout.strip() == str([decode.to_device(key, 0.25) for key in keys[:200]])


def test_chunk_groups_fill_up_to_the_rows_in_order_and_a_larger_chunk_goes_alone():
    names = [f"s3://b/out/_staging/a/{write.chunk_name(i, rows)}" for i, rows in enumerate([3, 4, 2, 9, 1])]
    assert write.chunk_groups(names, 7) == [names[0:2], names[2:3], names[3:4], names[4:5]]
    assert write.chunk_groups([], 7) == []
    assert write.chunk_groups(names, 7, files=1) == [[name] for name in names]
    empty_first = [write.chunk_name(0, 0), write.chunk_name(1, 3)]
    assert write.chunk_groups(empty_first, 7) == [empty_first]
    untold = ["s3://b/t/_runs/2026-11-20.arrow", *names[:2]]  # a name without rows goes alone
    assert write.chunk_groups(untold, 7) == [untold[:1], untold[1:]]


def test_the_pool_sheds_actors_at_the_calls_in_flight_of_one_call_per_lane():
    """Ray Data's pool use is calls in flight per actor over the calls it may take, CALLS_PER_LANE per lane:
    an actor running one call per lane is busy, as with one call per lane; half a call per lane is little
    enough to shed idle ones."""
    config = infer.autoscaling(AutoscalingConfig())
    for lanes in (1, 4):
        most = infer.pool(1, 2, lanes).max_concurrent_calls_per_actor
        assert most == infer.CALLS_PER_LANE * lanes
        busy, idle = lanes / most, lanes / 2 / most  # in use: a call per lane in flight; half a call
        assert idle <= config.actor_pool_util_downscaling_threshold < busy
    assert (
        config.actor_pool_util_upscaling_threshold == AutoscalingConfig().actor_pool_util_upscaling_threshold
    )
    assert infer.autoscaling(config) == config  # applying it twice changes nothing


@pytest.mark.parametrize(
    ("device", "lanes", "batch_size", "expected"),
    [
        ("cpu", 4, None, LANE_BATCH),  # a lane holds its call's activations
        ("cpu", 1, None, CPU_BATCH),
        ("cpu", 4, 24, 24),
        ("cuda", 1, None, MAX_AUTO_BATCH),  # the actor slices it to what fits its GPU
        ("cuda", 1, 64, 64),
    ],
)
def test_an_actor_call_takes_the_batch_asked_or_its_device_s_default(device, lanes, batch_size, expected):
    settings = infer.ActorSettings(
        model="m", run_id="r", top_k=1, device=device, lanes=lanes, batch_size=batch_size
    )
    assert infer.call_batch(settings) == expected


def test_read_tasks_take_two_per_cpu_in_whole_batches_up_to_a_bound():
    def per_task(images, cpus=16, batch=64, call=1024, per_block=10**6):
        return read.images_per_task(images, cpus, batch, call, per_block)

    assert per_task(144, cpus=2) == 64  # small runs: one batch per task, as before
    assert per_task(10**9) == read.MAX_IMAGES_PER_TASK
    assert per_task(10**9, batch=5000) == 5000  # never part of a read batch
    assert per_task(0, cpus=0) == 64
    # a call takes a whole number of tasks: 640 would give the actors calls of 1024 and 256 in turn
    assert per_task(20_000) == 512
    assert per_task(10**6, call=256) == 256
    assert per_task(10**6, call=32) == 64  # a read batch is more than a call: one batch
    assert per_task(10**6, call=1000) == 960  # a call is not whole read batches: as many as fit
    # a block of Ray Data's holds ~890 decoded images at 224 x 224, ~300 at 384 x 384
    assert per_task(10**9, per_block=(128 << 20) // (224 * 224 * 3)) == 512
    assert per_task(10**9, per_block=(128 << 20) // (384 * 384 * 3)) == 256
