"""``s3://bucket/prefix``: the durable tier on S3 (or any S3-compatible server), over fsspec's s3fs.

s3fs resolves the endpoint, region and credentials the standard way (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE`` and the shared config files), and owns the event loop thread and the connection
pool. The operations themselves call s3fs's aiobotocore client directly, because the generic
fsspec calls are slower or lack the semantics this store promises:

- ``cat_file`` issues a HEAD, then reads each range with one ``read()`` and reassembles them;
  our ``get`` needs no HEAD (the first ranged GET returns the size), takes bodies off the socket
  in 4 MiB reads and was 1.4-3.4x faster on SeaweedFS (``bench/bench_store.py``);
- ``pipe_file(mode="create")`` reports a lost conditional put as a bare ``OSError``;
- ``put_file`` reads up to ten 50 MiB parts into memory at once;
- ``info`` on a missing key also lists the prefix to look for a "directory".
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import os
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from catalog.errors import CatalogError, InvalidArgument, Unavailable
from catalog.storage.base import BlobStore
from catalog.storage.keys import check_key, check_prefix, check_range

T = TypeVar("T")

MiB = 1 << 20
#: S3 refuses parts smaller than this (except the last) and more than 10,000 parts.
_MIN_PART_SIZE = 5 * MiB
_MAX_PARTS = 10_000
#: How much of a GET body is taken off the socket per read: large enough that the per-call
#: overhead vanishes, small enough that the join at the end is the only big copy.
_READ_CHUNK = 4 * MiB
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})
#: Attempts when racing another writer: AWS answers 409 when two conditional writes to one key
#: overlap (the loser retries and then gets its 412), and a read in parts starts over when the
#: object is replaced between parts.
_RACE_ATTEMPTS = 5


class FsspecStore(BlobStore):
    """Objects under ``s3://bucket/prefix/``.

    ``put(..., if_absent=True)`` is one ``PutObject`` with ``If-None-Match: *`` (atomic on the
    server); ``put_file`` streams files above ``multipart_threshold`` as a multipart upload with
    at most ``upload_concurrency`` parts in memory; ``get_many`` keeps ``max_concurrency``
    requests in flight. Every request is bounded by the connect and read timeouts and every
    store operation by ``deadline`` seconds.
    """

    supports_conditional_put = True
    supports_ranges = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        create_bucket: bool = False,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        profile: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        deadline: float = 600.0,
        max_attempts: int = 4,
        max_concurrency: int = 32,
        part_size: int = 16 * MiB,
        multipart_threshold: int = 64 * MiB,
        upload_concurrency: int = 4,
        read_part_size: int = 16 * MiB,
        read_concurrency: int = 4,
        list_page_size: int = 1000,
    ) -> None:
        """Connect to ``bucket`` and check that it exists.

        Args:
            bucket: the bucket name.
            prefix: a key prefix inside the bucket; the store sees only keys under it.
            create_bucket: create the bucket if it does not exist.
            endpoint_url, key, secret, profile: override what the environment says.
            connect_timeout, read_timeout: per request, in seconds.
            deadline: upper bound in seconds on any one store operation.
            max_attempts: attempts per request for retryable failures (botocore standard mode).
            max_concurrency: requests in flight during ``get_many``.
            part_size, multipart_threshold, upload_concurrency: multipart upload of large files.
            read_part_size, read_concurrency: ``get`` fetches an object larger than one part
                as ranged GETs, ``read_concurrency`` at a time (one S3 connection tops out
                near 100 MB/s on AWS); ``read_concurrency=1`` reads every object as one stream.
            list_page_size: keys per ListObjectsV2 request (S3 returns at most 1000).

        Raises:
            InvalidArgument: a bad bucket, prefix or tuning value.
            Unavailable: the endpoint cannot be reached, credentials are refused, or the bucket
                does not exist and ``create_bucket`` is false.
        """
        from s3fs import S3FileSystem

        if not bucket or "/" in bucket:
            raise InvalidArgument(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        if part_size < _MIN_PART_SIZE or multipart_threshold < part_size:
            raise InvalidArgument(
                f"part_size must be >= {_MIN_PART_SIZE} and multipart_threshold >= part_size "
                f"(got {part_size}, {multipart_threshold})"
            )
        if (
            min(
                max_concurrency,
                upload_concurrency,
                read_concurrency,
                read_part_size,
                max_attempts,
                list_page_size,
            )
            < 1
            or deadline <= 0
        ):
            raise InvalidArgument("concurrency, attempts and deadline must be positive")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._root = f"{prefix}/" if prefix else ""
        self._deadline = deadline
        self._max_concurrency = max_concurrency
        self._part_size = part_size
        self._multipart_threshold = multipart_threshold
        self._upload_concurrency = upload_concurrency
        self._list_page_size = list_page_size
        self._read_part_size = read_part_size
        self._read_concurrency = read_concurrency
        self._closed = False

        options: dict[str, Any] = {
            # Each store owns its session (credentials and endpoint are resolved when it opens),
            # sharing only the parsed botocore models, which cost ~0.1 s of JSON per session.
            "skip_instance_cache": True,
            "session": _new_session(profile),
            "config_kwargs": {
                "connect_timeout": connect_timeout,
                "read_timeout": read_timeout,
                "retries": {"total_max_attempts": max_attempts, "mode": "standard"},
                "max_pool_connections": max(max_concurrency, upload_concurrency, 10),
            },
        }
        for name, value in (("endpoint_url", endpoint_url), ("key", key), ("secret", secret)):
            if value is not None:
                options[name] = value
        self.fs = S3FileSystem(**options)
        self._loop: asyncio.AbstractEventLoop = self.fs.loop
        self.endpoint_url: str = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "the AWS default endpoint"
        )
        self._client: Any = self._run("create a client", "", self.fs.set_session())
        self.endpoint_url = self._client.meta.endpoint_url
        try:
            self._run("open", "", self._ensure_bucket(create_bucket))
        except BaseException:
            self.close()
            raise

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        return self._run("get", key, self._get(self._full(key)))

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        full = self._full(key)
        check_range(key, start, length)
        return self._run("get a range of", key, self._get_range(full, start, length))

    def size(self, key: str) -> int | None:
        return self._run("stat", key, self._head(self._full(key)))

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return iter(self._run("list", prefix, self._list(self._root + prefix)))

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """Fetch ``keys`` with ``max_concurrency`` GETs in flight; missing keys map to ``None``.

        The deadline applies to each object, not to the whole batch.

        Raises:
            Unavailable: any object could not be fetched.
        """
        wanted = {key: self._full(key) for key in keys}
        return self._run("get many", "", self._get_many(wanted), bounded=False)

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False) -> bool:
        body = data if isinstance(data, bytes) else bytes(data)
        return self._run("put", key, self._put(self._full(key), body, if_absent))

    def put_file(
        self, key: str, path: Path, *, if_absent: bool = False, consume: bool = False
    ) -> bool:
        """Upload a local file; above ``multipart_threshold`` it is streamed in parts
        (``consume`` changes nothing: the bytes must travel).

        With ``if_absent`` an existing object is detected before anything is uploaded.

        Raises:
            InvalidArgument: ``path`` cannot be read or changed size during the upload.
            Unavailable: the upload failed (an unfinished multipart upload is aborted).
        """
        full = self._full(key)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path} to store it as {key!r}: {exc}") from exc
        if size < self._multipart_threshold:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"cannot read {path} to store it as {key!r}: {exc}") from exc
            return self._run("put", key, self._put(full, data, if_absent))
        return self._run("upload", key, self._put_multipart(full, Path(path), size, if_absent))

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._run("delete", key, self._client.delete_object(Bucket=self.bucket, Key=full))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(CatalogError):  # the pool is going away either way
            self._run("close", "", self._client.__aexit__(None, None, None))

    # -- the async operations ------------------------------------------------------------------

    async def _get(self, full: str) -> bytes | None:
        from botocore.exceptions import ClientError

        if self._read_concurrency == 1:
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if _error_code(exc) in _MISSING_CODES:
                    return None
                raise
            return _joined(await _read_chunks(response))
        for _ in range(_RACE_ATTEMPTS):
            try:
                return await self._get_in_parts(full)
            except ClientError as exc:
                if _error_code(exc) in _MISSING_CODES:
                    return None
                if _http_status(exc) != 412:
                    raise
                # 412: the object was replaced between two of our ranged reads; start over.
        raise Unavailable(f"s3 store {self.url}: {full!r} kept changing while it was being read")

    async def _get_in_parts(self, full: str) -> bytes:
        """The first part tells the size (``Content-Range``) and the ETag; the other parts are
        fetched concurrently, each only if the object still has that ETag."""
        from botocore.exceptions import ClientError

        part = self._read_part_size
        try:
            first = await self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes=0-{part - 1}"
            )
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange":  # an empty object has no byte 0
                return b""
            raise
        chunks = await _read_chunks(first)
        received = sum(map(len, chunks))
        total = _total_size(first.get("ContentRange"), received)
        if total <= received:
            return _joined(chunks)
        etag = first["ETag"]
        slots = asyncio.Semaphore(self._read_concurrency - 1)  # the first part used one

        async def fetch(start: int) -> builtins.list[bytes]:
            async with slots:
                response = await self._client.get_object(
                    Bucket=self.bucket,
                    Key=full,
                    Range=f"bytes={start}-{min(start + part, total) - 1}",
                    IfMatch=etag,
                )
                return await _read_chunks(response)

        tasks = [asyncio.ensure_future(fetch(start)) for start in range(received, total, part)]
        try:
            for rest in await asyncio.gather(*tasks):
                chunks.extend(rest)
        finally:
            for task in tasks:
                task.cancel()
        data = _joined(chunks)  # the only copy of the whole object
        if len(data) != total:
            raise Unavailable(
                f"s3 store {self.url}: read {len(data)} bytes of {full!r}, expected {total}"
            )
        return data

    async def _get_range(self, full: str, start: int, length: int) -> bytes | None:
        from botocore.exceptions import ClientError

        if length == 0:
            return None if await self._head(full) is None else b""
        try:
            response = await self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + length - 1}"
            )
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            if _error_code(exc) == "InvalidRange":  # start is at or past the end
                return b""
            raise
        return _joined(await _read_chunks(response))

    async def _head(self, full: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            response = await self._client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise
        return int(response["ContentLength"])

    async def _list(self, full_prefix: str) -> builtins.list[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        keys: builtins.list[str] = []
        strip = len(self._root)
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=full_prefix,
            PaginationConfig={"PageSize": self._list_page_size},
        )
        async for page in pages:
            keys.extend(
                entry["Key"][strip:]
                for entry in page.get("Contents", ())
                if not entry["Key"].endswith("/")  # "folder" markers made by other tools
            )
        # S3 lists in UTF-8 byte order, but S3-compatible servers need not (SeaweedFS lists
        # depth first: "a/b" before "a.b"), so the order is established here.
        keys.sort()
        return keys

    async def _get_many(self, wanted: dict[str, str]) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = {}
        pending = iter(wanted.items())

        async def worker() -> None:
            # A fixed set of workers rather than one task per key: 10^5 keys stay cheap.
            for key, full in pending:
                try:
                    found[key] = await asyncio.wait_for(self._get(full), self._deadline)
                except Exception as exc:
                    raise self._failure("get", key, exc) from exc

        workers = [
            asyncio.ensure_future(worker()) for _ in range(min(self._max_concurrency, len(wanted)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        return found

    async def _put(self, full: str, body: bytes, if_absent: bool) -> bool:
        from botocore.exceptions import ClientError

        conditions = {"IfNoneMatch": "*"} if if_absent else {}
        for _ in range(_RACE_ATTEMPTS):
            try:
                await self._client.put_object(Bucket=self.bucket, Key=full, Body=body, **conditions)
                return True
            except ClientError as exc:
                status = _http_status(exc)
                if if_absent and status == 412:
                    return await self._lost_race_or_own_retry(full, body, exc)
                if not (if_absent and status == 409):
                    raise
        raise Unavailable(
            f"s3 store {self.url}: conditional put of {full!r} kept conflicting with other writers"
        )

    async def _lost_race_or_own_retry(self, full: str, body: bytes, exc: Exception) -> bool:
        """Decide a 412 that followed a retry: the first attempt may have written the object
        and lost only its response, in which case the object holds exactly our bytes."""
        retried = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if not retried:
            return False
        return bool(await self._get(full) == body)

    async def _put_multipart(self, full: str, path: Path, size: int, if_absent: bool) -> bool:
        from botocore.exceptions import ClientError

        if if_absent and await self._head(full) is not None:
            return False
        part_size = max(self._part_size, math.ceil(size / _MAX_PARTS))
        offsets = range(0, size, part_size)
        upload = await self._client.create_multipart_upload(Bucket=self.bucket, Key=full)
        upload_id = upload["UploadId"]
        slots = asyncio.Semaphore(self._upload_concurrency)
        fd = os.open(path, os.O_RDONLY)

        async def send_part(number: int, offset: int) -> dict[str, Any]:
            async with slots:  # bounds the parts held in memory
                want = min(part_size, size - offset)
                chunk = await asyncio.to_thread(os.pread, fd, want, offset)
                if len(chunk) != want:
                    raise InvalidArgument(f"{path} changed size while it was being uploaded")
                sent = await self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                )
                return {"PartNumber": number, "ETag": sent["ETag"]}

        tasks = [asyncio.ensure_future(send_part(i + 1, off)) for i, off in enumerate(offsets)]
        try:
            parts = await asyncio.gather(*tasks)
            if os.fstat(fd).st_size != size:
                raise InvalidArgument(f"{path} changed size while it was being uploaded")
            await self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": list(parts)},
                **({"IfNoneMatch": "*"} if if_absent else {}),
            )
            return True
        except ClientError as exc:
            await self._abort(full, upload_id)
            if if_absent and _http_status(exc) == 412:
                return False
            raise
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.shield(self._abort(full, upload_id))
            raise
        finally:
            os.close(fd)

    async def _abort(self, full: str, upload_id: str) -> None:
        # Best effort: an upload left behind only costs space until the bucket's lifecycle rule.
        with contextlib.suppress(Exception):
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id
            )

    async def _ensure_bucket(self, create: bool) -> None:
        from botocore.exceptions import ClientError

        try:
            await self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NO_BUCKET_CODES:
                raise
        if not create:
            raise Unavailable(
                f"s3 store {self.url}: bucket {self.bucket!r} does not exist at "
                f"{self.endpoint_url} (create it, or open the store with create_bucket=True)"
            )
        try:
            await self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    # -- plumbing ------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._root + check_key(key)

    def _run(
        self,
        verb: str,
        key: str,
        operation: Coroutine[Any, Any, T],
        *,
        bounded: bool = True,
    ) -> T:
        """Run ``operation`` on s3fs's event loop thread, within the store's deadline unless
        ``bounded`` is false, and map its failure to the catalog's errors."""
        if bounded:
            operation = asyncio.wait_for(operation, self._deadline)
        future: Future[T] = asyncio.run_coroutine_threadsafe(operation, self._loop)
        try:
            return future.result()
        except CatalogError:
            raise
        except Exception as exc:
            raise self._failure(verb, key, exc) from exc
        except BaseException:
            future.cancel()  # KeyboardInterrupt: do not leave the request running
            raise

    def _failure(self, verb: str, key: str, exc: BaseException) -> CatalogError:
        if isinstance(exc, CatalogError):
            return exc
        what = f"{verb} {key!r}" if key else verb
        where = f"s3 store {self.url} at {self.endpoint_url}"
        if isinstance(exc, TimeoutError):
            return Unavailable(f"{where}: cannot {what}: timed out after {self._deadline} s")
        code, status = _error_code(exc), _http_status(exc)
        if code:
            detail = str(exc)
            return Unavailable(f"{where}: cannot {what}: {code} (HTTP {status}): {detail}")
        hint = ""
        if "Credentials" in type(exc).__name__:
            hint = " (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        return Unavailable(f"{where}: cannot {what}: {type(exc).__name__}: {exc}{hint}")


_botocore_models: Any = None


def _new_session(profile: str | None) -> Any:
    """A fresh aiobotocore session that reads its service models through one shared loader
    (botocore's ``Loader`` memoizes the parsed JSON files it ships; they never change)."""
    global _botocore_models
    from aiobotocore.session import AioSession
    from botocore.loaders import create_loader

    if _botocore_models is None:
        _botocore_models = create_loader()
    session = AioSession(profile=profile)
    session.register_component("data_loader", _botocore_models)
    # Listings spend most of their client CPU parsing every key's LastModified into a datetime;
    # nothing here reads it, so keep timestamps as strings (1.7x faster listing of the log).
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session


async def _read_chunks(response: dict[str, Any]) -> list[bytes]:
    """A GET's body, taken off the socket in large reads and left unjoined."""
    chunks = []
    async with response["Body"] as body:
        while chunk := await body.read(_READ_CHUNK):
            chunks.append(chunk)
    return chunks


def _joined(chunks: list[bytes]) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _total_size(content_range: str | None, received: int) -> int:
    """The object size from ``bytes 0-99/1234``; a server that ignored the Range sent it all."""
    if not content_range or "/" not in content_range:
        return received
    total = content_range.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else received


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def _http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
