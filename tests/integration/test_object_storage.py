"""``imagefolder:s3://bucket/prefix`` against a real S3-compatible server on 127.0.0.1 (moto's, with
authentication on), through the real jobs.prepare.

The server checks every request's signature against a user created on it, so a request without the right
keys is refused, as on AWS. The session's Ray was started before the keys were set in this environment:
its decode tasks can read the bucket only with the keys the driver put into the filesystem object.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

# Ray Data's console log handler keeps the sys.stderr of the moment ray.data is first imported: imported here,
# at collection, it writes to pytest's session-long stream, not to one test's capsys stream (closed after it,
# which would turn every later Ray Data log line into a "--- Logging error ---" block).
import ray.data  # noqa: F401, I001

from jobs import prepare
from lib.data.reader import SPLITS, PreparedData, read_manifest
from onray.ray_lines import routine_ray_line
from tests.conftest import REPO, make_image_folder

BUCKET = "images"
# The server answers these requests without checking keys: the ones that create the user and its keys.
UNCHECKED_SETUP_REQUESTS = 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port, a user allowed everything on S3, a bucket holding an image
    folder under ``folder/`` and the same folder with one object that is not an image under ``bad/``."""
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNCHECKED_SETUP_REQUESTS)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start on {endpoint}") from None
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="prepare")
        iam.put_user_policy(UserName="prepare", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="prepare")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket=BUCKET)
        local = make_image_folder(tmp_path_factory.mktemp("s3") / "images")
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = file.relative_to(local).as_posix()
            s3.upload_file(str(file), BUCKET, f"folder/{relative}")
            body = b"this is not an image" if relative == "train/dog/0003.png" else file.read_bytes()
            s3.put_object(Bucket=BUCKET, Key=f"bad/{relative}", Body=body)
        yield {"endpoint": endpoint, "local": local, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        server.terminate()
        server.wait(timeout=30)


# Where else the AWS SDK would look for credentials: none of it may leak in from the machine.
FOREIGN_AWS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
               "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def aws_environment(server: dict, tmp_path, keys: bool = True) -> dict[str, str]:
    """This environment with the server's endpoint (and the user's keys), and nothing else from AWS."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_AWS and not k.startswith("AWS_ACCESS")
           and not k.startswith("AWS_SECRET")}
    env.update(AWS_ENDPOINT_URL=server["endpoint"], AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"))
    if keys:
        env.update(AWS_ACCESS_KEY_ID=server["AWS_ACCESS_KEY_ID"], AWS_SECRET_ACCESS_KEY=server["AWS_SECRET_ACCESS_KEY"])
    return env


def set_environment(monkeypatch, env: dict[str, str]) -> None:
    for name in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def run(capsys, *argv):
    """(exit code, the stderr lines a person would see: not our progress, not Ray's routine logging)."""
    code = prepare.cli(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.strip().splitlines()
                  if not line.startswith("[") and not routine_ray_line(line)]


def data_by_id(data_dir) -> dict[str, dict]:
    """Every split's rows of a prepared DATA, by id: label and pixels."""
    data = PreparedData.open(data_dir)
    rows = {}
    for split in SPLITS:
        arrays = data.read_split(split)
        for image_id, label, image in zip(arrays.ids, arrays.labels, arrays.images, strict=True):
            rows[str(image_id)] = {"split": split, "label": int(label), "image": image}
    return rows


@pytest.mark.usefixtures("ray_session")
def test_a_bucket_prepares_the_same_data_as_its_local_copy(s3_server, tmp_path, capsys, monkeypatch):
    set_environment(monkeypatch, aws_environment(s3_server, tmp_path))
    from_bucket, from_disk = tmp_path / "from-bucket", tmp_path / "from-disk"
    code, errors = run(capsys, "--source", f"imagefolder:s3://{BUCKET}/folder", "--data-dir", str(from_bucket))
    assert (code, errors) == (0, [])
    assert run(capsys, "--source", f"imagefolder:{s3_server['local']}", "--data-dir", str(from_disk)) == (0, [])
    bucket_rows, disk_rows = data_by_id(from_bucket), data_by_id(from_disk)
    assert sorted(bucket_rows) == sorted(disk_rows) and len(bucket_rows) == 3 * 14
    for image_id, row in disk_rows.items():
        other = bucket_rows[image_id]
        assert (other["split"], other["label"]) == (row["split"], row["label"]), image_id
        assert np.array_equal(other["image"], row["image"]), image_id
    bucket_manifest, disk_manifest = read_manifest(from_bucket), read_manifest(from_disk)
    assert bucket_manifest["source"] == f"imagefolder:s3://{BUCKET}/folder"
    for key in ("classes", "counts", "image_shape", "skipped", "converted"):
        assert bucket_manifest[key] == disk_manifest[key], key
    # the keys are not written anywhere in DATA
    secret = s3_server["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in p.read_text(errors="ignore") for p in from_bucket.rglob("*.json"))


@pytest.mark.usefixtures("ray_session")
def test_an_object_that_is_not_an_image_stops_the_job(s3_server, tmp_path, capsys, monkeypatch):
    set_environment(monkeypatch, aws_environment(s3_server, tmp_path))
    data = tmp_path / "data"
    code, errors = run(capsys, "--source", f"imagefolder:s3://{BUCKET}/bad", "--data-dir", str(data))
    assert code == 2 and len(errors) == 1, errors
    assert f"cannot read image s3://{BUCKET}/bad/train/dog/0003.png" in errors[0]
    assert not data.exists()


@pytest.mark.parametrize("case, fragment", [
    ("missing bucket", "bucket does not exist: s3://no-such-bucket"),
    ("no credentials", "no AWS credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("wrong secret", "ACCESS_DENIED"),
])
def test_bucket_errors_are_one_line_before_ray_starts(s3_server, tmp_path, case, fragment):
    """The real process: exit 2, one line, no DATA folder, and no Ray started (the listing fails first)."""
    env = aws_environment(s3_server, tmp_path, keys=case != "no credentials")
    source = f"imagefolder:s3://{BUCKET}/folder"
    if case == "missing bucket":
        source = "imagefolder:s3://no-such-bucket/folder"
    if case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    data = tmp_path / "data"
    out = subprocess.run([sys.executable, "-m", "jobs.prepare", "--source", source, "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**env, "PYTHONPATH": str(REPO)})
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("jobs.prepare: error: ") and fragment in lines[0], lines
    assert "log file" not in out.stderr  # init_ray never ran
    assert not data.exists()
