"""Which download errors are retried (throttling, 5xx, dropped connections) and which end the download at
once with their reason (a missing bucket, refused access, a read-only or full destination)."""

from __future__ import annotations

import errno
import os

import botocore.exceptions
import pytest

from tensorfleet.engines import models
from tensorfleet.engines.store import StoreError

NO_WAIT = models.RetryPolicy(timeout_seconds=30, base_delay=0.001, max_delay=0.001)


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": f"{code} says the server"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "ListObjectsV2")


@pytest.mark.parametrize(("code", "status"), [("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503),
                                              ("Throttling", 400), ("RequestTimeout", 400), ("", 502),
                                              ("TooManyRequests", 429), ("404", 404)])
def test_throttling_server_errors_and_a_vanished_key_are_retried(code: str, status: int) -> None:
    assert isinstance(models._s3_error("downloading s3://b/m", client_error(code, status)), StoreError)


@pytest.mark.parametrize(("code", "status", "hint"), [
    ("NoSuchBucket", 404, "bucket in spec.model.uri does not exist"),
    ("AccessDenied", 403, "spec.model.credentialsSecretRef"),
    ("403", 403, "spec.model.credentialsSecretRef"),
    ("InvalidAccessKeyId", 403, "access key"),
    ("InvalidBucketName", 400, "refused"),
])
def test_a_refused_request_is_not_retried_and_says_what_to_fix(code: str, status: int, hint: str) -> None:
    error = models._s3_error("downloading s3://b/m", client_error(code, status))
    assert isinstance(error, models.DownloadFailed)
    assert error.reason == code
    assert "s3://b/m" in str(error)
    assert hint in str(error)


def test_connection_errors_are_retried_and_a_missing_credential_is_not() -> None:
    dropped = botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.local")
    assert isinstance(models._s3_error("downloading s3://b/m", dropped), StoreError)
    timed_out = botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3.local")
    assert isinstance(models._s3_error("downloading s3://b/m", timed_out), StoreError)
    no_keys = models._s3_error("downloading s3://b/m", botocore.exceptions.NoCredentialsError())
    assert isinstance(no_keys, models.DownloadFailed)
    assert no_keys.reason == "NoCredentialsError"


@pytest.mark.parametrize(("code", "hint"), [(errno.EROFS, "read-only"), (errno.ENOSPC, "no space left"),
                                            (errno.EACCES, "permission denied")])
def test_a_read_only_full_or_forbidden_destination_fails_at_once(code: int, hint: str) -> None:
    calls = []

    def write() -> None:
        calls.append(1)
        raise OSError(code, os.strerror(code), "/models/tensorfleet/abc/w.safetensors")

    with pytest.raises(models.DownloadFailed, match=hint) as failed:
        models.with_retries("downloading s3://b/m", write, NO_WAIT)
    assert failed.value.reason == errno.errorcode[code]
    assert len(calls) == 1


def test_transient_errors_are_still_retried_until_they_pass() -> None:
    errors = [OSError(errno.ECONNRESET, "connection reset"), OSError("no errno"), StoreError("SlowDown")]

    def flaky() -> str:
        if errors:
            raise errors.pop(0)
        return "done"

    assert models.with_retries("downloading s3://b/m", flaky, NO_WAIT) == "done"
    assert errors == []
