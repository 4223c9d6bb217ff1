"""The job config: files, flags on top, errors that name the field, credentials never shown."""

import json

import pytest

from dinat_batch.pipeline.config import ConfigError, RunConfig, load_config, redact

pytestmark = pytest.mark.standalone


def test_yaml_and_json_files_with_overrides(tmp_path):
    (tmp_path / "job.yaml").write_text("input: s3://b/images/\noutput: s3://b/out\ntop_k: 3\n")
    (tmp_path / "job.json").write_text(json.dumps({"input": "/data/in", "output": "/data/out"}))
    config = load_config(tmp_path / "job.yaml", top_k=None, batch_size=64)
    assert (config.input, config.top_k, config.batch_size) == ("s3://b/images/", 3, 64)
    assert load_config(tmp_path / "job.json", model="./ckpt").model == "./ckpt"
    defaults = load_config(tmp_path / "job.json")
    assert (defaults.batch_size, defaults.compile, defaults.decode) == (None, "auto", "auto")
    flags = load_config(tmp_path / "job.json", compile="graphs", decode="cpu")
    assert (flags.compile, flags.decode) == ("graphs", "cpu")


@pytest.mark.parametrize(
    "text, message",
    [
        ("input: a\noutput: b\nbatch_size: -1\n", "batch_size (--batch-size): Input should be greater"),
        ("input: a\noutput: b\ndevcie: cuda\n", "devcie (--devcie): Extra inputs are not permitted"),
        ("input: a\noutput: b\ndevice: tpu\n", "device (--device): Input should be 'auto', 'cpu' or 'cuda'"),
        (
            "input: a\noutput: b\ndecode: nvjpeg\n",
            "decode (--decode): Input should be 'auto', 'cpu' or 'gpu'",
        ),
        ("input: a\noutput: b\ncompile: yes\n", "compile (--compile): Input should be 'auto', 'off', 'on'"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("input: [unclosed\n", "is not valid YAML"),
        ("input: s3://b/images\noutput: s3://b/images/out\n", "lies inside the input"),
        ("input: s3://b/images/*.jpg\noutput: s3://b/images\n", "is the input"),
        (
            "input: a\noutput: b\nactor_resources: {GPU: 1, inference: 1}\n",
            "actor_resources (--actor-resources): Value error, GPU: Ray's own resources",
        ),
        (
            "input: a\noutput: b\nactor_resources: {inference: 0}\n",
            "actor_resources.inference (--actor-resources): Input should be greater than or equal to 0.0001",
        ),
    ],
)
def test_invalid_configs_name_the_problem(tmp_path, text, message):
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(tmp_path / "job.yaml")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def test_output_beside_the_input_is_fine():
    assert RunConfig(input="s3://b/images", output="s3://b/images-out").output == "s3://b/images-out"


@pytest.mark.parametrize(
    "input, output",
    [
        ("/data/x/in", "/data/x"),  # the input inside the output: --overwrite would delete it
        ("/data/x/in", "/data/x/in"),
        ("/data/x/in", "file:///data/x/in/"),
        ("/data/x/in/", "/data/x/in/out"),
        ("file:///data/x/in", "/data/x/in/../in/out"),
        ("/data/x/in/*.jpg", "/data/x"),
        ("s3://b/x/in", "s3a://b/x/"),
        ("s3a://b/x/in/", "s3://b//x/in/out"),
        ("s3://b/img*", "s3://b/img-out"),  # the glob would match the output's own files
        ("s3://b/x/in/**/*.jpg", "s3://b/x/in/out"),
        ("s3://b/x/in", "s3://b/x/in/http://out"),  # a URL inside a key is no protocol
    ],
)
def test_overlapping_input_and_output_are_refused_however_spelled(input, output):
    with pytest.raises(ValueError, match=r"inside the|is the input"):
        RunConfig(input=input, output=output)


def test_relative_spellings_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="inside the output"):
        RunConfig(input="./x/in", output=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="is the input"):
        RunConfig(input="x/in", output=f"file://{tmp_path}/x/in/")
    assert RunConfig(input="./x/in", output="./x/out").output == "./x/out"


def test_redacted_hides_credentials_only():
    config = RunConfig(
        input="s3://b/i",
        output="s3://b/o",
        storage_options={
            "key": "AKIA123",
            "secret": "s3cr3t",
            "client_kwargs": {
                "endpoint_url": "http://127.0.0.1:9000",
                "aws_session_token": "tok",
                "headers": {"Authorization": "Bearer bearer-token"},
            },
            "config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}, "read_timeout": 5},
            "connection_string": "AccountName=a;AccountKey=conn-key",
            "endpoint_url": "http://ep-user:ep-pass@10.0.0.1:9000",  # a safe setting, a password in it
            "some_future_option": "unknown-value",
            # a protocol's own options: redacted as options, not hidden whole
            "https": {"headers": {"Cookie": "web-cookie"}, "client_kwargs": {"endpoint_url": "http://web:1"}},
        },
    )
    shown = json.dumps(config.redacted())
    secrets = (
        "AKIA123",
        "s3cr3t",
        'tok"',
        "bearer-token",
        "conn-key",
        "unknown-value",
        "ep-pass",
        "web-cookie",
    )
    for secret in secrets:
        assert secret not in shown
    for safe in ("http://127.0.0.1:9000", "http://***@10.0.0.1:9000", '"adaptive"', '"read_timeout": 5'):
        assert safe in shown
    assert "http://web:1" in shown
    # an entry is one at the top only: below, a protocol's name is a setting like any other
    nested = redact({"client_kwargs": {"data": {"password": "pw", "endpoint_url": "e"}}})
    assert nested == {"client_kwargs": {"data": "***"}}


def test_a_protocol_has_one_entry_of_storage_options():
    with pytest.raises(ValueError, match="two entries for s3 URIs"):
        RunConfig(input="s3://b/i", output="s3://b/o", storage_options={"s3": {}, "S3A": {"anon": True}})
    RunConfig(input="s3://b/i", output="s3://b/o", storage_options={"s3": {}, "https": {}, "gs": {}})
