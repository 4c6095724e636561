"""The error hierarchy. Per-image errors become `failed` rows; transient ones are retried.

CaptionerError
├── ConfigError             a setting is wrong; fix the environment and restart
├── InvalidJob              a queue message is not a valid CaptionJob; dropped, never retried
├── InvalidEvent            a storage event is not S3 event JSON; left for the SQS redrive policy
├── ModelLoadError          the model could not be loaded; the worker cannot start
├── ImageError              one image cannot be captioned; recorded as `failed`, not retried
│   ├── UriRefused          scheme, bucket or path not allowed; refused before any I/O
│   ├── ObjectMissing       no object at that URI
│   ├── AccessDenied        the object exists but our credentials may not read it
│   ├── ModelMismatch       the job names another model than the worker serves
│   ├── KindNotServed       the job asks for a kind no worker can be routed to
│   ├── ImageTooLarge       more bytes than CAPTIONER_MAX_IMAGE_BYTES
│   ├── TooManyPixels       more pixels than CAPTIONER_MAX_IMAGE_PIXELS (decompression bomb)
│   ├── UndecodableImage    not an image, truncated or corrupt
│   └── WorkerLost          its worker died on every delivery (crash, OOM, time limit)
└── TransientError          the infrastructure failed; the job is retried with backoff
    ├── StoreUnavailable    object store timeout, 5xx or connection error
    │   └── StoreCredentialsError  no AWS credentials, or the store refused them
    ├── DatabaseUnavailable results database unreachable
    └── BrokerUnavailable   Redis unreachable, or it refused our password

The `captioner` command turns each of these into one line on stderr and exit code 2
(cli/main.py).
"""


class CaptionerError(Exception):
    """Base of every error the captioner raises on purpose."""


class ConfigError(CaptionerError):
    pass


class InvalidJob(CaptionerError):
    pass


class InvalidEvent(CaptionerError):
    pass


class ModelLoadError(CaptionerError):
    pass


class ImageError(CaptionerError):
    """An error that belongs to one image: stored as that image's `failed` row.

    `etag` is the object's when it was read far enough to know it (an object over the byte
    cap), so the row is keyed like a listing of the bucket would key it.
    """

    def __init__(self, message: str, *, etag: str | None = None) -> None:
        super().__init__(message)
        self.etag = etag


class UriRefused(ImageError):
    pass


class ObjectMissing(ImageError):
    pass


class AccessDenied(ImageError):
    pass


class ModelMismatch(ImageError):
    pass


class KindNotServed(ImageError):
    pass


class ImageTooLarge(ImageError):
    pass


class TooManyPixels(ImageError):
    pass


class UndecodableImage(ImageError):
    pass


class WorkerLost(ImageError):
    """The image's job killed its worker on each of its deliveries; it is not run again."""


class TransientError(CaptionerError):
    pass


class StoreUnavailable(TransientError):
    pass


class StoreCredentialsError(StoreUnavailable):
    """Transient for a worker (a rotated key or a refreshed role token fixes it); a user's
    mistake for the command line."""


class DatabaseUnavailable(TransientError):
    pass


class BrokerUnavailable(TransientError):
    pass
