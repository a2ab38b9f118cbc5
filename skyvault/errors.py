"""The shared error vocabulary.

Every error skyvault raises derives from :class:`SkyvaultError`. Messages name the product, key,
dataset or file concerned. Third-party errors are translated at the I/O boundary with
``raise ... from e``. :class:`TransientError` marks the only errors the retry policy retries.
"""

from __future__ import annotations

from typing import Any


class SkyvaultError(Exception):
    """Base class of every error skyvault raises."""


def naming_product(collection: str, product_id: str, exc: BaseException) -> str:
    """The error's message, prefixed with the product when it does not name it already."""
    text = str(exc) or type(exc).__name__
    label = f"{collection}/{product_id}"
    return text if label in text or repr(product_id) in text else f"product {label}: {text}"


class TransientError(SkyvaultError):
    """An error that may go away on its own (network hiccup, 5xx, throttling); safe to retry."""


class ConfigError(SkyvaultError):
    """Settings or collection configuration are invalid or missing."""


class InvalidIdentifierError(SkyvaultError):
    """A product, collection or dataset id is unsafe or malformed (``..``, ``/``, empty...)."""


class UnknownCollectionError(SkyvaultError):
    """A product names a collection that is not configured."""


# --- object store -------------------------------------------------------------------------------


class StorageError(SkyvaultError):
    """An object store operation failed for a named key."""


class ObjectNotFoundError(StorageError):
    """The named key does not exist in the object store."""


class BucketNotFoundError(StorageError):
    """The configured bucket does not exist."""


class TransientStorageError(StorageError, TransientError):
    """An object store call failed in a way that may succeed on retry."""


class LinkOutsideStoreError(StorageError):
    """A key of a local store is a link (or lies in a linked folder) that leads out of the store's root.

    Such links are never followed: the message names the key and where it leads.
    """


class LockTimeoutError(SkyvaultError):
    """A lock stayed held by another process for longer than the caller would wait.

    The message names the lock's key and its holder.
    """


# --- products -----------------------------------------------------------------------------------


class ProductError(SkyvaultError):
    """A single product cannot be processed; the rest of the batch goes on."""


class ReportError(ProductError):
    """A browse report or JSON sidecar is malformed, unsafe or incomplete."""


class RasterError(ProductError):
    """A raster cannot be read, is corrupt, or lacks a CRS or geotransform."""


class CogValidationError(ProductError):
    """A produced file is not a valid Cloud-Optimized GeoTIFF."""


class MissingDatetimeError(ProductError):
    """No acquisition time could be found for a product."""


class CatalogError(SkyvaultError):
    """A catalog read or write failed."""


class ItemExistsError(CatalogError):
    """An item already exists and ``replace`` was not requested."""


class ItemsRejectedError(CatalogError):
    """The catalog refused some items of a batch; the others were written.

    ``errors`` maps each refused item id to the reason; ``written`` holds the refs (``ItemRef``)
    of the items that were stored, so a bulk registration can report both.
    """

    def __init__(self, collection_id: str, errors: dict[str, str], written: list[Any] | None = None) -> None:
        self.collection_id = collection_id
        self.errors = dict(errors)
        self.written = list(written or [])
        first = "; ".join(f"{item_id}: {why}" for item_id, why in list(self.errors.items())[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"collection {collection_id!r}: {len(self.errors)} item(s) refused: {first}{more}")


class TilingError(ProductError):
    """Rendering or writing tiles failed."""


class LimitExceededError(ProductError):
    """A product's input is larger than a configured limit (``limits.*`` in the settings).

    The message names the product or file, the limit and the setting that raises it.
    """


class ReportLimitError(ReportError, LimitExceededError):
    """A browse report or JSON sidecar is larger or nested deeper than the configured limit."""


class RasterLimitError(RasterError, LimitExceededError):
    """A raster has more pixels per band or more bands than the configured limit."""


class ScratchSpaceError(ProductError):
    """The scratch folder has no room to convert a product; names the folder and the bytes needed."""


# --- datasets, LTS and jobs ----------------------------------------------------------------------


class DatasetError(SkyvaultError):
    """A dataset cannot be archived or retrieved."""


class MissingFilesError(DatasetError):
    """A dataset has no files, or files listed for it are missing."""


class UnsafePathError(DatasetError):
    """A dataset member path is absolute, contains ``..`` or links outside the dataset."""


class InsufficientSpaceError(DatasetError):
    """LTS does not have enough free space for a dataset's datablocks."""


class VerificationError(DatasetError):
    """A checksum read back from LTS or the retrieval store does not match the manifest."""


class DataCatalogError(SkyvaultError):
    """The data catalog (SciCat-style jobs API) refused or failed a request."""


class TransientDataCatalogError(DataCatalogError, TransientError):
    """The data catalog could not be reached or answered 502/503/504."""


class InvalidRequestError(SkyvaultError):
    """A run was asked for something inconsistent (its parameters contradict each other)."""


class InvalidSeedRequestError(InvalidRequestError):
    """A seed request is inconsistent: another collection, an empty zoom range, a bad chunk size."""


class TransientCatalogError(CatalogError, TransientError):
    """A catalog read or write failed in a way that may succeed on retry."""


class BackupError(CatalogError):
    """Dumping or restoring the catalog database failed; names the dump or the database."""


class RunFailedError(SkyvaultError):
    """Nothing a run was asked to do succeeded; ``summary`` names each part and why it failed.

    A flow fails with it, so a caller that raises on failure gets the reason and one that does
    not still finds every outcome in ``summary``.
    """

    def __init__(self, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.summary = summary


class IngestFailedError(RunFailedError):
    """No product of an ingest run succeeded; ``summary`` is its ``IngestSummary``."""


class RegisterFailedError(RunFailedError):
    """No item of a bulk registration was written; ``summary`` is its ``RegisterReport``."""


# --- sensor time series --------------------------------------------------------------------------


class SeriesError(SkyvaultError):
    """A sensor time-series operation failed; names the source, and the file or block concerned."""


class UnknownSeriesSourceError(SeriesError, UnknownCollectionError):
    """A run names a series source that is not configured (``series.sources``)."""


class SampleFileError(SeriesError):
    """A whole sample file cannot be read (format, encoding, size); names the source, file and line."""


class InvalidSampleError(SeriesError):
    """One sample is invalid; names the source, file and line, and why. The file's other samples go in."""

    def __init__(self, source: str, key: str, line: int, reason: str) -> None:
        super().__init__(f"source {source!r}, file {key!r}, line {line}: {reason}")
        self.source, self.key, self.line, self.reason = source, key, line, reason


class SeriesDatabaseError(SeriesError):
    """The sample database refused or failed a call; names the database and the source or file."""


class TransientSeriesDatabaseError(SeriesDatabaseError, TransientError):
    """The sample database could not be reached, or aborted a transaction that may succeed again."""


class SeriesBlockError(SeriesError):
    """A reduced series block cannot be written or read; names its key."""


class SeriesReaderError(SeriesError):
    """A source's reader command failed, timed out or wrote malformed CSV; names the source and range."""


class SeriesRequestError(SeriesError, InvalidRequestError):
    """A series read asks for something the source cannot serve; ``field`` names the parameter."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class SampleIngestFailedError(RunFailedError):
    """No sample file of an ingest-samples run could be read; ``summary`` is its report."""


# --- the HTTP gateway -----------------------------------------------------------------------------


class RequestError(InvalidRequestError):
    """An HTTP request to the gateway is refused; ``field`` names the field at fault, when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestTooLargeError(RequestError):
    """A request body is larger than ``gateway.max_body_bytes`` (or a report than its limit)."""


class AuthenticationError(SkyvaultError):
    """A gateway request carries no credentials or wrong ones."""


class NotFoundError(SkyvaultError):
    """A product, request or collection the gateway was asked about is not known; names it."""


class OrchestratorError(SkyvaultError):
    """The Prefect API failed or refused a call (server down, deployment not registered)."""
