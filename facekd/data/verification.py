"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A ``.bin`` file is a pickle of ``(images, issame)``: ``images`` a list of 2·P encoded images (JPEG bytes; pair
``i`` is ``images[2i]`` and ``images[2i + 1]``), ``issame`` a list of P booleans (True: same identity).
insightface wrote them with Python 2 (``str`` items, protocol 2) and reads them with
``pickle.load(f, encoding="bytes")``; :func:`load_bin` does the same through a restricted unpickler, because
unpickling runs whatever callables the file names, after checking that no item claims more bytes than the file
holds (the unpickler would allocate the claimed size before reading it). Every problem of a file raises
:class:`~facekd.errors.DataError` naming it, and the image index where one image is at fault.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from facekd.errors import DataError

__all__ = ["RefusedGlobalError", "RestrictedUnpickler", "load_bin", "write_bin"]


class RefusedGlobalError(DataError, pickle.UnpicklingError):
    """A pickle names a global (or calls an allowed one in a way) that a verification file never needs."""


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """Stands in for ``_codecs.encode``, which Python 3 pickles of ``bytes`` at protocol <= 2 call.

    Only the call pickle itself emits, ``encode(str, "latin1")``, is accepted; any other encoding (codecs can
    be arbitrary transforms) is refused.
    """
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedGlobalError(
            f"refused _codecs.encode({type(text).__name__}, {encoding!r}, {errors!r}): "
            "only encode(str, 'latin1') is allowed"
        )
    return text.encode("latin-1")


def _bytearray_from_latin1(*args: Any) -> bytearray:
    """Stands in for ``bytearray``, which protocol <= 2 pickles call as ``bytearray(str, "latin-1")``."""
    if len(args) == 0:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0].encode("latin-1"))
    raise RefusedGlobalError(f"refused bytearray call with arguments of types {[type(a).__name__ for a in args]}")


_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_NUMERIC = np._core.numeric if hasattr(np, "_core") else np.core.numeric


class _NdarrayName:
    """Stands in for ``numpy.ndarray``, which a pickle names only as ``_reconstruct``'s first argument: called
    itself, ndarray(shape) would allocate whatever shape the file claims."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """What numpy arrays, dtypes and scalars (e.g. ``np.bool_`` flags) need to unpickle, under both module names.

    ``_reconstruct`` is resolved per unpickler (it checks the shape against the file size, see RestrictedUnpickler).
    """
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NdarrayName, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "scalar")] = _MULTIARRAY.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = _NUMERIC._frombuffer
    return allowed


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytearray"): _bytearray_from_latin1,
    ("__builtin__", "bytearray"): _bytearray_from_latin1,
    **_numpy_globals(),
}
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals lists of bytes, bools and numpy arrays need.

    Lists, tuples, bytes, str, ints, floats and bools are pickle opcodes and need no global. Allowed: numpy's
    array/dtype/scalar reconstructors, and ``_codecs.encode`` / ``bytearray`` restricted to the latin-1 form
    that protocol <= 2 pickles of bytes use. Everything else raises :class:`RefusedGlobalError` naming the
    refused global. An array may not claim more than ``max_array_bytes`` (numpy's ``_reconstruct`` allocates
    the shape it is given before any data is read); pass the file's size.
    """

    def __init__(self, file: Any, *, max_array_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.max_array_bytes = max_array_bytes

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        """numpy's ``_reconstruct`` for plain arrays whose shape fits in ``max_array_bytes``."""
        if subtype is not _NdarrayName:
            raise RefusedGlobalError(f"refused numpy _reconstruct of {subtype!r}: only numpy.ndarray is allowed")
        dims = [int(side) for side in (shape if isinstance(shape, (tuple, list)) else (shape,))]
        itemsize = dtype.itemsize if isinstance(dtype, np.dtype) else 1
        if min(dims, default=0) < 0 or int(np.prod(dims, dtype=object)) * itemsize > self.max_array_bytes:
            raise DataError(f"an array claims shape {tuple(dims)}, more than the file's {self.max_array_bytes} bytes")
        return _MULTIARRAY._reconstruct(np.ndarray, shape, dtype)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECONSTRUCT:
            return self._reconstruct
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refused to load global {module}.{name}: a verification .bin may only hold bytes, bools and "
                "numpy arrays"
            ) from None


def _as_image_bytes(item: Any, index: int, path: Path) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise DataError(
        f"{path}: image {index} should be encoded image bytes, got {type(item).__name__}"
        + (f" of dtype {item.dtype} and shape {item.shape}" if isinstance(item, np.ndarray) else "")
    )


def _as_flags(issame: Any, path: Path) -> np.ndarray:
    flags = np.asarray(issame)
    if flags.ndim != 1:
        raise DataError(f"{path}: issame should be a 1-D sequence of booleans, got shape {flags.shape}")
    if flags.dtype == np.bool_:
        return flags.astype(bool)
    if flags.size and not (flags.dtype.kind in "iu" and np.isin(flags, (0, 1)).all()):
        raise DataError(
            f"{path}: issame should hold booleans (or 0/1), got dtype {flags.dtype}, first values {flags[:3].tolist()}"
        )
    return flags.astype(bool)


def _check_item_lengths(data: bytes, path: Path) -> None:
    """Refuses a pickle whose counted items (bytes, strings, long ints, frames) claim more bytes than remain.

    The C unpickler allocates an item's claimed length before it reads the item, so a few damaged (or hostile)
    bytes claiming 2**40 would end in MemoryError; pickletools reads the same opcodes without allocating.
    """
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError as error:  # "expected 1099511627776 bytes in a bytes8, but only 3 remain", unknown opcode, …
        raise DataError(f"{path}: not a readable pickle ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _check_image(data: bytes, index: int, count: int, path: Path) -> None:
    """Decodes one image (a JPEG at 1/8 scale: libjpeg still reads every coded byte, at a third less work)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: image {index} of {count} does not decode ({_one_line(error)})") from None


def load_bin(path: str | os.PathLike[str], *, verify_images: bool = True) -> tuple[list[bytes], np.ndarray]:
    """Loads a verification ``.bin``.

    Returns (images, issame): ``images`` a list of 2·P encoded images, ``issame`` a bool array [P]. With
    ``verify_images`` every image is decoded once (about 0.1 ms each), so that a damaged one is reported here
    with its index rather than in the middle of an evaluation.

    Raises DataError naming the file for a missing file, a truncated or damaged pickle, one whose items claim
    more bytes than the file holds, one of the wrong structure, and an image that does not decode (with its
    index); :class:`RefusedGlobalError` (a DataError and a ``pickle.UnpicklingError``) for a pickle that names
    any global beyond bytes/bools/numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification file {path} does not exist")
    data = path.read_bytes()
    _check_item_lengths(data, path)
    unpickler = RestrictedUnpickler(io.BytesIO(data), max_array_bytes=len(data), encoding="bytes")
    try:
        content = unpickler.load()
    except RefusedGlobalError as error:
        raise RefusedGlobalError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
        raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: {_one_line(error)})") from None
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise DataError(
            f"{path}: expected a pickled pair (images, issame), got {type(content).__name__}"
            + (f" of length {len(content)}" if isinstance(content, (tuple, list)) else "")
        )
    raw_images, raw_issame = content
    if not isinstance(raw_images, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: images should be a list of encoded images, got {type(raw_images).__name__}")
    if not isinstance(raw_issame, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: issame should be a list of booleans, got {type(raw_issame).__name__}")
    issame = _as_flags(raw_issame, path)
    if len(raw_images) != 2 * len(issame):
        raise DataError(
            f"{path}: {len(raw_images)} images for {len(issame)} pairs, expected 2 x {len(issame)} = "
            f"{2 * len(issame)}"
        )
    images = [_as_image_bytes(item, index, path) for index, item in enumerate(raw_images)]
    if verify_images:
        for index, image in enumerate(images):
            _check_image(image, index, len(images), path)
    return images, issame


def write_bin(path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes a verification ``.bin`` that insightface's and facekd's loaders read.

    ``images``: 2·P encoded images, pair i = (images[2i], images[2i+1]); ``issame``: P booleans. The file is
    written under a temporary name in the same directory and renamed, so a reader never sees a partial file.
    """
    path = Path(path)
    flags = [bool(flag) for flag in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs, expected {2 * len(flags)}")
    image_list = [_as_image_bytes(image, index, path) for index, image in enumerate(images)]
    buffer = io.BytesIO()
    pickle.dump((image_list, flags), buffer, protocol=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
