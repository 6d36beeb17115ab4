"""GCS mode against fake-gcs-server, a verifying token endpoint and a metadata stand-in."""

import io
import os
import tarfile
import threading

import pytest

from conftest import with_creds
from gcs.servers import (
    FakeGcs, FixedStatus, MetadataServer, TokenEndpoint, make_keypair, write_key_file,
)
from helpers import BlackHole, all_files_text, config, import_from_site, run_installer, start_installer

BUCKET = "kaspr-test-bucket"
EMAIL = "kaspr-cache@test-project.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
    server = FakeGcs(tmp_path_factory.mktemp("fake-gcs") / "fake-gcs.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service_account(tmp_path_factory):
    """(key file path, token endpoint) with a fresh RSA key."""
    directory = tmp_path_factory.mktemp("sa")
    private, public = make_keypair(directory)
    endpoint = TokenEndpoint(public, EMAIL)
    key_file = write_key_file(directory, private, endpoint.token_uri, EMAIL)
    yield key_file, endpoint
    endpoint.stop()


@pytest.fixture
def bucket(fake_gcs, request):
    """A fresh bucket per test, so objects never leak between tests."""
    name = "kaspr-%d-%s" % (abs(hash(request.node.name)) % 10**8, "b")
    fake_gcs.create_bucket(name)
    return name


def gcs_config(tmp_path, pod, pypi, bucket, key_file=None, key="0123456789abcdef", **gcs_extra):
    gcs = {"bucket": bucket, "prefix": "kaspr-packages/", "maxArchiveSize": 1 << 30}
    if key_file:
        gcs["keyFile"] = str(key_file)
    gcs.update(gcs_extra)
    return config(tmp_path / pod, pypi.url, ["kasprdemo==2.0", "needsbase"], mode="gcs",
                  credentials=True, installKey=key, gcs=gcs)


def gcs_env(env, storage, **more):
    return dict(with_creds(env), STORAGE_EMULATOR_HOST=storage, KASPR_PACKAGES_GCS_TIMEOUT="3", **more)


def object_name(tag):
    return "kaspr-packages/default/my-app/0123456789abcdef/%s.tar.gz" % tag


def tag_from(run):
    line = run.lines("OK ")[0]
    return line.split(", ")[2]


def test_miss_installs_and_uploads_then_hit_skips_pip(image_python, pypi, env, tmp_path, fake_gcs, bucket, service_account):
    key_file, endpoint = service_account
    before = len(endpoint.results)
    first = run_installer(image_python, gcs_config(tmp_path, "pod-a", pypi, bucket, key_file),
                          gcs_env(env, fake_gcs.url), tmp_path / "a.log")
    assert first.returncode == 0, first
    assert first.lines("cache miss") and first.lines("kaspr-packages: uploaded gs://%s/" % bucket)
    assert fake_gcs.list(bucket) == [object_name(tag_from(first))]
    assert first.termination.startswith("kaspr-packages: OK ") and "cache off" not in first.termination, first
    # The token endpoint saw a JWT whose signature and claims verify.
    assert endpoint.results[before:] and all(not r["problems"] for r in endpoint.results[before:]), endpoint.results
    assert b"PRIVATE KEY" not in all_files_text(tmp_path / "pod-a"), "the key's temp copy is removed"

    second = run_installer(image_python, gcs_config(tmp_path, "pod-b", pypi, bucket, key_file),
                           gcs_env(env, fake_gcs.url), tmp_path / "b.log")
    assert second.returncode == 0, second
    assert second.lines("cache hit") and not second.lines("pip: ")
    assert "cache off" not in second.termination, second
    assert import_from_site(image_python, tmp_path / "pod-b", "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"
    assert TokenEndpoint.TOKEN not in second.stdout


def test_corrupt_archive_is_a_miss_and_is_replaced(image_python, pypi, env, tmp_path, fake_gcs, bucket, service_account):
    key_file, _ = service_account
    probe = run_installer(image_python, gcs_config(tmp_path, "probe", pypi, bucket, key_file, key="1111111111111111"),
                          gcs_env(env, fake_gcs.url), tmp_path / "p.log")
    tag = tag_from(probe)
    fake_gcs.put(bucket, object_name(tag), b"\x1f\x8b this is not a tar.gz")
    run = run_installer(image_python, gcs_config(tmp_path, "pod-a", pypi, bucket, key_file),
                        gcs_env(env, fake_gcs.url), tmp_path / "a.log")
    assert run.returncode == 0, run
    assert run.lines("unusable") and run.lines("pip: Successfully installed")
    assert run.lines("kaspr-packages: uploaded gs://")
    with tarfile.open(fileobj=io.BytesIO(fake_gcs.get(bucket, object_name(tag))), mode="r:gz") as tar:
        assert ".kaspr-build.json" in tar.getnames()


def test_concurrent_uploads_one_winner(image_python, pypi, env, tmp_path, fake_gcs, bucket, service_account):
    key_file, _ = service_account
    procs = [start_installer(image_python, gcs_config(tmp_path, "pod-%d" % i, pypi, bucket, key_file),
                             gcs_env(env, fake_gcs.url), tmp_path / ("%d.log" % i)) for i in range(4)]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        outputs.append(out.decode())
        assert proc.returncode == 0, out.decode()
    uploaded = sum("kaspr-packages: uploaded gs://" in o for o in outputs)
    lost = sum("first; keeping theirs" in o for o in outputs)
    hits = sum("cache hit" in o for o in outputs)
    assert uploaded == 1, outputs
    assert uploaded + lost + hits == 4
    assert not any("upload failed" in o for o in outputs)
    assert not any("cache off" in o for o in outputs), "losing the upload race is not a degraded cache"


def test_archive_over_limit_is_not_uploaded(image_python, pypi, env, tmp_path, fake_gcs, bucket, service_account):
    key_file, _ = service_account
    cfg = gcs_config(tmp_path, "pod-a", pypi, bucket, key_file, maxArchiveSize=100)
    run = run_installer(image_python, cfg, gcs_env(env, fake_gcs.url), tmp_path / "a.log")
    assert run.returncode == 0, run
    assert run.lines("over maxArchiveSize 100: not uploaded")
    assert fake_gcs.list(bucket) == []
    assert "(cache off: archive too large: the build's archive is " in run.termination, run


@pytest.mark.parametrize("status", [403, 500])
def test_gcs_errors_fall_back_to_pip(image_python, pypi, env, tmp_path, service_account, status):
    key_file, _ = service_account
    stand_in = FixedStatus(status)
    try:
        run = run_installer(image_python, gcs_config(tmp_path, "pod-a", pypi, "any-bucket", key_file),
                            gcs_env(env, stand_in.url), tmp_path / "a.log")
    finally:
        stand_in.stop()
    assert run.returncode == 0, run
    assert run.lines("cache unavailable (HTTP %d)" % status), run
    assert run.lines("upload failed (HTTP %d)" % status), run
    # The pod has its packages, and its summary says the cache was off and why (the first cause).
    assert run.termination.startswith("kaspr-packages: OK 2 packages"), run
    assert "(cache off: lookup failed: HTTP %d" % status in run.termination, run
    assert run.lines("warning: cache off: upload failed: HTTP %d" % status), run
    assert import_from_site(image_python, tmp_path / "pod-a", "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"


def test_black_holed_storage_times_out_within_limit(image_python, pypi, env, tmp_path, service_account):
    key_file, _ = service_account
    hole = BlackHole()
    try:
        run = run_installer(image_python, gcs_config(tmp_path, "pod-a", pypi, "any-bucket", key_file),
                            gcs_env(env, "http://127.0.0.1:%d" % hole.port), tmp_path / "a.log")
    finally:
        hole.stop()
    assert run.returncode == 0, run
    assert run.lines("cache unavailable (error)") and run.lines("timed out")
    # Two calls (lookup, upload), each bounded by the 3s limit, plus pip.
    assert run.duration < 2 * 3 + 20, run.duration


def test_workload_identity_uses_metadata_server(image_python, pypi, env, tmp_path, fake_gcs, bucket):
    metadata = MetadataServer()
    try:
        cfg = gcs_config(tmp_path, "pod-a", pypi, bucket, key_file=None)
        run = run_installer(image_python, cfg, gcs_env(env, fake_gcs.url, KASPR_PACKAGES_GCE_METADATA_HOST=metadata.url),
                            tmp_path / "a.log")
    finally:
        metadata.stop()
    assert run.returncode == 0, run
    assert run.lines("kaspr-packages: uploaded gs://")
    assert metadata.requests and all(r["flavor"] == "Google" for r in metadata.requests)


def test_unreachable_metadata_server_falls_back_to_pip(image_python, pypi, env, tmp_path, fake_gcs, bucket):
    cfg = gcs_config(tmp_path, "pod-a", pypi, bucket, key_file=None)
    run = run_installer(image_python, cfg, gcs_env(env, fake_gcs.url, KASPR_PACKAGES_GCE_METADATA_HOST="http://127.0.0.1:9"),
                        tmp_path / "a.log")
    assert run.returncode == 0, run
    assert run.lines("cache unavailable") and run.lines("pip: Successfully installed")
    assert "(cache off: token failed: " in run.termination, run
    # The token is tried once: the upload does not wait for the metadata server again.
    assert len(run.lines("warning: cache off: token failed")) == 2, run


def test_an_object_over_max_archive_size_is_never_downloaded(image_python, pypi, env, tmp_path, fake_gcs, bucket,
                                                             service_account):
    """The object's size is checked against maxArchiveSize before any byte is fetched."""
    key_file, _ = service_account
    probe = run_installer(image_python, gcs_config(tmp_path, "probe", pypi, bucket, key_file, key="2222222222222222"),
                          gcs_env(env, fake_gcs.url), tmp_path / "p.log")
    big = b"\x1f\x8b" + b"0" * 4096
    fake_gcs.put(bucket, object_name(tag_from(probe)), big)
    cfg = gcs_config(tmp_path, "pod-a", pypi, bucket, key_file, maxArchiveSize=1024)
    run = run_installer(image_python, cfg, gcs_env(env, fake_gcs.url), tmp_path / "a.log")
    assert run.returncode == 0, run
    assert run.lines("cached archive is %d bytes, over maxArchiveSize 1024; installing with pip" % len(big)), run
    assert run.lines("pip: Successfully installed")


@pytest.mark.parametrize("problem", ["missing", "not-json", "no-private-key"])
def test_a_key_that_cannot_be_used_degrades_visibly(image_python, pypi, env, tmp_path, fake_gcs, bucket, problem):
    key_file = tmp_path / "sa.json"
    if problem == "not-json":
        key_file.write_text("this is not json")
    elif problem == "no-private-key":
        key_file.write_text('{"client_email": "x@y"}')
    run = run_installer(image_python, gcs_config(tmp_path, "pod-a", pypi, bucket, key_file),
                        gcs_env(env, fake_gcs.url), tmp_path / "a.log")
    assert run.returncode == 0, run
    assert run.lines("pip: Successfully installed")
    cause = "key unreadable" if problem == "missing" else "key unusable"
    assert run.termination.startswith("kaspr-packages: OK 2 packages"), run
    assert "(cache off: %s: service-account key file %s " % (cause, key_file) in run.termination, run
    if problem == "missing":
        assert "this pod runs as uid %d gid %d" % (os.geteuid(), os.getegid()) in run.termination, run
    assert fake_gcs.list(bucket) == []
