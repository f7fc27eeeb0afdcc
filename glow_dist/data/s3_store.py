"""The s3:// side of object_store.py: boto3, configured the AWS SDK's way, every failure turned into one line.

Endpoint: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS itself. A custom endpoint gets path-style addressing
(MinIO, SeaweedFS, Ceph). Credentials: boto3's chain; on a 403 the line says which link of it answered (variables,
profile file, role) and the key id, never the secret. botocore's own retries are off: Store.retry decides.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from glow_dist.data.manifest import DataError
from glow_dist.data.object_store import CHUNK, Store, Unavailable, join

DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken", "ExpiredToken"}
TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
MULTIPART_BYTES = 64 << 20   # shards above this are uploaded in parts of this size, 8 at a time


def endpoint() -> tuple[str | None, str]:
    """(endpoint URL or None for AWS, the variable it came from)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name], name
    return None, "AWS_ENDPOINT_URL"


class S3Store(Store):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        without = root[len("s3://"):].strip("/")
        self.bucket, _, self.prefix = without.partition("/")
        if not self.bucket:
            raise DataError(f"{root}: no bucket; write s3://BUCKET/PREFIX", everywhere=True)
        import boto3
        from botocore.config import Config

        self.endpoint, self.variable = endpoint()
        self.session = boto3.session.Session()
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=30,
                        max_pool_connections=32, s3={"addressing_style": "path"} if self.endpoint else {})
        self.client = self.session.client("s3", endpoint_url=self.endpoint, config=config)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def unreachable(self, error: Exception) -> str:
        if self.endpoint is None:
            return f"cannot reach AWS S3 ({error}); for another store set AWS_ENDPOINT_URL to its address"
        return (f"cannot reach the object store at {self.endpoint} (from {self.variable}): {error}; start the store "
                f"or set {self.variable} to its address")

    def credentials_source(self) -> str:
        creds = self.session.get_credentials()
        if creds is None:
            return "no credentials were found"
        method = creds.method
        where = {"env": "the variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                 "shared-credentials-file": f"profile {self.session.profile_name!r} of "
                 f"{os.environ.get('AWS_SHARED_CREDENTIALS_FILE', '~/.aws/credentials')}",
                 "config-file": f"profile {self.session.profile_name!r} of "
                 f"{os.environ.get('AWS_CONFIG_FILE', '~/.aws/config')}"}.get(method, f"boto3's {method}")
        return f"key id {creds.access_key} from {where}"

    def _call(self, name: str, call: Any, **kwargs: Any) -> Any:
        """One S3 request; Unavailable for what another try may fix, DataError/FileNotFoundError for the rest."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return call(Bucket=self.bucket, **kwargs)
        except S3UploadFailedError as e:   # upload_file wraps the ClientError in text
            if any(code in str(e) for code in DENIED):
                raise DataError(f"writing to bucket {self.bucket!r} at {self.endpoint or 'AWS'} denied for "
                                f"{self.credentials_source()}; give that key write access or set the right "
                                "credentials", everywhere=True) from None
            if "NoSuchBucket" in str(e):
                raise DataError(f"bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS'}; create it first",
                                everywhere=True) from None
            raise Unavailable(str(e)) from None
        except NoCredentialsError:
            raise DataError(f"{self.root}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or AWS_PROFILE with ~/.aws/credentials", everywhere=True) from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in DENIED or status == "403":
                raise DataError(f"access to bucket {self.bucket!r} at {self.endpoint or 'AWS'} denied ({code}) for "
                                f"{self.credentials_source()}; give that key read access (write for prepare) or "
                                "set the right credentials", everywhere=True) from None
            if code in ("NoSuchBucket",):
                raise DataError(f"bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS'} (data root "
                                f"{self.root}); check the URL, or create it and run `glow-dist prepare ... --out "
                                f"{self.root}`", everywhere=True) from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(join(self.root, name)) from None
            if code in TRANSIENT_CODES or status.startswith("5"):
                raise Unavailable(f"{code} {status}") from None
            raise DataError(f"{join(self.root, name)}: S3 error {code} ({e})", everywhere=True) from None
        except BotoCoreError as e:
            raise Unavailable(str(e)) from None

    def size(self, name: str) -> int:
        return self.retry(f"reading {join(self.root, name)}", lambda: int(
            self._call(name, self.client.head_object, Key=self.key(name))["ContentLength"]))

    def _get(self, name: str, start: int, end: int | None) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        ranged = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        body = self._call(name, self.client.get_object, Key=self.key(name), **ranged)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        except (BotoCoreError, HTTPError, OSError) as e:   # the connection dropped in the middle of the body
            raise Unavailable(str(e)) from None
        finally:
            body.close()

    def names(self) -> list[str]:
        def listing() -> list[str]:
            out, token = [], {}
            prefix = f"{self.prefix}/" if self.prefix else ""
            while True:
                page = self._call("", self.client.list_objects_v2, Prefix=prefix, **token)
                out += [item["Key"][len(prefix):] for item in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return out
                token = {"ContinuationToken": page["NextContinuationToken"]}
        return self.retry(f"listing {self.root}", listing)

    def upload(self, path: str, name: str) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                max_concurrency=8)
        self.retry(f"uploading {join(self.root, name)}", lambda: self._call(
            name, lambda Bucket, **kw: self.client.upload_file(path, Bucket, self.key(name), Config=config)))

    def delete(self, names: list[str]) -> None:
        for i in range(0, len(names), 1000):
            objects = [{"Key": self.key(n)} for n in names[i:i + 1000]]
            self.retry(f"deleting from {self.root}", lambda o=objects: self._call(
                "", self.client.delete_objects, Delete={"Objects": o}))
