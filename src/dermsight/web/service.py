"""The one path an upload takes, for the pages and the API alike: read it in memory, check its type from the bytes,
run the model, explain the result.

Nothing here writes an upload to disk or logs it, its name or its size.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import io
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dermsight.data.images import DamagedImageError, ImageError, describe_unsupported, load_rgb
from dermsight.domain.results import PredictionResult
from dermsight.web.security import RequestRefused, sniff_image_type

log = logging.getLogger("dermsight.web")

UPLOAD_FIELD = "image"
ACCEPT = "image/jpeg,image/png,image/webp,image/bmp,image/tiff"
# The photo shown back on the result page: re-encoded small (EXIF, including any GPS position, is dropped).
DISPLAY_SHORT_SIDE = 480


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc's ``malloc_trim``).

    A big upload's pixels are freed when its request ends, but glibc keeps the pages for reuse: a worker stayed 260 MB
    larger after one 64 MP image (measured), and each of its threads keeps an arena of its own."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's ``/proc/self/statm``), None where that cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class MemoryReleaser:
    """`release_memory`, but only once the process has grown more than ``slack`` bytes since the last release.

    Trimming after every request made the next one slower: the network's activations (ONNX Runtime runs without a
    memory arena, `inference.runtime.session`) then land on pages the kernel has to fault in and zero again. One
    batch-1 pass of the bundled model took 14.4 ms after a trim against 9.1 ms without, and the trim 0.5-1.3 ms
    (measured). A request's working set is reused by the next one (they all run on one thread, `ModelService`): a
    worker serving the bundled model settled 35-50 MB above the level a trim left it at, so with a slack of 32 MB it
    still trimmed every hundred or two requests and with 64 MB twice after starting, then never; large uploads still
    trigger a release. Without ``/proc`` every call releases."""

    def __init__(self, slack: int = 64 << 20) -> None:
        self.slack = slack
        self.floor: int | None = None  # resident bytes just after the last release

    def __call__(self) -> bool:
        """Release when grown past the slack; whether it did."""
        rss = resident_bytes()
        if rss is not None and self.floor is not None and rss <= self.floor + self.slack:
            return False
        release_memory()
        self.floor = resident_bytes()
        return True


class ModelService:
    """One predictor per worker process, created on first use (after gunicorn forks), used by one thread.

    Inference is serialised within a process because Grad-CAM hooks the model (two concurrent explanations would mix
    their activations) and because each worker's intra-op threads are already sized to its share of the cores. It
    runs on one thread of its own, in arrival order, rather than on whichever connection thread holds a lock: glibc
    gives each thread that allocates alongside another an arena of its own, so with the worker's four connection
    threads taking turns at the network, four arenas each grew to hold a request's working set, `MemoryReleaser`
    trimmed every few requests and the next pass faulted its pages in again (with a 32 MB slack: 1,300-1,600 page
    faults and 23-24 ms of server CPU a request at 16 clients; on one thread, 1-507 faults and 20-21 ms).
    """

    def __init__(
        self, predictor: Any = None, path: str | Path | None = None, backend: str = "auto", threads: int | None = None
    ):
        self._predictor = None
        self.path, self.backend, self.threads = path, backend, threads
        self._load_lock = threading.Lock()
        self._turns = ThreadPoolExecutor(1, thread_name_prefix="dermsight-inference")
        self._release = MemoryReleaser()
        self._warming: threading.Thread | None = None
        self.failure: str | None = None  # why loading or the self-test failed; None while none has
        if predictor is not None:
            self._predictor = self._checked(predictor)

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def state(self) -> str:
        """ "ready" (loaded, self-test passed), "failed" (`failure` says why), or "starting"; asking starts the load
        in the background when nothing has started it yet."""
        if self._predictor is not None:
            return "ready"
        if self.failure is not None:
            return "failed"
        if self._warming is None:
            self.warm_up_in_background()
        return "starting"

    def _checked(self, predictor: Any) -> Any:
        """``predictor`` once its start-up self-test passed (`inference.selftest`; a stand-in without one passes)."""
        test = getattr(predictor, "self_test", None)
        if test is not None:
            try:
                log.info("model self-test passed: %s", test())
            except Exception as e:
                self.failure = f"the model failed its start-up self-test: {e}"
                log.error("%s", self.failure)
                raise self.unavailable() from None
        return predictor

    def unavailable(self) -> RequestRefused:
        return RequestRefused(
            503,
            "The service cannot analyse photos right now: its model failed a start-up check. Please try again later.",
            "model_unavailable",
            tips=False,
        )

    def get(self) -> Any:
        if self._predictor is None:
            with self._load_lock:
                if self.failure is not None:
                    raise self.unavailable()
                if self._predictor is None:
                    from dermsight.inference.predictor import Predictor

                    predictor = Predictor.from_path(self.path, backend=self.backend, threads=self.threads)
                    # ONNX Runtime frees the graph's working copies once the session is built, but glibc keeps the
                    # pages: 147 MB resident for the bundled model's session, 80 MB after this (measured).
                    self._release()
                    self._predictor = self._checked(predictor)
                    log.info("model loaded: %s", getattr(self._predictor.meta, "network", "?"))
        return self._predictor

    def warm_up_in_background(self) -> threading.Thread:
        """Load the model in a thread, so a worker is up (and heartbeating to gunicorn) while it loads; requests
        that arrive meanwhile wait for it. A first load may export the model to ONNX, which takes a while."""

        def load() -> None:
            try:
                self.get()
            except RequestRefused:
                pass  # the self-test failed: logged, and `state` says so
            except Exception as e:
                log.exception("loading the model failed; requests will be answered 503 (model_unavailable)")
                self.failure = f"the model could not be loaded: {str(e)[:300]}"

        thread = threading.Thread(target=load, name="dermsight-model-load", daemon=True)
        self._warming = thread
        thread.start()
        return thread

    @property
    def meta(self):
        return self.get().meta

    def info(self) -> dict[str, Any]:
        return self.get().info()

    def _in_turn(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on the worker's inference thread once the requests before it are done (inference and full
        decodes of uploads both cost memory, and a worker is sized for one at a time: eight page requests at once
        took a worker to 3.15 GB, measured), then the freed memory back to the system once there is enough of it
        (`MemoryReleaser`). Raises what ``work`` raised."""

        def turn() -> Any:
            try:
                return work(*args)
            finally:
                self._release()

        return self._turns.submit(turn).result()

    def predict(self, data: bytes) -> PredictionResult:
        return self._in_turn(self.get().predict, data)

    def analyse(self, data: bytes) -> tuple[PredictionResult, bytes | None]:
        """The prediction and, for an answered photo, its heatmap (None when drawing it failed: the answer stands
        without it), from one decode of the upload. Raises `ImageError` for an upload that cannot be decoded."""
        predictor = self.get()

        def both() -> tuple[PredictionResult, bytes | None]:
            image = predictor.decode(data)
            # A decoded image is decoded again as it is: no resampling, no copy (`preprocess.decode`).
            result = predictor.predict(image)
            if result.status != "ok":
                return result, None
            try:
                # The map of the class the page names (the answer comes from the photo's canonical orientation or
                # its eight views; the map is drawn on the photo as uploaded, whose own top class may differ).
                return result, predictor.explain(data, target=result.top.code, decoded=image)
            except Exception:
                log.exception("the heatmap could not be drawn")
                return result, None

        return self._in_turn(both)

    def display_photo(self, data: bytes) -> str:
        """`display_photo` in the worker's turn, like inference."""
        return self._in_turn(display_photo, data)


def refuse_unreadable_form(request) -> None:
    """Refuse a multipart body from which nothing at all could be read (a truncated upload, a wrong boundary, a file
    name that is not UTF-8): it would otherwise read as a form without its token or photo, and people would be told
    their session expired or that no photo came."""
    if request.mimetype != "multipart/form-data" or request.form or request.files:
        return
    # A well-formed empty form is only its closing delimiter, "--BOUNDARY--" between line breaks (the leading one is
    # optional); anything longer that yields no field at all held parts that could not be read.
    empty = len(request.mimetype_params["boundary"]) + 8 if "boundary" in request.mimetype_params else 0
    if (request.content_length or 0) > empty:
        raise RequestRefused(
            400,
            "The upload could not be read: its form data is malformed or cut short. Please send the photo again; "
            "if its file name has unusual characters, rename the file first.",
            "malformed_form",
        )


def read_upload(files, max_bytes: int, form=None, api: bool = False) -> bytes:
    """The uploaded image's bytes from the multipart ``files``, checked to be a supported image type by its bytes.

    Two inputs share the field name (a file picker and a phone-camera input); the page's script empties one when
    the other is used, so only one may hold a photo: two are refused rather than one chosen silently (without
    JavaScript both could be filled). ``form`` (the request's text fields) only sharpens the message when no file
    came: an image sent as text. ``api``: the caller is a program, so a missing photo is explained in terms of the
    request (the field's name, the body's type), not of the page's buttons.
    """
    data, named_empty = b"", False
    for storage in files.getlist(UPLOAD_FIELD):
        part = storage.read(max_bytes + 1)
        if part and data:
            raise RequestRefused(
                400,
                "Two photos were sent (the file picker and the camera each had one). Please send one photo at a time.",
                "two_photos",
            )
        data = data or part
        named_empty = named_empty or (not part and bool(storage.filename))  # a chosen 0-byte file, not an empty picker
    if not data and form is not None and form.get(UPLOAD_FIELD):
        raise RequestRefused(
            400,
            f"The photo arrived as a text field, not as a file. Send it as a file upload in the '{UPLOAD_FIELD}' "
            f"field (with curl: -F {UPLOAD_FIELD}=@photo.jpg, with the @).",
            "not_a_file",
        )
    if not data and named_empty:
        raise RequestRefused(400, "The file you chose is empty (0 bytes). Please choose the photo again.", "empty_file")
    if not data and api:
        others = sorted(name for name in files if name != UPLOAD_FIELD)
        came = f" (a file came in the field {others[0]!r})" if others else ""
        raise RequestRefused(
            400,
            f"No photo was received in the '{UPLOAD_FIELD}' field{came}. Send it as a file upload in a "
            f"multipart/form-data body, in the '{UPLOAD_FIELD}' field (with curl: -F {UPLOAD_FIELD}=@photo.jpg).",
            "no_image",
        )
    if not data:
        raise RequestRefused(400, "No photo was received. Choose a photo (or take one) and try again.", "no_image")
    if len(data) > max_bytes:
        raise RequestRefused(413, too_large_message(max_bytes), "too_large")
    if sniff_image_type(data) is None:
        raise RequestRefused(
            415,
            f"This file is {describe_unsupported(data)}, not a photo we can read. "
            "Please upload a JPEG, PNG, WebP, BMP or TIFF image.",
            "unsupported_type",
        )
    return data


def human_size(n: int) -> str:
    if n < 2**20:
        return f"{n / 1024:.0f} KB"
    mb = n / 2**20
    return f"{mb:.0f} MB" if mb >= 10 or mb.is_integer() else f"{mb:.1f} MB"


def too_large_message(max_bytes: int) -> str:
    return (
        f"The file is larger than the {human_size(max_bytes)} limit. A phone photo of one spot is usually "
        "1 to 5 MB; try a smaller or cropped photo."
    )


def unreadable(e: ImageError) -> RequestRefused:
    if isinstance(e, DamagedImageError):
        # People first, then the detail (which a developer or a bug report needs).
        return RequestRefused(
            400,
            "This photo file seems damaged or incomplete (perhaps it did not finish copying or downloading). Please "
            f"choose it again or take a new one. (Details: {e}.)",
            "unreadable_image",
        )
    return RequestRefused(400, f"We could not use this image: {e}.", "unreadable_image")


@dataclass(frozen=True)
class Analysis:
    result: PredictionResult
    photo_uri: str | None  # the user's photo, small, as a data: URI, when there is no heatmap to show it
    heatmap_uri: str | None  # the model's view beside its Grad-CAM overlay (PNG data: URI); None when rejected


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def display_photo(data: bytes) -> str:
    rgb = load_rgb(data, short_side=DISPLAY_SHORT_SIDE)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")


def analyse(model: ModelService, data: bytes, explain: bool = True) -> Analysis:
    """Predict (and explain, for the page) one upload; `ImageError` becomes a 400 `RequestRefused`."""
    if not explain:
        try:
            return Analysis(model.predict(data), None, None)
        except ImageError as e:
            raise unreadable(e) from None
    try:
        result, png = model.analyse(data)
    except ImageError as e:
        raise unreadable(e) from None
    heatmap = data_uri(png, "image/png") if png is not None else None
    # The explanation already shows the photo beside its heatmap; otherwise show the photo itself.
    photo = None
    if heatmap is None:
        try:
            photo = model.display_photo(data)
        except ImageError:
            log.warning("could not re-encode an upload for display")
    return Analysis(result, photo, heatmap)
